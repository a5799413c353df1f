"""Build the vcsim main beside this file (or take it from the cache) and run it on loopback.

Built with Debian's Go in GOPATH mode against Debian's packaged govmomi sources
(golang-go, golang-github-vmware-govmomi-dev), offline: GO111MODULE=off, GOPROXY=off,
GOPATH = a temporary directory and /usr/share/gocode. The binary is cached under
$TETHER_CACHE/vcsim/ (default /var/cache/tether) by a hash of main.go, the govmomi
package's version, `go version` and the build recipe; builds unused for a week are pruned.
"""
from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "main.go"
GOCODE = Path("/usr/share/gocode")
GOVMOMI_PACKAGE = "golang-github-vmware-govmomi-dev"
SIMULATOR_SOURCE = GOCODE / "src/github.com/vmware/govmomi/simulator"
USER, PASSWORD = "tether", "vcsim-secret"


def missing() -> str | None:
    """Why vcsim cannot be built here, or None."""
    if shutil.which("go") is None:
        return "no Go compiler (apt-get install golang-go)"
    if not SIMULATOR_SOURCE.is_dir():
        return f"no govmomi sources in {SIMULATOR_SOURCE} (apt-get install {GOVMOMI_PACKAGE})"
    return None


def _package_version() -> str:
    run = subprocess.run(["dpkg-query", "-W", "-f=${Version}", GOVMOMI_PACKAGE],
                         capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else "unknown"


BUILD_ENV = {"GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
BUILD_ARGV = ["go", "build", "-o"]


def cache_key() -> str:
    go = subprocess.run(["go", "version"], capture_output=True, text=True, check=True).stdout
    recipe = repr((sorted(BUILD_ENV.items()), BUILD_ARGV)).encode()
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _package_version().encode(), go.strip().encode(), recipe):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _cache_dir() -> Path:
    root = Path(os.environ.get("TETHER_CACHE", "/var/cache/tether")) / "vcsim"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root)
        probe.close()
        return root
    except OSError:
        return Path(tempfile.mkdtemp(prefix="tether-vcsim-cache-"))


KEEP_UNUSED = 7 * 24 * 3600     # a cached build nobody used for a week is removed


def _prune(root: Path, current: Path) -> None:
    now = time.time()
    for entry in root.iterdir():
        if entry != current and entry.is_dir() and now - entry.stat().st_mtime > KEEP_UNUSED:
            shutil.rmtree(entry, ignore_errors=True)


def build() -> Path:
    """The vcsim binary for the current inputs, built if the cache lacks it."""
    root = _cache_dir()
    target = root / cache_key() / "vcsim"
    if target.is_file():
        os.utime(target.parent)         # in use: kept by _prune
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tether-vcsim-build-") as work:
        env = dict(os.environ, **BUILD_ENV, GOPATH=f"{work}/gopath:{GOCODE}",
                   GOCACHE=f"{work}/gocache")
        output = Path(work) / "vcsim"
        run = subprocess.run(BUILD_ARGV + [str(output), "."], cwd=HERE, env=env,
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"building vcsim failed:\n{run.stdout}{run.stderr}")
        partial = target.with_name(f".vcsim.{os.getpid()}")
        shutil.copy2(output, partial)
        os.replace(partial, target)         # atomic: another session may be building too
    _prune(root, target.parent)
    return target


class Vcsim:
    """One simulated vCenter on 127.0.0.1; `url` carries the credentials."""

    def __init__(self, binary: Path, workdir: Path):
        self.log_path = workdir / "vcsim.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(binary), "-l", "127.0.0.1:0", "-username", USER, "-password", PASSWORD],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.pid = self.process.pid
        self.url = self._read_url(timeout=60.0)
        self.host, self.port = self.url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)

    def _read_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, left))
            if not ready:
                self.stop()
                raise RuntimeError(f"vcsim did not start within {timeout:g} s: {self.log()}")
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                self.stop()
                raise RuntimeError(f"vcsim exited: {self.log()}")
            line += chunk
        words = line.decode().split()
        if len(words) != 2 or words[0] != "URL":
            raise RuntimeError(f"vcsim said {line!r}")
        return words[1]

    def url_with(self, user: str = USER, password: str = PASSWORD) -> str:
        return f"https://{user}:{password}@{self.host}:{self.port}/sdk"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait()
        self.process.stdout.close()
        self._log.close()
