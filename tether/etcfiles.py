"""Generated /etc/hostname, /etc/hosts and /etc/resolv.conf for the container root.

The files are written atomically (temp file + rename) into `state_dir` and bind-mounted over
`<root>/etc/<name>`, so the image's own files stay untouched (VIC issue #489). The image's
/etc/hosts is read once, before anything is mounted over it, and blended with our entries.

A bind mount pins an inode, so a later change cannot be a plain rename: each changed file is
written under a new name and bind-mounted on top of ours. Readers switch from the old
complete file to the new complete file in one step. Then the first mount's file, hidden
under the new one, gets the same content and the new mount is detached, so each file keeps
one mount of ours: a DHCP server that changes its DNS servers at every renewal does not
stack mounts and state files without end.
"""
from __future__ import annotations

import os

from tether import rootfs
from tether.system import MNT_DETACH, bind_mount, fd_path, umount

HOSTNAME_IP = "127.0.1.1"
LOCALHOST_V4 = ("127.0.0.1", ["localhost"])
LOCALHOST_V6 = ("::1", ["localhost", "ip6-localhost", "ip6-loopback"])
RESOLV_OPTIONS = ["options timeout:15", "options attempts:5"]
SEED_HOSTS_MAX = 1 << 20   # bytes of the image's /etc/hosts blended in; the rest is left out


class EtcFilesError(Exception):
    pass


class EtcFiles:
    """The generated files' model. Setters change memory only; `flush()` writes and mounts."""

    def __init__(self, root: str, state_dir: str):
        self.root = root
        self.state_dir = state_dir
        self.hostname: str | None = None
        self.aliases: list[str] = []
        self.network_hosts: dict[str, str | None] = {}
        # endpoint -> (static, dynamic, gateway); insertion order is the endpoints' order
        self.nameservers: dict[str, tuple[list[str], list[str], str | None]] = {}
        self._seed_hosts: list[str] | None = None
        self._written: dict[str, str] = {}      # name -> content last mounted
        self._base: dict[str, str] = {}         # name -> the file of our first mount of it
        self._generation = 0

    # -- model -----------------------------------------------------------------------------
    def set_hostname(self, name: str, aliases: list[str] | tuple[str, ...] = ()) -> None:
        """The names come from the config: one that would not read back as one name (a
        newline would start a line of its own in /etc/hosts) is left out."""
        self.hostname = name if _fit_for_files(name, "hostname") else None
        self.aliases = [a for a in aliases
                        if a and a != name and _fit_for_files(a, "host alias")]

    def set_network_host(self, network_name: str, ip: str | None) -> None:
        """`<network_name>.localhost` resolves to `ip` (None removes the entry)."""
        name = f"{network_name}.localhost"
        if ip is not None and not _fit_for_files(name, "network host name"):
            return
        self.network_hosts[name] = ip

    def set_nameservers(self, endpoint: str, static: list[str], dynamic: list[str],
                        gateway: str | None) -> None:
        """Replace this endpoint's servers, so stale DHCP servers go away on renewal."""
        self.nameservers[endpoint] = (list(static), list(dynamic), gateway)

    # -- rendering (pure) --------------------------------------------------------------------
    def render_hostname(self) -> str | None:
        return None if self.hostname is None else self.hostname + "\n"

    def render_resolv(self) -> str | None:
        """Static servers beat DHCP ones; the gateway only when an endpoint has neither."""
        if not self.nameservers:
            return None
        static, dynamic, fallback = [], [], []
        for st, dyn, gw in self.nameservers.values():
            if st:
                static += st
            elif dyn:
                dynamic += dyn
            elif gw:
                fallback.append(gw)
        servers = _unique(static + dynamic) or _unique(fallback)
        return "".join(f"nameserver {s}\n" for s in servers) + "\n".join(RESOLV_OPTIONS) + "\n"

    def render_hosts(self, seed: list[str]) -> str:
        """The image's lines kept (minus names we manage), localhost ensured, ours appended."""
        ours: list[tuple[str, list[str]]] = []
        if self.hostname:
            ours.append((HOSTNAME_IP, [self.hostname] + self.aliases))
        by_ip: dict[str, list[str]] = {}
        for name, ip in self.network_hosts.items():
            if ip:
                by_ip.setdefault(ip, []).append(name)
        ours += list(by_ip.items())
        managed = {n for _, names in ours for n in names}

        kept: list[str] = []
        have_v4 = have_v6 = False
        for line in seed:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                kept.append(line)           # comments and blank lines stay as they were
                continue
            names = [n for n in fields[1:] if n not in managed]
            if not names:
                continue
            if names != fields[1:]:
                line = " ".join([fields[0]] + names)
            if "localhost" in names:
                version = _ip_version(fields[0])
                have_v4 |= version == 4
                have_v6 |= version == 6
            kept.append(line)

        head = []
        if not have_v4:
            head.append(_hosts_line(*LOCALHOST_V4))
        if not have_v6:
            head.append(_hosts_line(*LOCALHOST_V6))
        lines = head + kept + [_hosts_line(ip, names) for ip, names in ours]
        return "".join(line + "\n" for line in lines)

    # -- I/O -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what changed into state_dir and bind it over the container's /etc files."""
        if self._seed_hosts is None:
            self._seed_hosts = self._read_seed_hosts()
        wanted = {
            "hostname": self.render_hostname(),
            "hosts": self.render_hosts(self._seed_hosts),
            "resolv.conf": self.render_resolv(),
        }
        os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
        for name, content in wanted.items():
            if content is None or self._written.get(name) == content:
                continue
            self._generation += 1
            source = self._write_atomically(name, content)
            shown = os.path.join(self.root, "etc", name)
            try:
                target = self._mount_target(name)
            except OSError as exc:
                raise EtcFilesError(
                    f"cannot make /etc/{name} in {self.root}: {exc.strerror or exc}") from exc
            try:
                bind_mount(source, fd_path(target))
            except OSError as exc:
                raise EtcFilesError(
                    f"cannot bind {source} over {shown}: {exc.strerror or exc}") from exc
            finally:
                os.close(target)
            self._written[name] = content
            if name not in self._base:
                self._base[name] = source
            else:
                self._collapse(name, source, content)

    def _collapse(self, name: str, top: str, content: str) -> None:
        """Back to one mount of ours: the base file, hidden under `top` (just mounted),
        takes the content in place, then `top` is detached (readers see the same content
        before and after) and its file removed. When /etc/<name> does not show `top`
        any more (the container moved things), the stack is left as it is."""
        try:
            _rewrite(self._base[name], content)
            root_fd = rootfs.open_root(self.root)
            try:
                shown_fd = rootfs.open_in_root(root_fd, f"/etc/{name}", os.O_PATH)
            finally:
                os.close(root_fd)
            try:
                shown, ours = os.fstat(shown_fd), os.stat(top)
                if (shown.st_dev, shown.st_ino) != (ours.st_dev, ours.st_ino):
                    return
                umount(fd_path(shown_fd), MNT_DETACH)
            finally:
                os.close(shown_fd)
            os.unlink(top)
        except OSError as exc:
            from tether.log import get_logger
            get_logger("tether.etcfiles").warning(
                "/etc/%s: keeping a second mount (%s)", name, exc.strerror or exc)

    def _read_seed_hosts(self) -> list[str]:
        """The image's /etc/hosts lines: a regular file only, its first SEED_HOSTS_MAX
        bytes (whole lines); a pipe, a device or nothing there reads as no lines."""
        try:
            data = rootfs.read_file_in_root(self.root, "/etc/hosts", SEED_HOSTS_MAX + 1)
        except OSError:
            return []
        if data is None:
            return []
        if len(data) > SEED_HOSTS_MAX:
            data = data[:SEED_HOSTS_MAX].rpartition(b"\n")[0]
        return data.decode("utf-8", "replace").splitlines()

    def _write_atomically(self, name: str, content: str) -> str:
        # A new name per generation: the file under an existing bind mount is never replaced.
        final = os.path.join(self.state_dir, f"{name}.{self._generation}")
        tmp = final + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, final)
        # the plain name always holds the latest content, for people looking at state_dir
        latest_tmp = os.path.join(self.state_dir, f".{name}.tmp")
        with open(latest_tmp, "w", encoding="utf-8") as f:
            f.write(content)
        os.chmod(latest_tmp, 0o644)
        os.rename(latest_tmp, os.path.join(self.state_dir, name))
        return final

    def _mount_target(self, name: str) -> int:
        """`<root>/etc/<name>` as an O_PATH fd, symlinks followed inside the root, made
        empty where missing. An fd, not a path: a DHCP renewal rewrites resolv.conf while
        the container runs, and a symlink it swapped in on the way after our look would
        take a mount on a path string out of the root."""
        path = f"/etc/{name}"
        root_fd = rootfs.open_root(self.root)
        try:
            try:
                return rootfs.open_in_root(root_fd, path, os.O_PATH)
            except FileNotFoundError:
                pass
            # where the name leads (a dangling link: the file it names), made empty
            where = rootfs.resolve_in_root(self.root, path)[len(os.path.abspath(self.root)):]
            where = "/" + where.lstrip("/")    # the root "/" leaves no leading slash
            dir_fd = rootfs.makedirs_in_root(root_fd, os.path.dirname(where) or "/")
            try:
                os.close(os.open(os.path.basename(where), os.O_WRONLY | os.O_CREAT
                                 | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644,
                                 dir_fd=dir_fd))
            finally:
                os.close(dir_fd)
            return rootfs.open_in_root(root_fd, path, os.O_PATH)
        finally:
            os.close(root_fd)


def _rewrite(path: str, content: str) -> None:
    """The file's content replaced in place (same inode): the bind mount of it shows it."""
    data = content.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _fit_for_files(name: str, what: str) -> bool:
    """hosts(5) splits a line at blanks and ends it at '#' or a newline; a name with any
    of those, or another control character, is logged and kept out of the files."""
    if name and name.isprintable() and not any(c.isspace() or c == "#" for c in name):
        return True
    from tether.log import get_logger
    get_logger("tether.etcfiles").warning(
        "%s %r left out of /etc/hostname and /etc/hosts: it has blanks, control "
        "characters or '#'", what, name)
    return False


def _hosts_line(ip: str, names: list[str]) -> str:
    return f"{ip}\t{' '.join(names)}"


def _ip_version(text: str) -> int | None:
    # inet_pton answers the usual forms without ipaddress (re, functools...) on the VM's
    # boot path; ipaddress decides the rest (a scope ID, say) as before
    from _socket import AF_INET, AF_INET6, inet_pton
    for family, version in ((AF_INET, 4), (AF_INET6, 6)):
        try:
            inet_pton(family, text)
            return version
        except OSError:
            pass
    import ipaddress
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
