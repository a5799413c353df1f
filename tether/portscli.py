"""`tether ports FILE [ENDPOINT]`: the ports a container publishes, as its firewall applies
them, read from its config (JSON form) or its guestinfo (VMX lines: the `--out` of
`tether sandbox`/`tether vm`, or a VM's .vmx), one line per port:

    public  10.78.0.2  published  9000/tcp -> 80/tcp

(endpoint, assigned address or `-`, trust level, published port and, for a redirect, the
container port it reaches). A bad spec is reported as the agent would, exit status 1.
"""
from __future__ import annotations

import sys

USAGE = "usage: tether ports FILE [ENDPOINT]   (FILE: JSON config or VMX lines; '-': stdin)"


def load(text: str):
    from extraconfig import decode
    from extraconfig.transport import NIL, parse_vmx

    from .config import ExecutorConfig
    from .jsonform import config_from_json, parse_json
    if text.lstrip().startswith("{"):
        return config_from_json(parse_json(text, "the config"))
    entries = parse_vmx(text)
    return decode({k: (v if v != NIL else "") for k, v in entries.items()}, ExecutorConfig)


def lines(config, only: str | None = None) -> list[str]:
    """The table's rows; PortSpecError names the endpoint and the bad spec."""
    from .network.firewall import FirewallError, policies
    networks = {k: v for k, v in (config.networks or {}).items()
                if v is not None and (only is None or k == only)}
    if only is not None and not networks:
        raise LookupError(f"no network endpoint {only!r} (have: "
                          f"{', '.join(sorted(config.networks or {})) or 'none'})")
    try:
        found = policies(networks, {name: name for name in networks})
    except FirewallError as err:
        raise ValueError(str(err)) from None
    rows = []
    for policy in found:
        endpoint = networks[policy.name]
        address = "-"
        if endpoint.assigned is not None and endpoint.assigned.ip:
            addr = endpoint.assigned.ip.address()
            address = str(addr) if addr is not None and not addr.is_unspecified else "-"
        level = "bridge" if policy.bridge else policy.trust.effective().text
        for spec in policy.ports:
            ports = str(spec.first) if spec.first == spec.last else f"{spec.first}-{spec.last}"
            shown = f"{spec.host}/{spec.proto} -> {ports}/{spec.proto}" if spec.redirect \
                else f"{ports}/{spec.proto}"
            rows.append((policy.name, address, level, shown))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    return ["  ".join([*(r[i].ljust(widths[i]) for i in range(3)), r[3]]) for r in rows]


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    # Names are shown escaped: a VM's guestinfo (`--out`) holds what its guest wrote, and
    # the list of network names is a value it may set.
    from .console import escape_unprintable
    path = argv[0]
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8",
                                                          errors="surrogateescape").read()
        for line in lines(load(text), argv[1] if len(argv) == 2 else None):
            print(escape_unprintable(line))
        return 0
    except OSError as err:
        print(f"tether ports: {escape_unprintable(str(err.filename or path))}: "
              f"{err.strerror}", file=sys.stderr)
    except (ValueError, LookupError) as err:   # ConfigError, DecodeError, bad specs
        print(f"tether ports: {escape_unprintable(str(err))}", file=sys.stderr)
    return 1
