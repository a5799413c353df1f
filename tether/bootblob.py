"""The boot blob: the bytecode of the tether and extraconfig packages in one file, served
to the import system by one finder, for the image's entries (PID 1 of a VM first).

Under QEMU's TCG, finding a module (the path finder's stats and listings, run as Python
bytecode) and reading its .pyc cost about 1.3 ms a module: some 50 ms of a cold boot for
the agent's modules (natively ~40 us a module). The image build (init/build) writes the
blob from the .pyc files it has just compiled, into the same read-only code layer as the
sources, and `build` drops those .pyc files (the kernel unpacks the layer with the
initrd: it stays its size), so code and bytecode cannot drift apart. Every entry of the image that
imports tether installs the finder first: `tether-agent` and `tether`
(init/provision/project), `tether-debug-init`. Nothing else uses it: a development tree
imports the usual way.

Layout: MAGIC, the interpreter's bytecode magic (4 bytes), the index's length (4 bytes,
big-endian), the index (a marshalled dict: module name -> (offset, size, is_package,
origin), offsets counted from the index's end), then each module's marshalled code
object. Installing reads the index; importing a module reads its code (one pread: the
whole blob holds every module of both packages, host-side ones too, 1.6 MB, which read at
once cost more under TCG than the lookups it saves).

    python3 tether/bootblob.py SITE_PACKAGES OUT    build it (imports nothing of tether)
"""
import marshal
import os
import sys

MAGIC = b"tether boot blob 1\n"
PACKAGES = ("tether", "extraconfig")
IMAGE_BLOB = "/usr/local/lib/tether/boot.blob"    # where init/build puts it in the image
# Imported the usual way, before the blob is installed: they keep their .pyc (a source
# without one is compiled at every import on the image's read-only root, ~70 ms under TCG)
BEFORE_THE_BLOB = ("tether", "tether.bootblob")
_PYC_HEADER = 16      # magic, flags, the source's hash or mtime and size (PEP 552)

# What install() did, for the agent's log (logging is not set up when it runs)
status = "not installed"


def _bytecode_magic() -> bytes:
    return sys.modules["_frozen_importlib_external"].MAGIC_NUMBER


class BlobFinder:
    """A meta path finder and loader for the modules of one blob."""

    def __init__(self, fd: int, index: dict, base: int):
        self._fd = fd          # close-on-exec, open for the process's life
        self._index = index
        self._base = base
        self._spec = sys.modules["_frozen_importlib"].ModuleSpec

    def __len__(self) -> int:
        return len(self._index)

    def find_spec(self, name, path=None, target=None):
        entry = self._index.get(name)
        if entry is None:
            return None
        origin, is_package = entry[3], entry[2]
        spec = self._spec(name, self, origin=origin, is_package=is_package)
        spec.has_location = True          # __file__: the source's path, as usual
        if is_package:                    # a submodule not in the blob is still found
            spec.submodule_search_locations = [os.path.dirname(origin)]
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        offset, size = self._index[module.__spec__.name][:2]
        code = os.pread(self._fd, size, self._base + offset)
        if len(code) != size:
            raise ImportError(f"{module.__spec__.name}: the boot blob is cut short",
                              name=module.__spec__.name)
        exec(marshal.loads(code), module.__dict__)


def install(path: str) -> BlobFinder | None:
    """Put the blob at `path` first on sys.meta_path. None, and nothing changed, when it
    is missing, was made by another Python, or is damaged: the usual imports remain.
    `status` says which, for the log."""
    global status
    fd = -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        head = len(MAGIC)
        start = os.pread(fd, head + 8, 0)
        if start[:head] != MAGIC:
            raise ValueError("not a boot blob")
        if start[head:head + 4] != _bytecode_magic():
            raise ValueError("made by another Python (bytecode magic)")
        size = int.from_bytes(start[head + 4:head + 8], "big")
        index = marshal.loads(os.pread(fd, size, head + 8))
        base, length = head + 8 + size, os.fstat(fd).st_size
        if not isinstance(index, dict) or any(
                offset < 0 or base + offset + count > length
                for offset, count, _, _ in index.values()):
            raise ValueError("damaged (an entry outside the file)")
    except (OSError, ValueError, EOFError, TypeError) as err:
        if fd >= 0:
            os.close(fd)
        status = f"no boot blob ({path}: {err}): modules imported from their files"
        return None
    finder = BlobFinder(fd, index, base)
    sys.meta_path.insert(0, finder)
    status = f"{len(index)} modules from the boot blob {path}"
    return finder


def build(site: str, out: str) -> int:
    """Write the blob of every module of PACKAGES under `site`, from the .pyc beside each
    source (compileall's), and delete those .pyc files but BEFORE_THE_BLOB's: the blob
    replaces them, so an image carries each module's bytecode once. Returns how many. A
    source without its .pyc is an error: the blob would serve a stale module, or none. A
    module's origin is its code's file name, where the image puts the source (compileall
    -p)."""
    index, chunks, offset, blobbed = {}, [], 0, []
    for package in PACKAGES:
        for directory, dirs, files in os.walk(os.path.join(site, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for file in sorted(f for f in files if f.endswith(".py")):
                parts = os.path.relpath(os.path.join(directory, file), site)[:-3].split(os.sep)
                is_package = parts[-1] == "__init__"
                name = ".".join(parts[:-1] if is_package else parts)
                pyc = os.path.join(directory, "__pycache__",
                                   f"{file[:-3]}.{sys.implementation.cache_tag}.pyc")
                with open(pyc, "rb") as f:
                    compiled = f.read()
                if compiled[:4] != _bytecode_magic():
                    raise ValueError(f"{pyc}: compiled by another Python")
                code = compiled[_PYC_HEADER:]
                origin = marshal.loads(code).co_filename
                index[name] = (offset, len(code), is_package, origin)
                chunks.append(code)
                offset += len(code)
                if name not in BEFORE_THE_BLOB:
                    blobbed.append(pyc)
    header = marshal.dumps(index)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "wb") as f:
        f.write(MAGIC + _bytecode_magic() + len(header).to_bytes(4, "big") + header)
        f.write(b"".join(chunks))
    os.replace(out + ".tmp", out)
    for pyc in blobbed:
        os.unlink(pyc)
    return len(index)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.rsplit("\n\n", 1)[1])
    count = build(sys.argv[1], sys.argv[2])
    print(f"bootblob: {count} modules in {sys.argv[2]}")
