"""The container firewall with real traffic: the agent runs in `tether sandbox --netns A`,
joined by a veth pair to a peer namespace P where the test's client runs. The session is
a small server (TCP and UDP ports it echoes its port on) that also tries one connection
out to a listener in P. Unpublished ports are dropped, so "closed" means no answer within
a bounded timeout.
"""
from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import require_root, require_tool
from tether.network.firewall import (EndpointPolicy, FirewallError, lockdown_ruleset, policies,
                                     ruleset)
from tether.network.ports import TrustLevel, parse_port

pytestmark = pytest.mark.root

AGENT_V4, PEER_V4, PEER_IN_POOL = "10.78.0.2", "10.78.0.1", "10.78.0.50"
AGENT_V6, PEER_V6 = "fd78::2", "fd78::1"
POOL = {"first_ip": "10.78.0.40", "last_ip": "10.78.0.60"}
OUT_PORT = 7000            # the peer's listener the session connects out to
TIMEOUT = 1.5              # a dropped connection attempt gives up after this

SERVER = r'''
import json, socket, sys, threading, time
spec = json.loads(sys.argv[1])

def dual(kind):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return s

def tcp(port):
    s = dual(socket.SOCK_STREAM); s.bind(("::", port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.sendall(b"tcp %d\n" % port); c.close()

def udp(port):
    s = dual(socket.SOCK_DGRAM); s.bind(("::", port))
    while True:
        _, addr = s.recvfrom(100); s.sendto(b"udp %d" % port, addr)

for p in spec["tcp"]:
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
for p in spec["udp"]:
    threading.Thread(target=udp, args=(p,), daemon=True).start()
time.sleep(0.2)
print("firewall-server ready", flush=True)
try:
    with socket.create_connection((spec["out"], spec["out_port"]), timeout=spec["timeout"]) as c:
        result = "ok " + c.recv(20).decode().strip()
except OSError as err:
    result = type(err).__name__
print("connect-out:", result, flush=True)
while True:
    time.sleep(3600)
'''

CLIENT = r'''
import json, socket, sys
probes = json.loads(sys.argv[1])
out = []
for p in probes:
    family = socket.AF_INET6 if ":" in p["host"] else socket.AF_INET
    kind = socket.SOCK_STREAM if p["proto"] == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    s.settimeout(p["timeout"])
    try:
        if p.get("source"):
            s.bind((p["source"], 0))
        if kind == socket.SOCK_STREAM:
            s.connect((p["host"], p["port"]))
            out.append(s.recv(100).decode().strip())
        else:
            s.sendto(b"hi", (p["host"], p["port"]))
            out.append(s.recv(100).decode().strip())
    except socket.timeout:
        out.append("timeout")
    except OSError as err:
        out.append(type(err).__name__)
    finally:
        s.close()
print(json.dumps(out))
'''


def sh(*argv, check=True, timeout=60):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


class FirewallNet:
    """Namespaces A (agent, `eth0`) and P (peer, `peer0`) joined by a veth pair."""

    def __init__(self):
        tag = secrets.token_hex(3)
        self.agent, self.peer = f"tfa-{tag}", f"tfp-{tag}"
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []
        try:
            for ns in (self.agent, self.peer):
                sh("ip", "netns", "add", ns)
                self.created.append(ns)
            a, p = f"fa{tag}", f"fp{tag}"
            sh("ip", "link", "add", a, "netns", self.agent, "type", "veth",
               "peer", "name", p, "netns", self.peer)
            sh("ip", "-n", self.agent, "link", "set", a, "name", "eth0")
            sh("ip", "-n", self.peer, "link", "set", p, "name", "peer0")
            for ns in (self.agent, self.peer):
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            for addr in (f"{PEER_V4}/24", f"{PEER_IN_POOL}/24"):
                sh("ip", "-n", self.peer, "addr", "add", addr, "dev", "peer0")
            sh("ip", "-n", self.peer, "addr", "add", f"{PEER_V6}/64", "dev", "peer0", "nodad")
            sh("ip", "-n", self.peer, "link", "set", "peer0", "up")
            self.listen_out()
        except BaseException:
            self.close()
            raise

    def listen_out(self) -> None:
        """A listener in P for the session's outbound connection."""
        code = ("import socket\ns=socket.socket(socket.AF_INET6)\n"
                "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
                f"s.bind(('::', {OUT_PORT})); s.listen(8)\n"
                "while True:\n c,_=s.accept(); c.sendall(b'peer'); c.close()\n")
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.peer, sys.executable,
                                            "-c", code]))

    def probe(self, *probes: dict) -> list[str]:
        """Connect (TCP) or send-and-wait (UDP) from P; each gives the server's banner,
        'timeout' or an error name."""
        full = [{"proto": "tcp", "host": AGENT_V4, "timeout": TIMEOUT, **p} for p in probes]
        run = sh("ip", "netns", "exec", self.peer, sys.executable, "-c", CLIENT,
                 json.dumps(full), timeout=60 + TIMEOUT * len(full))
        return json.loads(run.stdout)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()


@pytest.fixture
def fwnet():
    require_root("network namespaces")
    require_tool("ip")
    net = FirewallNet()
    try:
        yield net
    finally:
        net.close()


def agent_config(tmp_path: Path, endpoints: dict, tcp=(), udp=()) -> dict:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    spec = {"tcp": list(tcp), "udp": list(udp), "out": PEER_V4, "out_port": OUT_PORT,
            "timeout": 3.0}
    for name, ep in endpoints.items():
        ep.setdefault("common", {"id": "eth0"})
        ep.setdefault("static", True)
    return {
        "common": {"id": "fw", "name": "fw"},
        "sessions": {"fw": {"cmd": {"path": sys.executable,
                                    "args": [sys.executable, str(script), json.dumps(spec)]}}},
        "networks": endpoints,
    }


def start_agent(sandbox, fwnet, config):
    box = sandbox.start(config, extra_args=["--netns", fwnet.agent])
    box.wait_for_log(r"firewall-server ready", timeout=60)
    return box


def connect_out(box) -> str:
    return box.wait_for_log(r"connect-out: ([^\n]+)", timeout=30)[0]


# -- the acceptance cases ----------------------------------------------------------------------
def test_published_ports_tcp_redirect_and_udp(sandbox, fwnet, tmp_path):
    config = agent_config(tmp_path, {"public": {
        "ip": f"{AGENT_V4}/24", "ports": ["8080/tcp", "9000:80/tcp", "5353/udp"]}},
        tcp=(8080, 8081, 80), udp=(5353, 5354))
    box = start_agent(sandbox, fwnet, config)
    assert fwnet.probe({"port": 8080}, {"port": 8081}, {"port": 9000},
                       {"proto": "udp", "port": 5353}, {"proto": "udp", "port": 5354}) == \
        ["tcp 8080", "timeout", "tcp 80", "udp 5353", "timeout"]
    assert connect_out(box) == "ok peer"          # published includes outbound


def test_published_pair_over_ipv6(sandbox, fwnet, tmp_path):
    config = agent_config(tmp_path, {"public6": {"ip": f"{AGENT_V6}/64", "ports": ["8080/tcp"]}},
                          tcp=(8080, 8081))
    start_agent(sandbox, fwnet, config)
    deadline = time.monotonic() + 10   # the agent's address may still be tentative (DAD)
    while fwnet.probe({"host": AGENT_V6, "port": 8080, "timeout": 0.5}) != ["tcp 8080"]:
        assert time.monotonic() < deadline, "IPv6 published port never answered"
    assert fwnet.probe({"host": AGENT_V6, "port": 8080},
                       {"host": AGENT_V6, "port": 8081}) == ["tcp 8080", "timeout"]


def test_closed_lets_nothing_in_or_out(sandbox, fwnet, tmp_path):
    config = agent_config(tmp_path, {"public": {
        "ip": f"{AGENT_V4}/24", "network": {"trust_level": "closed"}, "ports": ["8080/tcp"]}},
        tcp=(8080,))
    box = start_agent(sandbox, fwnet, config)
    assert fwnet.probe({"port": 8080}) == ["timeout"]
    assert connect_out(box) in ("TimeoutError", "timeout", "PermissionError")


def test_outbound_lets_nothing_in_but_connects_out(sandbox, fwnet, tmp_path):
    config = agent_config(tmp_path, {"public": {
        "ip": f"{AGENT_V4}/24", "network": {"trust_level": "outbound"}, "ports": ["8080/tcp"]}},
        tcp=(8080,))
    box = start_agent(sandbox, fwnet, config)
    assert fwnet.probe({"port": 8080}) == ["timeout"]
    assert connect_out(box) == "ok peer"


def test_peers_reach_unlisted_ports_from_the_pools_only(sandbox, fwnet, tmp_path):
    config = agent_config(tmp_path, {"public": {
        "ip": f"{AGENT_V4}/24", "network": {"trust_level": "peers", "pools": [POOL]}}},
        tcp=(8081,))
    start_agent(sandbox, fwnet, config)
    assert fwnet.probe({"port": 8081, "source": PEER_IN_POOL},
                       {"port": 8081, "source": PEER_V4}) == ["tcp 8081", "timeout"]


def test_open_accepts_everything(sandbox, fwnet, tmp_path):
    config = agent_config(tmp_path, {"public": {
        "ip": f"{AGENT_V4}/24", "network": {"trust_level": "open"}}}, tcp=(8081,))
    start_agent(sandbox, fwnet, config)
    assert fwnet.probe({"port": 8081}) == ["tcp 8081"]


RELOAD_PROBE = r'''
import json, socket, sys, threading, time
host, most_seconds = sys.argv[1], float(sys.argv[2])
stats = {"tcp 8080": 0, "tcp 8081": 0, "leaks": [], "udp_sent": 0, "last_8080": 0.0,
         "first_8081": None}
# Probe until the test closes our stdin (after the reload), however slow the machine is.
stopped = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stopped.set()), daemon=True).start()
deadline = time.monotonic() + most_seconds
running = lambda: not stopped.is_set() and time.monotonic() < deadline

def tcp_loop(port, tag):
    while running():
        try:
            with socket.create_connection((host, port), timeout=0.2) as c:
                got = c.recv(20).decode().strip()
            now = time.monotonic()
            if port == 8082:
                stats["leaks"].append(got)
            else:
                stats[got] = stats.get(got, 0) + 1
                if port == 8080: stats["last_8080"] = now
                elif stats["first_8081"] is None: stats["first_8081"] = now
        except OSError:
            pass

def udp_loop():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
    while running():
        s.sendto(b"x", (host, 6000)); stats["udp_sent"] += 1
        try:
            stats["leaks"].append(s.recv(100).decode())
        except BlockingIOError:
            pass
        time.sleep(0.001)

threads = [threading.Thread(target=tcp_loop, args=(p, p)) for p in (8080, 8081, 8082, 8082)]
threads.append(threading.Thread(target=udp_loop))
print("probing", flush=True)
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(stats), flush=True)
'''


def test_reload_replaces_the_rules_in_one_transaction_with_no_open_window(sandbox, fwnet,
                                                                          tmp_path):
    config = agent_config(tmp_path, {"public": {"ip": f"{AGENT_V4}/24", "ports": ["8080/tcp"]}},
                          tcp=(8080, 8081, 8082), udp=(6000,))
    box = start_agent(sandbox, fwnet, config)
    monitor = subprocess.Popen(["ip", "netns", "exec", fwnet.agent, "nft", "monitor"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fwnet.procs.append(monitor)
    probe = subprocess.Popen(["ip", "netns", "exec", fwnet.peer, sys.executable, "-c",
                              RELOAD_PROBE, AGENT_V4, "120"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    fwnet.procs.append(probe)
    try:
        assert probe.stdout.readline().strip() == "probing"
        time.sleep(1.5)
        config["networks"]["public"]["ports"] = ["8081/tcp"]
        Path(box.config_path).write_text(json.dumps(config))
        box.signal(signal.SIGHUP)
        box.wait_for_log(r"firewall: public on eth0: published; ports 8081/tcp", timeout=30)
        time.sleep(1.5)       # probe the new rules as long as the old ones were
        stats = json.loads(probe.communicate("", timeout=60)[0].splitlines()[-1])
    finally:
        time.sleep(0.3)
        monitor.terminate()
    events = monitor.communicate(timeout=10)[0]
    # nothing unpublished ever answered while the probes ran across the reload
    assert stats["leaks"] == [] and stats["udp_sent"] > 500, stats
    # 8080 answered before the reload and 8081 after it
    assert stats["tcp 8080"] > 0 and stats["tcp 8081"] > 0, stats
    assert stats["last_8080"] < stats["first_8081"], stats
    # the kernel saw one transaction: the table deleted and written again in one generation
    generations = re.findall(r"# new generation \d+", events)
    assert len(generations) == 1, events
    before = events.split(generations[0])[0]
    assert "delete table inet tether" in before and "add table inet tether" in before
    assert 'tcp dport 8081 accept comment "public: 8081/tcp"' in before


# -- errors --------------------------------------------------------------------------------
def test_bad_port_spec_is_a_launch_error(sandbox, tmp_path):
    config = agent_config(tmp_path, {"public": {
        "ip": f"{AGENT_V4}/24", "ports": ["8080/tcp", "80/tcpx"]}})
    result = sandbox.run(config, timeout=60)
    started = result.session("fw").started
    assert started == ("firewall: network public: port spec '80/tcpx': unknown protocol "
                       "'tcpx' (use tcp or udp)"), result
    assert result.returncode == 125, result
    assert "firewall-server ready" not in result.log


def test_refused_ruleset_keeps_the_old_one(tmp_path):
    """nftables refusing a batch changes nothing: the previous table stays as it was."""
    ns = f"tfr-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        good = [EndpointPolicy("web", "eth0", TrustLevel.PUBLISHED,
                               ports=(parse_port("8080/tcp"),))]
        bad = [EndpointPolicy("web", "x" * 20, TrustLevel.PUBLISHED)]   # > IFNAMSIZ
        code = textwrap.dedent("""
            import json, sys
            from tether.network.firewall import Firewall, FirewallError
            fw = Firewall()
            fw._run(json.loads(sys.argv[1]))
            try:
                fw._run(json.loads(sys.argv[2]))
            except FirewallError as err:
                print("refused:", err)
        """)
        run = sh("ip", "netns", "exec", ns, sys.executable, "-c", code,
                 json.dumps(ruleset(good)), json.dumps(ruleset(bad)))
        assert run.stdout.startswith("refused: nftables refused the ruleset:"), run
        listing = sh("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "tether").stdout
        assert 'tcp dport 8080 accept comment "web: 8080/tcp"' in listing
        assert "x" * 20 not in listing
    finally:
        sh("ip", "netns", "del", ns, check=False)


def test_a_network_name_of_any_text_does_not_break_the_ruleset(tmp_path):
    """A network's name is a guestinfo key: it may hold a NUL, a quote or a newline, and
    it goes into each rule's comment. nftables refused the whole ruleset over a NUL
    ('syntax error': a launch error no one could act on); comments show such text
    escaped."""
    ns = f"tfn-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        odd = [EndpointPolicy('we\x00b"\n\x1b[2J', "eth0", TrustLevel.PUBLISHED,
                              ports=(parse_port("8080/tcp"),))]
        code = textwrap.dedent("""
            import json, sys
            from tether.network.firewall import Firewall
            Firewall()._run(json.loads(sys.argv[1]))
        """)
        sh("ip", "netns", "exec", ns, sys.executable, "-c", code, json.dumps(ruleset(odd)))
        listing = sh("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "tether").stdout
        assert 'tcp dport 8080 accept comment "we\\x00b\'\\n\\x1b[2J: 8080/tcp"' in listing, listing
    finally:
        sh("ip", "netns", "del", ns, check=False)


# -- the ruleset as data ---------------------------------------------------------------------
def _rules(commands, chain):
    return [c["add"]["rule"] for c in commands
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def test_ruleset_starts_by_replacing_the_table_and_drops_by_default():
    commands = ruleset([])
    table = {"family": "inet", "name": "tether"}
    assert commands[:3] == [{"add": {"table": table}}, {"delete": {"table": table}},
                            {"add": {"table": table}}]
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in commands
              if "chain" in c.get("add", {})}
    assert {n: c["policy"] for n, c in chains.items()} == {
        "input": "drop", "output": "drop", "forward": "drop", "prerouting": "accept"}
    assert [r["comment"] for r in _rules(commands, "input")] == [
        "loopback", "IPv6 neighbour discovery"]


def test_dhcp_passes_unless_open_and_bridge_accepts_its_pools():
    from tether.jsonform import config_from_json
    cfg = config_from_json({"networks": {
        "dyn": {"network": {"trust_level": "closed"}},
        "dynopen": {"network": {"trust_level": "open"}},
        "br": {"network": {"type": "bridge", "pools": [
            {"first_ip": "172.16.0.10", "last_ip": "172.16.0.200"},
            {"first_ip": "fd00::10", "last_ip": "fd00::20"}]}, "static": True,
            "ip": "172.16.0.2/16"}}})
    found = policies(cfg.networks, {"dyn": "e1", "dynopen": "e2", "br": "e3"})
    comments = [r.get("comment") for r in _rules(ruleset(found), "input")]
    assert "dyn: DHCP" in comments and "dynopen: DHCP" not in comments
    assert "br: DHCP" not in comments        # static
    peers = [r for r in _rules(ruleset(found), "input") if r.get("comment") == "br: peers"]
    assert [r["expr"][1]["match"]["left"]["payload"]["protocol"] for r in peers] == ["ip", "ip6"]
    # an endpoint with no interface gets no rules (the policy drops its traffic)
    assert [p.name for p in policies(cfg.networks, {"br": "e3"})] == ["br"]


def test_lockdown_passes_only_loopback_nd_and_dhcp():
    comments = [r.get("comment") for r in _rules(lockdown_ruleset(), "input")]
    assert comments == ["loopback", "IPv6 neighbour discovery", "DHCP"]


def test_policies_refuse_a_bad_port_spec_before_anything_is_applied():
    from tether.jsonform import config_from_json
    cfg = config_from_json({"networks": {"web": {"ports": ["70000/tcp"]}}})
    with pytest.raises(FirewallError, match=r"network web: port spec '70000/tcp': port 70000"):
        policies(cfg.networks, {"web": "eth0"})
