"""`tether vm`'s host side against a hostile guest, without a VM.

A container that took PID 1 over, or a compromised agent, talks to the host process over
the guestinfo port, the serial console and the output port. Here a fake QEMU (a real
process, started by the real `Machine` with the real command line) connects to the host's
sockets as QEMU's chardevs do and runs a guest script on them: the host's port thread,
its store and its report are the real ones.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import textwrap
import threading
import time

import pytest

from extraconfig import calculate_key
from extraconfig.transport import parse_vmx
from tether import vm
from tether.jsonform import config_from_json

WAIT = 60.0     # a bound for the fake guest's steps on a busy machine; never asserted on

# The fake QEMU: connects to each chardev socket of the command line (the console and the
# virtio-serial ports, by port name), then runs the guest script with `ports` and the
# framing helpers, and exits (the guest "powers off").
FAKE_QEMU = r'''
import os, socket, struct, sys
argv = sys.argv[1:]
paths, names = {}, {}
for flag, value in zip(argv, argv[1:]):
    fields = dict(f.partition("=")[::2] for f in value.split(","))
    if flag == "-chardev" and "path" in fields and "server" not in fields:
        paths[fields["id"]] = fields["path"]
    elif flag == "-device" and value.startswith("virtserialport"):
        names[fields["chardev"]] = fields["name"]
ports = {}
for chardev, path in paths.items():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    ports[names.get(chardev, chardev)] = sock
guestinfo = ports.get("org.tether.guestinfo")

def send(text):
    data = text.encode("utf-8", "surrogateescape")
    guestinfo.sendall(struct.pack(">I", len(data)) + data)

def receive():
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = guestinfo.recv(n - len(data))
            if not chunk:
                raise EOFError("the host closed the guestinfo port")
            data += chunk
        return data
    (size,) = struct.unpack(">I", exactly(4))
    return exactly(size).decode("utf-8", "surrogateescape")

def request(text):
    send(text)
    return receive()

def say(text):
    ports["console"].sendall(text.encode() + b"\r\n")

exec(compile(open(os.environ["TETHER_FAKE_GUEST"]).read(), "guest", "exec"))
'''


def image(tmp_path):
    """An image directory with the files a direct boot names (the fake QEMU reads none)."""
    directory = tmp_path / "image"
    directory.mkdir()
    for name in ("vmlinux", "initrd.img", "root.ext4"):
        (directory / name).write_bytes(b"")
    return directory


def fake_qemu(tmp_path, monkeypatch, guest: str, name: str = "fake-qemu") -> str:
    """The fake QEMU as `bin/NAME`, running `guest` (Python, see FAKE_QEMU)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    qemu = bindir / name
    qemu.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    qemu.chmod(0o755)
    script = tmp_path / "guest.py"
    script.write_text(textwrap.dedent(guest))
    monkeypatch.setenv("TETHER_FAKE_GUEST", str(script))
    return str(qemu)


CONFIG = {"common": {"id": "p", "name": "p"},
          "sessions": {"p": {"cmd": {"path": "/bin/true", "args": ["/bin/true"]}}}}


def primary_keys() -> tuple[str, str]:
    config = config_from_json(CONFIG)
    return (calculate_key(config, ["Sessions", "p", "Started"]),
            calculate_key(config, ["Sessions", "p", "ExitStatus"]))


class Run:
    """A VmRun whose QEMU is the fake one; `finish()` once the guest script is done."""

    def __init__(self, tmp_path, monkeypatch, guest: str):
        self.run = vm.VmRun(config_from_json(CONFIG), str(image(tmp_path)),
                            workdir=str(tmp_path / "run"))
        self.run.spec.qemu = fake_qemu(tmp_path, monkeypatch, guest)
        self.machine = self.run.machine

    def __enter__(self):
        self.run.start()
        return self

    def __exit__(self, *exc):
        self.run.close(keep=True)

    def finish(self):
        return self.run.finish(WAIT)

    def console_until(self, marker: str) -> str:
        """The console as logged, once it holds `marker` (or WAIT has passed)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            text = self.machine.console_text()
            if marker in text:
                return text
            time.sleep(0.05)
        return self.machine.console_text()


# ---------------------------------------------------------------- the resume request

def test_only_the_first_resume_request_saves_a_template(tmp_path, monkeypatch):
    """The run that saves a VM template goes on as a normal boot: a container that asks
    for guestinfo.tether.resume again must not make the host save the VM once more (with
    this run's config, secrets and the container's own state in it) into the template
    every later run starts from. Only the agent's first request, before its config, is
    the template's; a later one is an ordinary read."""
    guest = """
        say("first: " + request("info-get guestinfo.tether.resume"))
        say("again: " + request("info-get guestinfo.tether.resume"))
    """
    run = Run(tmp_path, monkeypatch, guest)
    saves = []

    def on_resume():
        saves.append(time.monotonic())
        threading.Thread(target=run.machine.answer_resume, args=("clock=1 cold=1",),
                         daemon=True).start()
    run.machine.on_resume = on_resume
    with run:
        run.finish()
        console = run.machine.console_text()
    assert "first: 1 clock=1 cold=1" in console, console
    assert "again: 0 No value found" in console, console
    assert len(saves) == 1


# ---------------------------------------------------------------- the final map

def tether_vm(tmp_path, monkeypatch, guest: str, *args: str) -> int:
    """`tether vm`'s main() with the fake QEMU as qemu-system-x86_64 on PATH."""
    fake_qemu(tmp_path, monkeypatch, guest, name="qemu-system-x86_64")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    return vm.main([str(config), "--image", str(image(tmp_path)), "--timeout", str(WAIT),
                    *args])


def test_bytes_that_are_not_utf8_reach_the_final_map(tmp_path, monkeypatch, capsysbinary):
    """A value or key of bytes that are not UTF-8 (a guest writes what it likes): the
    final map is still written, with those bytes as they came, to --out and to stdout,
    and the primary's status is still the exit code."""
    started, status = primary_keys()
    guest = f"""
        for key, value in (("guestinfo.junk", "\\udcff\\udcfe"),
                           ("guestinfo.key\\udcc3", "x"),
                           ({started!r}, "true"), ({status!r}, "3")):
            assert request("info-set " + key + " " + value) == "1 ", key
    """
    out = tmp_path / "final.vmx"
    assert tether_vm(tmp_path, monkeypatch, guest, "--out", str(out)) == 3
    written = out.read_bytes()
    final = parse_vmx(written.decode("utf-8", "surrogateescape"))
    assert final["guestinfo.junk"] == "\udcff\udcfe"
    assert final["guestinfo.key\udcc3"] == "x"
    capsysbinary.readouterr()
    monkeypatch.chdir(tmp_path)
    os.rename(tmp_path / "image", tmp_path / "image.1")   # main() makes it again
    assert tether_vm(tmp_path, monkeypatch, guest) == 3
    assert capsysbinary.readouterr().out == written


# ---------------------------------------------------------------- guestinfo: replies not read

def test_a_reply_the_guest_does_not_read_does_not_stop_the_other_ports(tmp_path, monkeypatch):
    """One thread serves every port. A guest that asks for a large value and then does
    not read the reply (QEMU takes no more of it than the guest's port buffer) must not
    hold that thread in a blocking write: the console is still logged."""
    guest = """
        assert request("info-set guestinfo.big " + "x" * 900_000) == "1 "
        send("info-get guestinfo.big")          # and the reply is not read
        say("console still served")
        ports["console"].recv(1)                # the test's go
        assert receive() == "1 " + "x" * 900_000
        say("read at last")
    """
    with Run(tmp_path, monkeypatch, guest) as run:
        console = run.console_until("console still served")
        assert "console still served" in console
        run.machine.send_console(b"g")
        run.finish()
        assert "read at last" in run.machine.console_text()


def test_requests_sent_ahead_are_answered_as_the_guest_reads(tmp_path, monkeypatch):
    """One request at a time: a guest that sends hundreds of requests for a large value
    in one write, without reading, must not have the host build every reply at once
    (300 x 200 kB here; one 64 KiB read of such requests would be gigabytes). The host
    answers the next request once the last reply is taken, and they all arrive, in
    order, when the guest reads."""
    guest = """
        big = "y" * 200_000
        assert request("info-set guestinfo.big " + big) == "1 "
        guestinfo.sendall(b"".join(struct.pack(">I", 22) + b"info-get guestinfo.big"
                                   for _ in range(300)))
        say("sent")
        ports["console"].recv(1)
        replies = [receive() for _ in range(300)]
        say(f"read {sum(r == '1 ' + big for r in replies)} good replies")
    """
    with Run(tmp_path, monkeypatch, guest) as run:
        assert "sent" in run.console_until("sent")
        answered = run.machine.guestinfo.requests
        run.machine.send_console(b"g")
        run.finish()
        assert "read 300 good replies" in run.machine.console_text()
    # what fits in the socket's buffers, not the 301 requests
    assert answered < 20, answered


# ---------------------------------------------------------------- guestinfo: the store's bound

def test_the_guests_writes_are_bounded(tmp_path, monkeypatch):
    """A guest writing large values under ever new keys would grow the host's memory
    (and the final map) without end. Past the host's limit an info-set is refused with
    "0 REASON" (the agent's write-back logs a refused key and goes on); a smaller value in
    place of a larger one frees room again."""
    guest = """
        value = "v" * 1_000_000
        replies = [request(f"info-set guestinfo.flood{i} {value}") for i in range(20)]
        refused = sum(r.startswith("0 Too large") for r in replies)
        say(f"stored {replies.count('1 ')} refused {refused}")
        assert request("info-set guestinfo.flood0 small") == "1 "
        say("after freeing: " + request(f"info-set guestinfo.again {value[:500_000]}"))
    """
    with Run(tmp_path, monkeypatch, guest) as run:
        run.finish()
        console = run.machine.console_text()
        store = run.machine.guestinfo
    limit = vm.GUEST_WRITE_LIMIT
    assert f"stored {limit // 1_000_000} refused {20 - limit // 1_000_000}" in console, console
    assert "after freeing: 1 " in console, console
    assert store.guest_bytes <= limit
    assert sum(len(v) for k, v in store.data.items() if k.startswith("guestinfo.")) <= limit


def test_many_small_keys_are_bounded_as_large_values_are():
    store = vm.VmxGuestinfo({"guestinfo.host": "h" * 100}, guest_limit=1 << 20)
    stored = 0
    with pytest.raises(Exception, match="Too large"):
        for i in range(1 << 20):
            store.info_set(f"guestinfo.k{i}", "")
            stored += 1
    assert stored < (1 << 20) // vm.STORED_KEY_COST
    store.info_set("guestinfo.host", "")   # smaller than the host's own: always fits
    assert store.final_map()["guestinfo.host"] == ""


# ---------------------------------------------------------------- the console

def test_the_console_log_is_bounded_and_keeps_its_end(tmp_path, monkeypatch):
    """A guest writing to its serial console without end must not fill the host's disk
    (console.log) nor its memory (the console the result holds); the end of the console,
    where a failure shows, is what is kept."""
    guest = """
        line = b"z" * 1000 + b"\\r\\n"
        for _ in range(5000):                   # 5 MB
            ports["console"].sendall(line)
        say("THE END")
    """
    run = Run(tmp_path, monkeypatch, guest)
    run.machine.console_limit = 256 << 10
    with run:
        result = run.finish()
    logs = [tmp_path / "run" / "console.log", tmp_path / "run" / "console.log.1"]
    assert all(log.stat().st_size <= 256 << 10 for log in logs)
    assert result.console.endswith("z\nTHE END\n")
    assert len(result.console) <= 2 * (256 << 10) + 100
    dropped = 5000 * 1002 + len("THE END\r\n") - sum(log.stat().st_size for log in logs)
    assert result.console.startswith(f"[tether vm: the first {dropped} bytes of the console")


def test_the_session_output_log_is_bounded_and_each_file_reads_whole(tmp_path, monkeypatch):
    """output.log took every byte of the output port: a container printing without end
    filled the host's disk. Past its limit it moves to output.log.1 at the end of an
    entry, so `tether logs` reads each file whole, and the last entries are kept."""
    from tether import iolog
    entries = b"".join(iolog.encode_entry(b"%06d " % i + b"y" * 993,
                                          session="p" if i % 2 else None)
                       for i in range(3000))                       # about 3 MB
    blob = tmp_path / "entries.bin"
    blob.write_bytes(entries + iolog.encode_entry(b"THE END\n"))
    guest = f"""
        data = open({str(blob)!r}, "rb").read()
        for at in range(0, len(data), 7777):        # cut anywhere, as a port's reads are
            ports["org.tether.output"].sendall(data[at:at + 7777])
        say("done")
    """
    run = Run(tmp_path, monkeypatch, guest)
    run.machine.output_limit = 256 << 10
    with run:
        run.console_until("done")
        run.finish()
    logs = [tmp_path / "run" / "output.log.1", tmp_path / "run" / "output.log"]
    read = [list(iolog.parse(log.read_bytes())) for log in logs]   # FramingError if cut
    assert all(log.stat().st_size <= (256 << 10) + (64 << 10) for log in logs)
    assert read[-1][-1].data == b"THE END\n"
    numbers = [int(e.data[:6]) for e in read[0] + read[1][:-1]]
    assert numbers == list(range(numbers[0], 3000))      # the newest, in order, none cut


# ---------------------------------------------------------------- what reaches the user's terminal

def test_guest_text_in_the_launchers_messages_cannot_drive_the_terminal(tmp_path, monkeypatch,
                                                                         capsys):
    """`tether vm`'s own lines on stderr quote what the guest wrote (the primary's
    `started` error, the end of the console when the run failed). A guest's escape
    sequences there would reach the user's terminal unasked (retitle it, rewrite or
    hide lines, set the clipboard on some), and a carriage return or newline would let
    it forge a `tether vm:` line. They are shown escaped."""
    started, _ = primary_keys()
    evil = "no\x1b]0;owned\x07\x1b[2K\rtether vm: all good\nforged\x9b31m"
    guest = f"""
        ports["console"].sendall(b"boot\\x1b]52;c;cHduZWQ=\\x07 \\x1b[1A\\x1b[2Kclean\\r\\n")
        assert request("info-set {started} " + {evil!r}) == "1 "
    """
    assert tether_vm(tmp_path, monkeypatch, guest, "--out", str(tmp_path / "out.vmx")) == 127
    err = capsys.readouterr().err
    assert not any(c in err for c in "\x1b\x07\r\x9b"), repr(err)
    assert "tether vm: the primary did not start: no\\x1b]0;owned\\x07\\x1b[2K\\rtether vm: all " \
           "good\\nforged\\x9b31m\n" in err, err
    assert "boot\\x1b]52;c;cHduZWQ=\\x07 \\x1b[1A\\x1b[2Kclean\n" in err, err
