"""The boot blob (tether/bootblob.py): the image's agent imports its modules from one
file. Built here as init/build builds it (compileall with unchecked-hash pycs, then the
blob), from a copy of this tree, and used by a bare interpreter (python -S) as the
image's entry uses it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def image_site(tmp_path):
    """A copy of the packages compiled as in the image; returns (site, blob)."""
    site = tmp_path / "site"
    for package in ("tether", "extraconfig"):
        shutil.copytree(REPO / package, site / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode",
                    "unchecked-hash", str(site)], check=True)
    blob = tmp_path / "boot.blob"
    done = subprocess.run([sys.executable, str(site / "tether" / "bootblob.py"), str(site),
                           str(blob)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return site, blob


def run_bare(site: Path, blob: Path, script: str) -> dict:
    """python -S with the copy first on the path (and the venv's packages), the blob
    installed first as tether-agent does; the script prints a JSON line."""
    path = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"],
                            sysconfig.get_paths()["platlib"]])
    entry = (f"import sys\nfrom tether import bootblob\n"
             f"finder = bootblob.install({str(blob)!r})\n" + script)
    done = subprocess.run([sys.executable, "-S", "-c", entry], capture_output=True,
                          text=True, timeout=120, cwd=str(site.parent),
                          env=dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_agents_modules_come_from_the_blob_as_from_their_files(image_site):
    site, blob = image_site
    seen = run_bare(site, blob, """if True:
        import json, os
        from tether import agentcli, sessions
        import extraconfig.codec, tether.attach
        from_blob = sorted(name for name, m in sys.modules.items()
                           if getattr(m, "__loader__", None) is finder)
        print(json.dumps({"count": len(finder), "status": bootblob.status,
                          "from_blob": from_blob,
                          "file": sessions.__file__, "path": tether.attach.__path__,
                          "package": sessions.__package__,
                          "spec_origin": agentcli.__spec__.origin}))
    """)
    assert seen["count"] > 50 and seen["status"].startswith(f"{seen['count']} modules")
    assert {"tether.agentcli", "tether.sessions", "extraconfig.codec",
            "tether.attach"} <= set(seen["from_blob"])
    # as the file loader gives them: the source's path (tracebacks show its lines)
    assert seen["file"] == str(site / "tether" / "sessions.py")
    assert seen["spec_origin"] == str(site / "tether" / "agentcli.py")
    assert seen["path"] == [str(site / "tether" / "attach")]
    assert seen["package"] == "tether"


def test_the_blob_replaces_the_pycs_but_of_what_is_imported_before_it(image_site):
    site, _ = image_site
    cache = sys.implementation.cache_tag
    kept = sorted(str(p.relative_to(site)) for p in site.rglob("*.pyc"))
    assert kept == [f"tether/__pycache__/__init__.{cache}.pyc",
                    f"tether/__pycache__/bootblob.{cache}.pyc"]


def test_a_module_not_in_the_blob_is_still_found_on_disk(image_site):
    site, blob = image_site
    (site / "tether" / "attach" / "added_later.py").write_text("VALUE = 42\n")
    seen = run_bare(site, blob, """if True:
        import json
        from tether.attach import added_later
        print(json.dumps({"value": added_later.VALUE,
                          "blob": added_later.__loader__ is finder}))
    """)
    assert seen == {"value": 42, "blob": False}


def test_a_traceback_from_a_blob_module_shows_its_source_line(image_site):
    site, blob = image_site
    seen = run_bare(site, blob, """if True:
        import json, traceback
        from tether.agentcli import parse_args, UsageError
        try:
            parse_args(["--stop-grace", "soon"])
        except UsageError:
            text = traceback.format_exc()
        print(json.dumps({"text": text}))
    """)
    assert "agentcli.py" in seen["text"] and "raise UsageError" in seen["text"], seen


@pytest.mark.parametrize("damage", ["missing", "not a blob", "other python", "cut short"])
def test_a_bad_blob_is_not_installed_and_the_files_serve(image_site, tmp_path, damage):
    site, blob = image_site
    data = blob.read_bytes()
    bad = tmp_path / "bad.blob"
    if damage == "not a blob":
        bad.write_bytes(b"hello" + data)
    elif damage == "other python":
        head = len(b"tether boot blob 1\n")
        bad.write_bytes(data[:head] + b"\0\0\0\0" + data[head + 4:])
    elif damage == "cut short":
        bad.write_bytes(data[:len(data) // 2])
    seen = run_bare(site, bad, """if True:
        import json
        from tether import sessions
        print(json.dumps({"installed": finder is not None, "status": bootblob.status,
                          "file": sessions.__file__}))
    """)
    assert not seen["installed"], seen
    assert seen["status"].startswith("no boot blob"), seen
    assert seen["file"] == str(site / "tether" / "sessions.py")


def test_a_source_without_its_bytecode_is_refused_at_build(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(REPO / "extraconfig", site / "extraconfig",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (site / "tether").mkdir()
    (site / "tether" / "__init__.py").write_text("")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(site)], check=True)
    (site / "tether" / "new.py").write_text("X = 1\n")    # after compileall: no .pyc
    done = subprocess.run([sys.executable, str(REPO / "tether" / "bootblob.py"), str(site),
                           str(tmp_path / "boot.blob")], capture_output=True, text=True)
    assert done.returncode != 0 and "new" in done.stderr
    assert not (tmp_path / "boot.blob").exists()
