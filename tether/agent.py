"""The agent: PID 1 of a container VM (or of the sandbox's namespaces), top to bottom.

    system setup [-> wait for the host: a VM template] -> decode config -> container root
    -> hostname -> networks -> volumes
    -> launch sessions -> attach servers (before the launch if a session has RunBlock)
    -> serve until the primary exits
    -> stop the other sessions -> flush write-back -> sync -> power off (VM) or exit

Every step runs under a guard: an exception is logged with its traceback and the agent
goes on (a step without which nothing can run ends in a clean stop instead). PID 1
never ends with a traceback.

Debug hook, for tests only: the environment variable TETHER_FAILPOINTS, a comma list
of step names (see STEPS), makes those steps raise an injected error.
"""
from __future__ import annotations

import gc
import os
import sys

from tether import boottime, signals
from tether.console import (SECRETS_DEBUG_LEVEL, clip, console, env_debug_level,
                            escape_unprintable, write_console)
from tether.log import DEBUG, INFO, get_logger, set_level
from tether.symbols import Symbols
from tether.writeback import CONFIG_ERROR_KEY

log = get_logger("tether.agent")

FAILPOINTS_ENV = "TETHER_FAILPOINTS"
STEPS = ("signals", "system", "cgroups", "template", "config", "rootfs", "hostname", "networks",
         "volumes", "attach", "vic-attach", "toolbox", "sessions", "reload", "shutdown")
# What the sessions cannot run without: at boot, a failure in one of these steps is the
# launch error (every session's `started` carries it, none runs, exit 125). After the
# launch (a reload) the same failure is logged and the sessions go on.
PREREQUISITE_STEPS = ("networks", "volumes")
DEFAULT_STOP_GRACE = 10.0
EXIT_LAUNCH_ERROR = 125   # the agent could not set the container up (docker run's 125)
CONTAINERFS_LABEL = "containerfs"
CONTAINERFS_MOUNT = "/mnt/containerfs"
STATE_DIR = "/run/tether"
CONSOLE_DRAIN = 2.0       # seconds the last log lines get to reach a slow console


class InjectedFailure(RuntimeError):
    pass


class StepFailed(RuntimeError):
    """A step failed for a reason its message gives in full (and which was reported
    where the host reads it): logged without a traceback."""


class RunMode(Symbols):
    """Where the agent runs, decided once at entry (`detect`), and what it may touch."""
    VM = "vm"              # PID 1 of a container VM: the whole machine is ours
    SANDBOX = "sandbox"    # PID 1 of `tether sandbox`'s namespaces on a host
    PROCESS = "process"    # a plain process on a host (tests, debugging): touch nothing

    @classmethod
    def detect(cls, sandbox: bool = False) -> "RunMode":
        if sandbox:
            return cls.SANDBOX
        return cls.VM if os.getpid() == 1 else cls.PROCESS

    @property
    def owns_machine(self) -> bool:
        """System mounts, the containerfs disk, the VM's serial and virtio ports, power."""
        return self is RunMode.VM

    @property
    def owns_namespaces(self) -> bool:
        """Hostname, /etc files, networks and volumes: only PID 1 of a VM or of the
        sandbox's namespaces touches them, never a host the agent merely runs on."""
        return self is not RunMode.PROCESS


class Options:
    """How this agent runs; plain data filled from the command line or the sandbox."""

    def __init__(self, *, mode: RunMode | None = None, rootfs: str | None = None,
                 output_log: str | None = None, attach_endpoints: list[str] | None = None,
                 state_dir: str = STATE_DIR,
                 stop_grace: float = DEFAULT_STOP_GRACE, echo_output: bool | None = None,
                 before_reload=None, vic_attach: list[str] | None = None,
                 vic_options: dict | None = None, cgroups: bool | None = None,
                 keep_execs: int | None = None, output_log_max: int | None = None,
                 template: bool | None = None):
        self.mode = mode or RunMode.detect()
        self.rootfs = rootfs
        self.output_log = output_log
        self.attach_endpoints = attach_endpoints
        self.state_dir = state_dir
        self.stop_grace = stop_grace
        self.echo_output = echo_output     # None: always in the sandbox, else at debug >= 1
        self.before_reload = before_reload  # called on SIGHUP before the config is re-read
        self.vic_attach = vic_attach        # VIC attach endpoints; None: VIC's serial layout
        self.vic_options = vic_options      # {"handshake": ..., "auth": ...}
        self.cgroups = cgroups              # None: as PID 1 of a VM; the sandbox says
        self.keep_execs = keep_execs        # finished exec'd sessions kept (None: default)
        self.output_log_max = output_log_max  # a file output log rotates past it (bytes)
        # Wait for the host's resume answer before the config (tether/resume.py). None:
        # as the kernel argument tether.template=1 says, read only as PID 1 of a VM.
        # True elsewhere is for tests, which replace the clock and RNG actions.
        self.template = template


class Agent:
    """PID 1's lifecycle (`run`). To its subsystems (the attach server, the toolbox) it
    is only the narrow `Host` of tether/host.py: loop, key, root, sessions, primary,
    exec_session, request_stop, stop_session."""

    def __init__(self, transport, options: Options):
        from tether.loop import Loop
        from tether.reaper import Reaper
        from tether.supervisor import KEEP_EXECS, Supervisor
        self.transport = transport
        self.options = options
        self.loop = Loop()
        console().attach_loop(self.loop)   # the console is flushed when it can take more
        self.reaper = Reaper(self.loop)
        self.supervisor = Supervisor(self.loop, create=self._new_session,
                                     publish=self._publish_session,
                                     request_stop=self.request_stop,
                                     stop_grace=options.stop_grace,
                                     remove=self._remove_session,
                                     keep_execs=KEEP_EXECS if options.keep_execs is None
                                     else options.keep_execs)
        self.config = None
        self.root = options.rootfs or "/"
        self.key: bytes | None = None
        self.stopping = False
        self.stop_reason = ""
        self.errors: list[str] = []
        self._failpoints = {p.strip() for p in os.environ.get(FAILPOINTS_ENV, "").split(",")
                            if p.strip()}
        self._writeback = None
        self._log_port = None
        self._attach_server = None
        self._vic_attach = None
        self._toolbox = None
        self._network = None
        self._firewall = None
        self.launch_error = ""   # set before launch: every session fails with this text
        self.launched = False    # launch_sessions ran: prerequisites no longer gate it
        self._invalid_ids: dict[str, str] = {}   # session names that cannot be IDs: why
        self._etc = None
        self._mounted_volumes: set[str] = set()
        self._reload_worker = None   # a reload's volume mounts in progress
        self._reload_again = False   # a SIGHUP came meanwhile
        # why the sessions new in this reload are not launched: its networks or volumes
        # failed (the launch gate, for what the reload added)
        self._reload_refusal: list[str] = []
        self._last_error = ""        # the text of the last step that failed
        self.resumed_at: float | None = None   # boot clock of the resume answer (templates)
        self.mode = options.mode
        from tether.isolation import Isolation
        # cgroups (step "cgroups"), privileges, hooks
        self.isolation = Isolation(sandboxed=self.mode is RunMode.SANDBOX)

    @property
    def sessions(self) -> dict:
        return self.supervisor.sessions

    @property
    def primary(self):
        """The primary session (its ID is the executor's), once launched."""
        return self.sessions.get(self.config.id) if self.config is not None else None

    def stop_session(self, session, *, grace: float | None = None,
                     kill_wait: float | None = None, done=None) -> None:
        """Stop one session with its stop signal, SIGKILL after the grace (the toolbox's
        OS_Halt); `done(stopped)` runs on the loop at the end."""
        self.supervisor.stop_session(session, grace=grace, kill_wait=kill_wait, done=done)

    # -- the guard ---------------------------------------------------------------------
    def guarded(self, step: str, action, *args) -> bool:
        """Run one step; an exception is logged and reported, never raised."""
        try:
            if step in self._failpoints:
                raise InjectedFailure(f"injected failure in step {step!r} ({FAILPOINTS_ENV})")
            action(*args)
            return True
        except Exception as err:   # noqa: BLE001 - PID 1 must not die of one step
            self.errors.append(f"{step}: {err}")
            self._last_error = str(err)
            if step in PREREQUISITE_STEPS and not self.launched:
                log.error("step %s failed: %s; nothing will be launched", step, err)
                log.debug("step %s failed", step, exc_info=True)
                self.refuse_launch(str(err))
            else:
                log.error("step %s failed: %s; carrying on", step, err,
                          exc_info=not isinstance(err, StepFailed))
            return False
        finally:
            boottime.mark(step)

    def refuse_launch(self, reason: str) -> None:
        """The launch gate: once any reason is given before the launch, no session runs;
        each session's `started` carries every reason, in order."""
        self.launch_error = f"{self.launch_error}; {reason}" if self.launch_error else reason

    # -- the lifecycle -----------------------------------------------------------------
    def run(self) -> int:
        if not self.guarded("signals", self.install_handlers):
            log.error("cannot reap children or take signals: stopping")
            self.guarded("shutdown", self.shutdown)
            return 1
        self.guarded("system", self.setup_system)
        self.guarded("cgroups", self.setup_cgroups)
        if self.template_boot():   # everything above is the same for any config
            self.guarded("template", self.wait_for_resume)
            if self.resumed_at is not None:
                boottime.resumed(self.resumed_at)   # the marks so far: the template's boot
        if not self.guarded("config", self.load_config):
            log.error("no usable configuration: nothing to run; stopping")
            self.guarded("shutdown", self.shutdown)
            return 1
        self.guarded("rootfs", self.prepare_container_root)   # before /etc files go into it
        self.guarded("hostname", self.set_hostname)
        self.guarded("networks", self.apply_networks)
        self.guarded("volumes", self.mount_volumes)
        # The attach servers start after the launch, so the primary's exec does not wait
        # for them (a client that comes later is replayed the output from its first
        # byte); before it only when a session's RunBlock needs an attach to release it.
        serve_first = self.run_blocked()
        if serve_first:
            self.start_servers()
        if self.config.networks:
            self.publish_all()   # assigned addresses; sessions publish their own on launch
        launched = self.guarded("sessions", self.launch_sessions)
        if not launched:
            self.request_stop("the sessions could not be launched")
        gc.enable()   # agentcli.main paused it for the startup
        if not serve_first:
            self.start_servers()
        if launched and not self.launch_error:   # the sign that attach is ready, too
            log.info("serving %d session(s)", len(self.sessions))
        self.serve()
        self.guarded("shutdown", self.shutdown)
        return self.exit_code()

    def run_blocked(self) -> bool:
        """Whether a session to be launched waits for an attach (RunBlock)."""
        return any(cfg is not None and cfg.run_block
                   for cfg in (self.config.sessions or {}).values())

    def start_servers(self) -> None:
        """The msgpack attach server, VIC's attach and the toolbox, each under its guard."""
        self.guarded("attach", self.start_attach)
        self.guarded("vic-attach", self.start_vic_attach)
        self.guarded("toolbox", self.start_toolbox)

    def install_handlers(self) -> None:
        """The reaper and our signals: SIGTERM/SIGINT/SIGPWR stop, SIGHUP reloads. In a
        VM, SIGINT is also ctrl-alt-del (setup_system) and SIGPWR the power-fail signal."""
        self.reaper.start()
        for signum in (signals.SIGTERM, signals.SIGINT, signals.SIGPWR):
            self.loop.add_signal_handler(
                signum, lambda s=signum: self.request_stop(f"signal {signals.name(s)}"))
        self.loop.add_signal_handler(signals.SIGHUP, self.reload)

    def setup_system(self) -> None:
        from tether import system
        if self.mode.owns_machine:   # the sandbox brings its own
            mounted = system.mount_missing()
            if mounted:
                log.info("mounted %s", ", ".join(mounted))
            try:   # ctrl-alt-del (tether vm's graceful stop) becomes SIGINT: a stop
                system.disable_ctrl_alt_del()
            except OSError as err:
                log.warning("%s: ctrl-alt-del still resets the machine", err)
        else:
            system.set_child_subreaper()
        try:
            system.set_rlimits()
        except OSError as err:
            log.warning("%s (sessions keep the inherited limits)", err)
        if self.mode.owns_machine:
            system.link_mtab("/")
        self._open_output_log()

    def setup_cgroups(self) -> None:
        """Mount the cgroup filesystem and take our group for the sessions' groups: as
        PID 1 of a VM, or of the sandbox when it delegated a group to us."""
        wanted = self.options.cgroups
        if wanted is None:
            wanted = self.mode.owns_machine
        if not wanted:
            self.isolation.cgroups_problem = (
                "no cgroups: the agent manages them only as PID 1 of a VM or of "
                "`tether sandbox`")
            return
        from tether import cgroups
        elsewhere = cgroups.not_at_root()
        if elsewhere:
            self.isolation.cgroups_problem = f"no cgroups: {elsewhere}"
            log.info("cgroups: %s", elsewhere)
            return
        try:
            done = cgroups.mount_hierarchies()
            self.isolation.cgroups = cgroups.Cgroups.open(loop=self.loop)
        except (OSError, cgroups.CgroupError) as err:
            self.isolation.cgroups_problem = f"no cgroups: {err}"
            raise
        log.info("cgroups: %s; controllers: %s", done, self.isolation.cgroups.describe())

    def template_boot(self) -> bool:
        """Whether this boot makes a VM template (and may be restored from it)."""
        if self.options.template is not None:
            return self.options.template
        return self.mode.owns_machine and template_requested()

    def wait_for_resume(self) -> None:
        """A template boot's wait point (tether/resume.py, docs/agent.md): load what the
        later steps will, ask for `guestinfo.tether.resume` and wait for the answer
        without a time limit (the host saves the VM meanwhile; a restored VM goes on
        from here), then take its clock and seed. A host with no answer is told about;
        the boot goes on either way."""
        from tether import resume
        not_loaded = resume.preload()
        if not_loaded:
            log.warning("template: not loaded ahead (the steps that need them will say "
                        "more): %s", "; ".join(not_loaded))
        log.info("template: waiting for the host's answer to %s", resume.RESUME_KEY)
        console().drain(1.0)   # the template's lines go out in its own run, not in each clone
        value = resume.ask(self.transport)
        at = boottime.now()
        if value is None:
            log.warning("template boot (kernel argument %s=1), but the host has no answer "
                        "to %s (a host without VM templates, or vSphere): nothing was "
                        "saved, and this boot goes on as a plain one; leave the argument "
                        "out where the host does not use templates", resume.TEMPLATE_ARG,
                        resume.RESUME_KEY)
            return
        answer = resume.parse_resume(value)
        if not answer.cold:      # a clone: its boot was the template's
            self.resumed_at = at
        done, failed = resume.apply(answer)
        wrong = answer.problems + resume.missing_fields(answer)
        if wrong:
            log.warning("the host's answer to %s leaves this VM part of its template's "
                        "state (the host's side: tether/vmtemplate.py): %s",
                        resume.RESUME_KEY, "; ".join(wrong))
        log.info("%s: %s", "saved as a VM template" if answer.cold else
                 "resumed from a VM template", ", ".join(done) or "nothing refreshed")
        if failed:
            raise StepFailed("; ".join(failed))

    def _open_output_log(self) -> None:
        from tether import system
        path = self.options.output_log
        if path is None and self.mode.owns_machine:
            from extraconfig.virtio import find_port
            path = find_port("org.tether.output") or (
                "/dev/ttyS2" if os.path.exists("/dev/ttyS2") else None)
        if path is None:
            return
        from tether.iolog import LogPort
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_APPEND
        try:
            fd = os.open(path, flags | (os.O_CREAT if not path.startswith("/dev/") else 0),
                         0o644)
        except OSError as err:
            log.warning("no session output log: cannot open %s: %s", path, err.strerror)
            return
        if os.isatty(fd):
            try:
                system.set_raw_tty(fd)
            except OSError as err:
                log.warning("output log %s: %s; leaving the line as it is", path, err.strerror)
        from tether.iolog import OUTPUT_LOG_MAX
        limit = self.options.output_log_max or OUTPUT_LOG_MAX
        self._log_port = LogPort(fd, self.loop, path=path, max_bytes=limit)
        log.info("session output log: %s", path)

    def load_config(self) -> None:
        from tether.writeback import WriteBack
        self._writeback = WriteBack(self.transport)
        self.config = self._decode()
        self.key = self.config.key
        if self.config.id in self._invalid_ids:   # the primary cannot be run
            self.refuse_launch(self._invalid_ids[self.config.id])
        self.set_log_level()
        self.scrub_secrets(self.config)
        log.info("configuration for %s: %d session(s)",
                 escape_unprintable(self.config.common.id or "(no ID)"),
                 len([s for s in (self.config.sessions or {}).values() if s is not None]))

    def scrub_secrets(self, config) -> None:
        """Empty the secret keys we have just read, where the transport lets any process
        in the guest read them back (the VMware backdoor: on unless the config says no)."""
        from tether.scrub import scrub_secrets, should_scrub
        if should_scrub(config, self.transport):
            scrub_secrets(self.transport, config)

    def _scrub_undecoded(self) -> None:
        """A config that does not decode has no secret keys to list, but the Key's
        place is fixed: it is emptied all the same (under the live config's setting, at
        boot the transport's default), so a new Key does not wait in guestinfo for a
        config that decodes."""
        from tether.config import ExecutorConfig
        from tether.scrub import key_key, scrub_secrets, should_scrub
        if should_scrub(self.config or ExecutorConfig(), self.transport):
            scrub_secrets(self.transport, None, [key_key()])

    def _decode(self, known=()):
        """The config from guestinfo (ours and VIC's keys), its sessions named
        (`name_sessions`). A DecodeError is answered before it is raised: in `started` of
        every session the key list names (but those in `known`, already running) and in
        our executor-level error key. Sessions whose names cannot be IDs are left out,
        logged, and named in that key."""
        from extraconfig.codec import DecodeError
        from extraconfig.transport import GuestSource, snapshot
        from tether.config import name_sessions
        from tether.extension import decode_config
        try:
            # in one request where the transport can (our virtio port): else key by key
            source = GuestSource(snapshot(self.transport) or self.transport)
            config = decode_config(source)
        except DecodeError as err:
            self._scrub_undecoded()
            answered = self._writeback.config_error(f"configuration error: {err}", known)
            raise StepFailed(f"the configuration cannot be decoded: {err} (answered in "
                             f"{len(answered)} session(s) and {CONFIG_ERROR_KEY})") from None
        invalid = name_sessions(config)
        for why in invalid.values():
            log.error("%s: the session is not run", why)
        self._invalid_ids.update(invalid)
        self._writeback.set_config_error(
            "; ".join(f"configuration error: {why}" for why in invalid.values()))
        return config

    def set_log_level(self) -> None:
        """The log level, and the debug check that only the loop thread changes the config
        (on at debug level 1 and above, and under `python -X dev`)."""
        from tether.config import enforce_loop_ownership
        level = self.debug_level()
        set_level(DEBUG if level >= 1 else INFO)
        checked = level >= 1 or sys.flags.dev_mode
        enforce_loop_ownership(self.loop.thread_id if checked else None)
        if level >= 1:
            for line in dump_config(self.config, redact=level < SECRETS_DEBUG_LEVEL):
                log.debug("config %s", line)

    def debug_level(self) -> int:
        """diagnostics.debug, with the kernel's tether.debug as a floor."""
        configured = self.config.diagnostics.debug_level if self.config is not None else 0
        return max(configured, env_debug_level())

    def set_hostname(self) -> None:
        from tether import system
        name = hostname_for(self.config.common.id)
        if not self.mode.owns_namespaces:
            log.info("not PID 1: hostname and /etc files left alone")
            return
        if not name:
            if self.config.common.id:
                log.warning("executor ID %s cannot be a hostname (letters, digits, '-', "
                            "'.', '_'): hostname left as it is", clip(self.config.common.id))
            else:
                log.info("no executor ID: hostname left as it is")
            return
        system.set_hostname(name)
        etc = self._etc_files()
        aliases = [self.config.common.name] if self.config.common.name else []
        etc.set_hostname(name, aliases)
        etc.flush()
        log.info("hostname %s", name)

    def _etc_files(self):
        if self._etc is None:
            from tether.etcfiles import EtcFiles
            os.makedirs(self.options.state_dir, exist_ok=True)
            self._etc = EtcFiles(self.root, self.options.state_dir)
        return self._etc

    def prepare_container_root(self) -> None:
        if self.options.rootfs is None and self.mode.owns_machine:
            self.root = self._mount_containerfs() or "/"
        if self.root != "/":
            from tether import rootfs
            log.info("container root %s", self.root)
            # The sandbox's root gets a /dev of its own, never the host's.
            rootfs.bind_system_dirs(self.root, fresh_dev=self.mode is RunMode.SANDBOX)

    def _mount_containerfs(self) -> str | None:
        from tether.volumes import find_device_by_label, probe
        try:
            device = find_device_by_label(CONTAINERFS_LABEL, 0.5)
        except Exception as err:   # noqa: BLE001
            log.info("no %s disk (%s): sessions run in /", CONTAINERFS_LABEL, err)
            return None
        if not device:
            return None
        from tether import system
        found = probe(device)
        os.makedirs(CONTAINERFS_MOUNT, exist_ok=True)
        system.mount(device, CONTAINERFS_MOUNT, found[0] if found else "ext4")
        return CONTAINERFS_MOUNT

    def apply_networks(self) -> None:
        """Configure what changed (NetworkManager keeps, per endpoint, what it applied)."""
        networks = self.config.networks
        if not networks:
            return
        if not self.mode.owns_namespaces:
            log.warning("not PID 1: the configured networks are not applied")
            return
        from tether.network.firewall import Firewall, FirewallError, apply_networks
        if self._network is None:
            from tether.network import NetworkManager
            self._network = NetworkManager(
                self.config, etc=self._etc_files(), publish=self.publish_all, log=log,
                hostname=hostname_for(self.config.common.id),
                post=self.loop.call_soon_threadsafe)
            self._firewall = Firewall()
        # at boot the sessions wait for the leases; later (a reload) the loop must not
        self._network.wait_for_leases = not self.sessions
        try:
            apply_networks(self._firewall, self._network, networks)
        except FirewallError as err:
            raise FirewallError(f"firewall: {err}") from None

    def mount_volumes(self) -> None:
        """At boot: mount the volumes, in place (nothing runs yet)."""
        new = self._new_volumes()
        if not new:
            return
        from tether.volumes import mount_volumes
        mount_volumes(new, self.root, **self._volume_dirs())
        self._mounted_volumes.update(new)

    def _volume_dirs(self) -> dict[str, str]:
        """Where volumes are mounted before they are bound into the root (tether/volumes.py):
        labelled disks (`by-label/LABEL`) and scratch mounts, under the agent's state
        directory (in `tether sandbox` a private tmpfs, never a directory of the host's)."""
        state = self.options.state_dir
        return {"staging_dir": os.path.join(state, "by-label"),
                "scratch_dir": os.path.join(state, "mounts")}

    def _new_volumes(self) -> dict:
        mounts = self.config.mounts
        if not mounts:
            return {}
        if not self.mode.owns_namespaces:
            log.warning("not PID 1: the configured volumes are not mounted")
            return {}
        return {k: v for k, v in mounts.items() if k not in self._mounted_volumes}

    def _mount_off_loop(self, then) -> None:
        """On reload: mount the new volumes on a worker thread (a disk that is slow to
        appear, an NFS server that does not answer, must not hold the loop), then
        `then()` on the loop. The worker gets copies of the specs and touches nothing
        else; the loop records what it mounted."""
        new = self._new_volumes()
        if not new:
            then()
            return
        import copy
        import threading
        from tether.volumes import mount_volumes
        specs, root, dirs = copy.deepcopy(new), self.root, self._volume_dirs()
        log.info("reload: mounting %s", ", ".join(sorted(specs)))

        def work() -> None:
            error = None
            try:
                mount_volumes(specs, root, **dirs)
            except Exception as err:   # noqa: BLE001 - reported on the loop
                error = err
            self.loop.call_soon_threadsafe(lambda: self._volumes_mounted(specs, error, then))
        self._reload_worker = threading.Thread(target=work, name="reload-volumes",
                                               daemon=True)
        self._reload_worker.start()

    def _volumes_mounted(self, specs: dict, error, then) -> None:
        self._reload_worker = None
        if error is None:
            self._mounted_volumes.update(specs)
        else:
            self.errors.append(f"volumes: {error}")
            self._reload_refusal.append(str(error))
            log.error("step volumes failed: %s; carrying on", error)
        then()
        if self._reload_again and not self.stopping:
            self._reload_again = False
            self.reload()

    def start_attach(self) -> None:
        endpoints = self.options.attach_endpoints
        if endpoints is None:
            endpoints = []
            if self.mode.owns_machine:   # a VM's ports, not a host's
                from extraconfig.virtio import find_port
                if find_port("org.tether.attach"):
                    endpoints.append("port:org.tether.attach")
                if os.path.exists("/dev/vsock"):
                    endpoints.append("vsock:2377")
        if not endpoints:
            log.info("no attach endpoint")
            return
        try:
            from tether.attach.server import start_attach_server
        except ImportError as err:
            raise RuntimeError(f"attach is not available: {err}") from None
        self._attach_server = start_attach_server(self, endpoints)
        log.info("attach server on %s", ", ".join(endpoints))

    def start_vic_attach(self) -> None:
        """VIC's handshake + SSH attach (tether/attach/vic/layout.py decides where)."""
        from tether.attach.vic.layout import start_for_agent
        self._vic_attach = start_for_agent(
            self, endpoints=self.options.vic_attach, options=self.options.vic_options,
            in_vm=self.mode.owns_machine,
            transport_module=type(self.transport).__module__)

    def start_toolbox(self) -> None:
        """The VMX's TCLO duties, when guestinfo comes over the VMware backdoor."""
        if not type(self.transport).__module__.startswith("extraconfig.backdoor"):
            return   # no VMX to answer: do not even import it
        from tether.toolbox import start_toolbox_for
        self._toolbox = start_toolbox_for(self, self.transport)

    # -- sessions ------------------------------------------------------------------------
    def launch_sessions(self) -> None:
        self.launched = True
        if self.launch_error:
            log.error("nothing launched: %s", self.launch_error)
            for cfg in (self.config.sessions or {}).values():
                if cfg is not None:
                    self._fresh(cfg)
                    cfg.started = self.launch_error
            self.publish_all()
            self.request_stop("launch error")
            return
        for sid, cfg in sorted((self.config.sessions or {}).items()):
            if cfg is None or sid in self.sessions:
                continue
            self._fresh(cfg)
            self.supervisor.launch(cfg)
        if self.config.common.id and self.config.common.id not in self.sessions:
            log.warning("no primary session (ID %s): serving until told to stop",
                        escape_unprintable(self.config.common.id))

    @staticmethod
    def _fresh(cfg) -> None:
        """A new session starts fresh: what a previous boot wrote is history."""
        cfg.started = ""
        cfg.detail.stop_time = 0

    def _new_session(self, cfg, on_change):
        """The supervisor's factory: a Session wired to this agent's loop, reaper, root,
        output log and console."""
        from tether.sessions import Session
        self.isolation.config = self.config
        self.isolation.root = self.root
        echo = self.options.echo_output
        if echo is None:
            echo = self.mode is RunMode.SANDBOX or self.debug_level() >= 1
        return Session(cfg, loop=self.loop, reaper=self.reaper, root=self.root,
                       log_port=self._log_port, primary=cfg.common.id == self.config.id,
                       echo=write_console if echo else None, on_change=on_change,
                       on_unblock=self._publish_runblock_released,
                       isolation=self.isolation, debug_level=self.debug_level)

    def exec_session(self, cfg):
        """Start a new session (the attach server's exec)."""
        if self.stopping:
            raise ValueError("the agent is stopping: no new sessions")
        if self.config.sessions is None:
            self.config.sessions = {}
        # A configured session not launched yet (a reload between reading its config and
        # launching it) is taken as well as a running one: an exec must not replace it.
        if cfg.common.id in self.config.sessions or cfg.common.id in self.sessions:
            raise ValueError(f"session {cfg.common.id} already exists")
        self.config.sessions[cfg.common.id] = cfg
        self._fresh(cfg)
        return self.supervisor.launch(cfg, exec_=True)

    def _remove_session(self, session) -> None:
        """The supervisor let an old exec'd session go: out of the config and guestinfo."""
        if self.config.sessions is not None:
            self.config.sessions.pop(session.id, None)
        if self._writeback is not None:
            self._writeback.forget_session(session.config, session.id)

    def _publish_runblock_released(self, session) -> None:
        if self._writeback is not None:
            self._writeback.runblock_released(session.id)

    def _publish_session(self, session) -> None:
        boottime.mark(f"exec:{session.id}")     # the first one counts: launched, or failed
        if self._writeback is not None:
            self._writeback.session(self.config, session.config)
        if session.primary:
            boottime.write_back(self.transport, log)    # once, after the primary's started

    def publish_all(self) -> None:
        if self._writeback is not None and self.config is not None:
            self._writeback.everything(self.config)

    # -- reload and stop ---------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: re-read the config; launch new sessions, relaunch `restart` ones."""
        if self.stopping or self.config is None:
            log.info("reload ignored: %s", "stopping" if self.stopping else "no config yet")
            return
        if self._reload_worker is not None:
            self._reload_again = True
            log.info("reload: the last one is still mounting volumes; this one follows it")
            return
        log.info("reloading the configuration")
        self.guarded("reload", self._reload)

    def _reload(self) -> None:
        """The reload rule (tether/config.py): read-only fields from the host, read-write
        fields ours. Then apply what it changed: networks, new volumes, new sessions, and
        Restart sessions that are down. Nothing here holds the loop: a new DHCP endpoint's
        lease is applied when it comes, new volumes are mounted on a worker thread, and
        the sessions are launched once they are."""
        from tether.config import keep_executor_id, take_host_fields
        from tether.extension import take_host_extension
        if self.options.before_reload is not None:
            self.options.before_reload()
        fresh = self._decode(known=set(self.sessions))
        self.scrub_secrets(fresh)
        changed_id = keep_executor_id(self.config, fresh)
        if changed_id:
            log.warning("%s", changed_id)
        take_host_fields(self.config, fresh)
        take_host_extension(self.config, fresh)
        self.set_log_level()
        self._reload_refusal = []
        if not self.guarded("networks", self.apply_networks):
            self._reload_refusal.append(self._last_error)
        if not self.guarded("volumes", self._mount_off_loop, self._after_reload_mounts):
            self._reload_refusal.append(self._last_error)
            self._after_reload_mounts()

    def _after_reload_mounts(self) -> None:
        self.guarded("reload", self._reload_sessions)

    def _reload_sessions(self) -> None:
        """New sessions launched, `Restart` ones that are down relaunched. When the
        reload's networks or volumes failed, the new sessions are not launched (they
        would run without what the reload added for them): their `started` says why, as
        at boot, and the next reload tries them again. Running sessions go on."""
        refused = "; ".join(self._reload_refusal)
        self._reload_refusal = []
        for sid, cfg in sorted((self.config.sessions or {}).items()):
            if cfg is None:
                continue
            known = self.sessions.get(sid)
            if known is None and refused:
                log.error("reload: session %s not launched: %s", sid, refused)
                self._fresh(cfg)
                cfg.started = refused
            elif known is None:
                log.info("reload: new session %s", sid)
                self._fresh(cfg)
                self.supervisor.launch(cfg)
            elif self.supervisor.revive(known):
                log.info("reload: relaunched session %s", sid)
        if refused:
            self.publish_all()

    def request_stop(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        log.info("stopping: %s", reason)
        self.supervisor.stop_all()

    def _stopped(self) -> bool:
        return self.stopping and self.supervisor.all_stopped()

    def serve(self) -> None:
        self.loop.run_until(self._stopped)

    def shutdown(self) -> None:
        boottime.write_back(self.transport, log)    # if the primary never launched
        if self._toolbox is not None:
            self.guarded("shutdown", self._toolbox.stop)
        if self._attach_server is not None:
            self.guarded("shutdown", self._attach_server.close)
        if self._vic_attach is not None:
            self.guarded("shutdown", self._vic_attach.close)
        if self._network is not None:
            self.guarded("shutdown", self._network.stop)
        self.guarded("shutdown", self.isolation.close)
        self.publish_all()
        if self._log_port is not None:
            self._log_port.drain()
            if self._log_port.dropped:
                log.warning("session output log: %d bytes of output dropped",
                            self._log_port.dropped)
        if self.errors:
            log.warning("finished with %d error(s): %s", len(self.errors),
                        "; ".join(self.errors))
        log.info("stopped (%s); orphans reaped: %d", self.stop_reason or "no sessions",
                 self.reaper.orphans_reaped)
        console().detach_loop()
        console().drain(CONSOLE_DRAIN)
        os.sync()

    def exit_code(self) -> int:
        """125 when the agent refused to launch anything (a launch error); else the
        primary's: its exit code (128+N for signal N), 126/127 when it could not be
        launched, 0 when there is none or it never ran."""
        if self.launch_error:
            return EXIT_LAUNCH_ERROR
        primary = self.primary
        if primary is None:
            return 0
        failed = self.supervisor.launch_failure_code(primary)
        if failed is not None:
            return failed
        return primary.exit_code() if primary.launches else 0


# -- small helpers --------------------------------------------------------------------------
def template_requested(cmdline: str | None = None) -> bool:
    """Whether the kernel command line (`cmdline`, else the kernel's own) has
    `tether.template=1`."""
    from tether import resume, system
    args = None if cmdline is None else system.kernel_args(cmdline)
    return system.kernel_arg(resume.TEMPLATE_ARG, args) == "1"


HOSTNAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                "0123456789-._")


def hostname_for(executor_id: str) -> str:
    """The reference's rule: the first 12 characters of the ID; "" when those are not a
    hostname (a newline or a blank would reach the kernel's name and every reader of it)."""
    name = executor_id[:12]
    return name if HOSTNAME_CHARACTERS.issuperset(name) else ""


REDACTED = "<redacted>"
_SECRET_FIELDS = {"args", "env", "key"}


def dump_config(config, redact: bool = True, prefix: str = "") -> list[str]:
    """`path = value` lines for the debug log; args, env and key redacted when asked."""
    import dataclasses
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        path = f"{prefix}{field.name}"
        if redact and field.name in _SECRET_FIELDS and value:
            lines.append(f"{path} = {REDACTED}")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type) \
                and type(value).__module__.startswith("tether"):
            lines += dump_config(value, redact, path + ".")
        elif isinstance(value, dict):
            for key, item in value.items():
                if dataclasses.is_dataclass(item):
                    lines += dump_config(item, redact, f"{path}.{key}.")
                else:
                    lines.append(f"{path}.{key} = {item!r}")
        else:
            lines.append(f"{path} = {value!r}")
    return lines
