"""The shape of the code: no import cycles, no CLI machinery on the agent's startup path,
one place that decides how the agent runs, tests that skip only through the helpers."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO, executor_config, session_config, write_config

PACKAGES = ("tether", "extraconfig")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at the top or inside a function (a lazy
    import is still a dependency). Importing a package's submodule counts as importing the
    submodule; a module's own parent packages are not edges."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                deps.update(subs or [target])
        graph[name] = {d for d in deps if d in modules and d != name
                       and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# Cycles left to their owners, each with its reason; the list may only shrink.
KNOWN_CYCLES = [
    # the generated codec reuses the interpreter's node classes, and the interpreter
    # switches a class to generated code (extraconfig/codegen.py, codec._choose)
    ["extraconfig.codec", "extraconfig.codegen"],
]


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"tether.supervisor", "tether.console"} <= graph["tether.agent"]   # sees imports
    found = cycles(graph)
    assert not [c for c in found if any(m.startswith("tether") for m in c)], found
    assert [c for c in found if c not in KNOWN_CYCLES] == [], found


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_extraconfig_knows_nothing_of_tether():
    graph = import_graph()
    assert not [(m, d) for m, deps in graph.items() if m.startswith("extraconfig")
                for d in deps if d.startswith("tether")]


def test_agent_startup_imports_no_argparse_before_the_primary_runs(tmp_path):
    primary = session_config("p" * 12, ["/bin/true"])
    vmx = write_config(executor_config(primary), str(tmp_path))
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "tether", "agent",
                          "--guestinfo-file", vmx, "--no-power-off", "--no-attach"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    started = next(i for i, line in enumerate(lines) if re.search(r"session p+ started", line))
    imported = [line.rsplit("|", 1)[-1].strip() for line in lines[:started]
                if line.startswith("import time:")]
    assert "tether.sessions" in imported       # the check sees the agent's imports...
    assert not {"argparse", "gettext"} & set(imported), imported   # ...and none of these


# Modules that cost PID 1's startup more than they give it (benchmarks/startup.py,
# docs/performance.md): the agent loads them, if at all, once the primary runs.
HEAVY_AT_STARTUP = {"logging", "dataclasses", "inspect", "ast", "tokenize", "typing", "re",
                    "tempfile", "json", "ipaddress", "base64", "argparse", "gettext",
                    # the signal module's IntEnums pull in enum, functools and collections:
                    # tether/signals.py, tether/symbols.py, deque from _collections
                    "signal", "enum", "functools", "collections",
                    # python-prctl's Python wrapper: the agent calls its C extension, _prctl
                    "prctl",
                    # small, but each module costs the boot its lookup, load and body:
                    # SimpleNamespace, recursive_repr and heapq.py's wrappers are not needed,
                    # hooks only for a config that has some
                    "types", "reprlib", "heapq", "tether.hooks"}


def image_entry(tmp_path, entry: str, *args: str, importtime: bool = True,
                vmx: str | None = None):
    """Run `entry` (python -c) as the image runs the agent: python -S (no site), no runpy,
    the repository and the venv's site-packages on the path; a primary that is /bin/true
    (or the config in `vmx`)."""
    if vmx is None:
        primary = session_config("p" * 12, ["/bin/true"])
        vmx = write_config(executor_config(primary), str(tmp_path))
    return bare_python((["-X", "importtime"] if importtime else [])
                       + ["-c", entry, "--guestinfo-file", vmx, "--no-power-off", *args])


def bare_python(argv: list[str]) -> subprocess.CompletedProcess:
    """python -S `argv` as the image runs its Python: no site, the repository and the
    venv's site-packages on the path. Must exit 0."""
    import sysconfig
    path = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"],
                            sysconfig.get_paths()["platlib"]])
    run = subprocess.run([sys.executable, "-S", *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=path))
    assert run.returncode == 0, run.stderr
    return run


AGENT_ENTRY = "import sys; from tether.agentcli import main; sys.exit(main(sys.argv[1:]))"


def imported_before_the_primary_runs(tmp_path, *args: str, vmx: str | None = None) -> list[str]:
    lines = image_entry(tmp_path, AGENT_ENTRY, *args, vmx=vmx).stderr.splitlines()
    started = next(i for i, line in enumerate(lines) if re.search(r"session p+ started", line))
    return [line.rsplit("|", 1)[-1].strip() for line in lines[:started]
            if line.startswith("import time:")]


# Loaded where they are used: the output log's framing (a VM's log port), the container
# root's paths (a root other than /, a tty), the secret values' key (a secret key read),
# a VM template's wait point (the kernel argument tether.template=1).
# A plain process with none of those, as here, needs none of them before its primary runs.
LOADED_WHERE_USED = {"tether.iolog", "tether.rootfs", "extraconfig.secret", "tether.resume"}


def test_agent_startup_imports_none_of_the_heavy_modules_before_the_primary_runs(tmp_path):
    imported = imported_before_the_primary_runs(tmp_path, "--no-attach")
    assert {"tether.sessions", "extraconfig.codec"} <= set(imported)   # the check sees them
    assert not HEAVY_AT_STARTUP & set(imported), sorted(HEAVY_AT_STARTUP & set(imported))
    assert not LOADED_WHERE_USED & set(imported), sorted(LOADED_WHERE_USED & set(imported))


# What the transports of a VM's boot must not import: under QEMU's TCG every module costs
# tens of milliseconds (typing.NamedTuple, dataclasses and threading made the backdoor
# probe's imports cost more than the probe).
HEAVY_ON_THE_VM_PATH = HEAVY_AT_STARTUP | {"threading", "copy", "weakref", "contextlib",
                                           "operator", "keyword", "ctypes"}


def test_the_vm_boot_paths_guestinfo_choice_imports_none_of_the_heavy_modules():
    """tether.guestinfo.open_transport as a VM's agent runs it, here: the backdoor probe
    (which never faults and finds no backdoor off VMware), then the virtio-serial port,
    then no file: all of them imported and run, as python -S."""
    entry = """if True:
        import sys
        from tether.console import configure_logging
        configure_logging(stream=sys.stderr)
        from tether.guestinfo import open_transport
        try:
            open_transport(None)
        except RuntimeError as err:
            print("no channel:", err, file=sys.stderr)
        print(" ".join(sorted(sys.modules)))"""
    run = bare_python(["-c", entry])
    imported = set(run.stdout.split())
    assert {"extraconfig.backdoor.native", "extraconfig.virtio"} <= imported, run.stderr
    assert not HEAVY_ON_THE_VM_PATH & imported, sorted(HEAVY_ON_THE_VM_PATH & imported)


# The modules a VM's agent loads for its steps before the launch that a plain process
# does not (system mounts, cgroups, the containerfs disk, hostname and /etc files, the
# output log's port). Their system calls go through tether/_linux.c: ctypes, ~38 ms of a
# cold boot under TCG, is among the heavy modules.
VM_STEP_MODULES = ("tether.system", "tether.cgroups", "tether.rootfs", "tether.volumes",
                   "tether.etcfiles", "tether.iolog", "extraconfig.virtio")


def test_the_vm_boot_steps_import_none_of_the_heavy_modules():
    """The VM-only steps' modules, loaded and their boot-time helpers called (a group's
    name, /etc/hosts' localhost check, the system calls of mounts, root resolution and
    the OOM watch), as python -S."""
    entry = f"""if True:
        import os, sys
        for name in {VM_STEP_MODULES!r}:
            __import__(name)
        from tether import cgroups, etcfiles, system
        from extraconfig import gotime, scalars    # a float field, an exit record's time
        assert scalars.parse_float("0.5") == 0.5
        assert gotime.parse_go("2024-01-02 03:04:05.5 +0100 CET").nanos == 500_000_000
        print(cgroups.group_name("a b"), etcfiles._ip_version("127.0.0.1"),
              etcfiles._ip_version("::1"))
        proc = os.open("/proc", os.O_RDONLY | os.O_CLOEXEC)
        assert system.filesystem_type(proc) == system.PROC_SUPER_MAGIC
        assert system.have_openat2() in (True, False)
        watch = system.inotify_init()
        system.inotify_rm_watch(watch, system.inotify_add_watch(watch, "/proc", 2))
        try:
            system.mount(None, "/nonexistent/target", "tmpfs")
        except OSError as err:
            print(err.filename)
        print(" ".join(sorted(sys.modules)))"""
    run = bare_python(["-c", entry])
    first, target, modules = run.stdout.splitlines()
    assert first == "session-a_b 4 6"
    assert target == "/nonexistent/target"
    imported = set(modules.split())
    assert set(VM_STEP_MODULES) <= imported
    assert not HEAVY_ON_THE_VM_PATH & imported, sorted(HEAVY_ON_THE_VM_PATH & imported)


def test_a_restart_reads_its_last_runs_results_without_the_heavy_modules(tmp_path):
    """A VM restarted with its guestinfo reads what its last run wrote back (exit records
    with their times, `started`): still none of the heavy modules (re for the times)."""
    primary = session_config("p" * 12, ["/bin/true"])
    vmx = write_config(executor_config(primary), str(tmp_path))
    image_entry(tmp_path, AGENT_ENTRY, "--no-attach", importtime=False, vmx=vmx)
    assert "exitlogs" in open(vmx).read()          # the last run's records are there
    imported = imported_before_the_primary_runs(tmp_path, "--no-attach", vmx=vmx)
    assert "extraconfig.codec" in imported
    assert not HEAVY_AT_STARTUP & set(imported), sorted(HEAVY_AT_STARTUP & set(imported))


# C extensions, each a shared object to dlopen (~0.15-0.25 ms on a fresh process), that the
# agent needs only once its primary runs: the loop's epoll and timer heap come with its
# first fd, timer or run; the child's failure report packs its errno without struct;
# base64 comes with the first []byte value; fcntl widens the output pipes after the fork.
LOADED_AFTER_THE_EXEC = ["_heapq", "_struct", "binascii", "fcntl", "select", "struct"]


def test_the_shared_objects_the_loop_and_the_launch_need_load_after_the_primarys_exec(
        tmp_path):
    """Precisely at the exec: Session._fork returns once the child has exec'd (its
    close-on-exec error pipe reads EOF); what is loaded then was loaded before it."""
    entry = """if True:
        import sys
        from tether import sessions
        from tether.agentcli import main
        fork = sessions.Session._fork
        at_exec = []
        def watched(spec, release=None):
            pid = fork(spec, release)
            at_exec.append(set(sys.modules))
            return pid
        sessions.Session._fork = staticmethod(watched)
        code = main(sys.argv[1:-%d])
        print("launched" if at_exec else "no launch", code)
        print(" ".join(sorted(m for m in sys.argv[-%d:] if at_exec and m in at_exec[0])))
    """ % (len(LOADED_AFTER_THE_EXEC), len(LOADED_AFTER_THE_EXEC))
    out = image_entry(tmp_path, entry, "--no-attach", *LOADED_AFTER_THE_EXEC,
                      importtime=False).stdout.splitlines()
    assert out[0] == "launched 0", out       # the check saw the launch...
    assert out[1:] == [""], out[1:]          # ...and none of these loaded before it


def test_the_garbage_collector_waits_for_the_launch(tmp_path):
    """agentcli.main pauses the cyclic GC; Agent.run enables it once the sessions launch."""
    entry = """if True:
        import gc, sys
        from tether import agent
        from tether.agentcli import main
        seen = {}
        launch = agent.Agent.launch_sessions
        def watched(self):
            seen["at launch"] = gc.isenabled()
            launch(self)
        agent.Agent.launch_sessions = watched
        code = main(sys.argv[1:])
        print("gc", seen["at launch"], gc.isenabled())
        sys.exit(code)"""
    run = image_entry(tmp_path, entry, "--no-attach", importtime=False)
    assert run.stdout.split()[-3:] == ["gc", "False", "True"], run.stdout


def test_the_run_mode_is_decided_in_one_place():
    hits = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "tether").rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if "getpid() == 1" in line]
    assert len(hits) == 1, hits
    from tether.agent import RunMode
    assert RunMode.detect(sandbox=True) is RunMode.SANDBOX
    assert RunMode.detect() is RunMode.PROCESS            # pytest is not PID 1
    assert [m for m in RunMode if m.owns_machine] == [RunMode.VM]
    assert [m for m in RunMode if not m.owns_namespaces] == [RunMode.PROCESS]


def test_architecture_md_names_every_module():
    """docs/architecture.md gives each module its one-sentence job: a new module needs
    its row (extraconfig's backdoor package is one row)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = []
    for name, path in _modules().items():
        if path.name in ("__init__.py", "__main__.py") and name not in ("tether.network",):
            continue
        if name.startswith("extraconfig.backdoor."):
            name = "extraconfig.backdoor"
            shown = "extraconfig/backdoor/"
        else:
            shown = str(path.relative_to(REPO))
        if f"`{shown}`" not in text:
            missing.append(shown)
    assert not missing, f"not in docs/architecture.md: {sorted(set(missing))}"


# -- test hygiene ---------------------------------------------------------------------------
SKIP_OWNERS = ("helpers.py", "conftest.py")     # where skips are declared and judged
PLAIN_SKIPS = {"skip", "skipif", "importorskip"}


def plain_skips(source: str, filename: str = "<test>") -> list[str]:
    """Where a test module imports from conftest or skips without saying why in the
    helpers' terms (pytest.skip, pytest.mark.skip/skipif, pytest.importorskip): each as
    `line: what`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name == "conftest"]
        elif isinstance(node, ast.ImportFrom):
            if node.module == "conftest":
                found.append(f"{node.lineno}: from conftest import ...")
            elif node.module in ("pytest", "pytest.mark"):
                found += [f"{node.lineno}: from {node.module} import {a.name}"
                          for a in node.names if a.name in PLAIN_SKIPS]
        elif isinstance(node, ast.Attribute) and node.attr in PLAIN_SKIPS:
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in ("pytest", "mark"):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda hit: int(hit.split(":")[0]))


def test_the_skip_check_sees_each_plain_skip():
    source = "\n".join([
        "import pytest", "import conftest", "from conftest import image_dir",
        "from pytest import importorskip",
        "m = pytest.importorskip('x')",
        "@pytest.mark.skipif(True, reason='r')", "def test_a(): pytest.skip('no')",
        "@pytest.mark.skip", "def test_b(): pass",
        "def test_c(): helpers.missing('tool x', 'why'); reader.skip()",
    ])
    assert [hit.split(":")[0] for hit in plain_skips(source)] == \
        ["2", "3", "4", "5", "6", "7", "8"], plain_skips(source)


def test_tests_skip_only_through_the_helpers_and_never_import_conftest():
    """A missing facility goes through tests/helpers.py (require_root, require_tool,
    require_namespaces, require_module, missing, not_applicable), which strict mode judges;
    a plain skip would pass CI unseen. Fixtures come from conftest by name, never by import."""
    found = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path.parent == REPO / "tests" and path.name in SKIP_OWNERS:
            continue
        hits = plain_skips(path.read_text(), str(path))
        if hits:
            found[str(path.relative_to(REPO))] = hits
    assert not found, found
