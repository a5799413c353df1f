"""Agent startup: time from exec of the agent to exec of the primary session, and the
agent's RSS at that moment, against the bare interpreter doing the same.

    python benchmarks/startup.py [--rounds 20] [--site] [--sandbox] [--importtime]

No network, no attach. The primary is a tiny C program (compiled here with cc; without
cc, bash and $EPOCHREALTIME) whose first act writes the wall clock in ns, then the VmRSS
of its parent: the agent, which forked it.

The rows, run interleaved (every round runs each row once, in a rotating order), with
the same interpreter, flags and environment:

  floor: exec       `python -S -c 'os.execv(primary)'`: the bare interpreter's floor
  floor: fork+exec  the same, but forking the primary and waiting for it as the agent
                    does: the interpreter's RSS at the primary's exec (the RSS floor)
  tether agent      the agent as the image runs it (init/provision/project): python -S,
                    no runpy, `tether.agentcli.main`
  ... boot blob     the same with its modules from a boot blob (tether/bootblob.py), as
                    the image's entry installs it: a copy of this tree compiled and
                    blobbed here as init/build does

`--site` adds the same pair with site and runpy (`python -c` against
`python -m tether agent`; in a development venv, site runs the editable install's import
hook for both), `--sandbox` the whole `tether sandbox` (root), `--compare DIR` the agent
of another checkout (a commit before a change, say: `git worktree add DIR REV`), in the
same rounds. `--importtime` runs the agent once with `python -X importtime` and prints
the imports before its primary's exec that cost the most.
Ratios are of medians; the median of the per-round ratios is printed next to them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRIMARY_C = r"""
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);          /* first act: the stamp */
    char path[64], line[256];
    long rss = -1;
    snprintf(path, sizeof path, "/proc/%d/status", (int)getppid());
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) sscanf(line + 6, "%ld", &rss);
    if (f) fclose(f);
    FILE *out = fopen(argv[1], "w");
    if (!out) return 1;
    fprintf(out, "%lld %ld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, rss);
    return fclose(out) != 0;
}
"""


def build_primary(directory: str, stamp_file: str) -> tuple[list[str], str]:
    """argv of the primary, and what it is."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        source = os.path.join(directory, "primary.c")
        binary = os.path.join(directory, "primary")
        with open(source, "w") as f:
            f.write(PRIMARY_C)
        done = subprocess.run([cc, "-O2", "-static", "-o", binary, source],
                              capture_output=True)
        if done.returncode != 0:    # no static libc: a dynamic one costs the loader
            done = subprocess.run([cc, "-O2", "-o", binary, source], capture_output=True)
        if done.returncode == 0:
            return [binary, stamp_file], "a C program (cc)"
    script = (f'echo "${{EPOCHREALTIME/./}}000 $(grep VmRSS /proc/$PPID/status '
              f'| tr -dc 0-9)" > {stamp_file}')
    return ["/bin/bash", "-c", script], "bash $EPOCHREALTIME (no cc)"


def write_config(directory: str, argv: list[str]) -> tuple[str, str]:
    from extraconfig.codec import encode
    from extraconfig.transport import format_vmx
    from tether.config import Cmd, Common, ExecutorConfig, SessionConfig
    ident = uuid.uuid4().hex
    session = SessionConfig(common=Common(id=ident),
                            cmd=Cmd(path=argv[0], args=argv, env=["PATH=/usr/bin:/bin"]))
    config = ExecutorConfig(common=Common(id=ident), sessions={ident: session})
    vmx = os.path.join(directory, "guestinfo.vmx")
    text = format_vmx(encode(config))
    with open(vmx, "w") as f:
        f.write(text)
    return vmx, text


# As deployed, bytecode is compiled once (the image build does it). This machine sets
# PYTHONDONTWRITEBYTECODE, which would make every run compile every module: cache the
# bytecode under a private prefix instead, for the floor and the agent alike. With -S the
# venv's site-packages come through PYTHONPATH, as the image's entry puts them on sys.path.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",
                                                         "PYTHONPATH", "TETHER_DEBUG")}


def image_copy(directory: str) -> tuple[str, str]:
    """This tree's packages compiled as the image compiles them (unchecked-hash pycs)
    and their boot blob: (the copy's directory, the blob)."""
    site = os.path.join(directory, "image-site")
    for package in ("tether", "extraconfig"):
        shutil.copytree(os.path.join(REPO, package), os.path.join(site, package),
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode",
                    "unchecked-hash", site], check=True)
    blob = os.path.join(directory, "boot.blob")
    subprocess.run([sys.executable, os.path.join(site, "tether", "bootblob.py"), site, blob],
                   check=True, capture_output=True)
    return site, blob


def site_packages() -> list[str]:
    import sysconfig
    return [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]


class Row:
    def __init__(self, name: str, argv: list[str], reset=None, rss: bool = True,
                 cwd: str = REPO):
        self.name, self.argv, self.reset, self.has_rss = name, argv, reset, rss
        self.cwd = cwd      # python -c puts it first on sys.path
        self.times: list[float] = []
        self.rss: list[int] = []

    def median(self) -> float:
        return statistics.median(self.times)


def measure(row: Row, stamp_file: str, env: dict) -> tuple[float, int | None]:
    """Seconds from just before exec to the primary's first act; its parent's RSS (kB)."""
    if row.reset:
        row.reset()
    if os.path.exists(stamp_file):
        os.unlink(stamp_file)
    start = time.time_ns()
    run = subprocess.run(row.argv, capture_output=True, text=True, cwd=row.cwd, timeout=300,
                         env=env)
    try:
        with open(stamp_file) as f:
            words = f.read().split()
        stamp, rss = int(words[0]), int(words[1])
    except (FileNotFoundError, IndexError, ValueError):
        raise RuntimeError(f"{row.name}: the primary left no stamp (exit {run.returncode}):"
                           f"\n{run.stdout}\n{run.stderr[-3000:]}") from None
    return (stamp - start) / 1e9, (rss if rss > 0 else None)


def importtime(argv: list[str], env: dict, top: int = 25) -> None:
    run = subprocess.run(argv[:1] + ["-X", "importtime"] + argv[1:], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=300)
    rows = []
    for line in run.stderr.splitlines():
        if " started: pid " in line:   # the agent's log: the primary has been exec'd
            break
        if line.startswith("import time:") and "|" in line and "self" not in line:
            own, total, name = line[len("import time:"):].split("|")
            rows.append((int(total), int(own), name.rstrip()))
    print(f"\nimports of the agent before its primary's exec (python -X importtime, us; "
          f"{len(rows)} modules, the interpreter's own included; own time in all "
          f"{sum(r[1] for r in rows) / 1000:.1f} ms):")
    for total, own, name in sorted(rows, reverse=True)[:top]:
        print(f"  {total:7d} {own:7d} {name}")


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", "--runs", type=int, default=20)
    parser.add_argument("--site", action="store_true",
                        help="also python -c against python -m tether agent (with site)")
    parser.add_argument("--sandbox", action="store_true",
                        help="also the whole tether sandbox (root)")
    parser.add_argument("--compare", action="append", default=[], metavar="DIR",
                        help="also the agent of the checkout in DIR (repeatable)")
    parser.add_argument("--importtime", action="store_true",
                        help="print the agent's costliest imports (python -X importtime)")
    args = parser.parse_args()
    python = sys.executable
    load_before = load()
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        env = dict(ENV, PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"))
        bare_env = dict(env, PYTHONPATH=os.pathsep.join([REPO] + site_packages()))
        stamp = os.path.join(tmp, "stamp")
        primary, primary_kind = build_primary(tmp, stamp)
        vmx, text = write_config(tmp, primary)

        def reset() -> None:   # the agent writes back into the file: start clean each run
            with open(vmx, "w") as f:
                f.write(text)

        agent_args = ["--guestinfo-file", vmx, "--no-power-off", "--no-attach"]
        exec_only = f"import os; os.execv({primary[0]!r}, {primary!r})"
        fork_exec = (f"import os\npid = os.fork()\nif pid == 0: os.execv({primary[0]!r}, "
                     f"{primary!r})\nos.waitpid(pid, 0)")
        entry = "import sys; from tether.agentcli import main; sys.exit(main(sys.argv[1:]))"
        rows = [(Row("floor: exec", [python, "-S", "-c", exec_only], rss=False), bare_env),
                (Row("floor: fork+exec", [python, "-S", "-c", fork_exec]), bare_env),
                (Row("tether agent", [python, "-S", "-c", entry] + agent_args, reset),
                 bare_env)]
        if os.path.exists(os.path.join(REPO, "tether", "bootblob.py")):
            site, blob = image_copy(tmp)
            blob_entry = (f"import sys; from tether import bootblob; "
                          f"bootblob.install({blob!r}); " + entry.partition("; ")[2])
            rows.append((Row("tether agent, boot blob", [python, "-S", "-c", blob_entry]
                             + agent_args, reset, cwd=site),
                         # the copy's own pycs, as in the image (no private prefix)
                         {**{k: v for k, v in bare_env.items()
                             if k != "PYTHONPYCACHEPREFIX"},
                          "PYTHONPATH": os.pathsep.join([site] + site_packages())}))
        for other in args.compare:
            other_env = dict(bare_env, PYTHONPATH=os.pathsep.join(
                [os.path.abspath(other)] + site_packages()))
            rows.append((Row(f"agent of {os.path.basename(os.path.abspath(other))}",
                             [python, "-S", "-c", entry] + agent_args, reset,
                             cwd=os.path.abspath(other)), other_env))
        if args.site:
            rows += [(Row("site: python -c fork+exec", [python, "-c", fork_exec]), env),
                     (Row("site: python -m tether agent",
                          [python, "-m", "tether", "agent"] + agent_args, reset), env)]
        if args.sandbox and os.geteuid() == 0:
            sandbox_vmx = vmx + ".sandbox.vmx"

            def reset_sandbox() -> None:
                with open(sandbox_vmx, "w") as f:
                    f.write(text)
            rows.append((Row("tether sandbox (namespaces)",
                             [python, "-m", "tether", "sandbox", sandbox_vmx], reset_sandbox),
                         env))
        for row, row_env in rows:   # compile the bytecode, warm the page cache
            measure(row, stamp, row_env)
            measure(row, stamp, row_env)
        for i in range(args.rounds):
            for row, row_env in rows[i % len(rows):] + rows[:i % len(rows)]:
                seconds, rss = measure(row, stamp, row_env)
                row.times.append(seconds)
                if rss is not None and row.has_rss:
                    row.rss.append(rss)
        if args.importtime:
            importtime(rows[2][0].argv, bare_env)
            reset()
    load_after = load()
    by_name = {row.name: row for row, _ in rows}
    floor, floor_rss = by_name["floor: exec"], by_name["floor: fork+exec"]
    print(f"startup, exec of the agent -> exec of the primary ({primary_kind}), "
          f"{args.rounds} interleaved rounds; load {load_before} -> {load_after}")
    print(f"  {'':<30} {'median':>8} {'min..max':>15} {'x floor':>8} {'(per round)':>11}"
          f" {'RSS MiB':>8} {'x floor':>8}")
    base_rss = statistics.median(floor_rss.rss)
    for row, _ in rows:
        reference = by_name["site: python -c fork+exec"] if row.name.startswith("site: python -m") \
            else floor
        ratio = row.median() / reference.median()
        per_round = statistics.median(a / b for a, b in zip(row.times, reference.times))
        rss = statistics.median(row.rss) if row.rss else None
        rss_ref = statistics.median(by_name["site: python -c fork+exec"].rss) \
            if row.name.startswith("site: python -m") else base_rss
        rss_text = f"{rss / 1024:8.1f} {rss / rss_ref:7.2f}x" if rss else ""
        print(f"  {row.name:<30} {row.median() * 1000:6.1f}ms "
              f"{min(row.times) * 1000:6.1f}..{max(row.times) * 1000:<6.1f} "
              f"{ratio:7.2f}x {per_round:10.2f}x {rss_text}")
    print("  (x floor: against `floor: exec` for time, `floor: fork+exec` for RSS; the site "
          "row against its own python -c)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
