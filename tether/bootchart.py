"""The boot timeline, host side: read it from a guestinfo map, add the launcher's marks,
and show it as a text table or an SVG bar chart.

    tether boot-timeline MAP [-o FILE.svg | -o -]

MAP is a VMX file (`key = "value"` lines: what `tether vm --out`, `tether sandbox --out`
and vSphere keep) or a JSON object of keys and values; `-` reads stdin. Without -o, or with
`-o -`, a text table goes to stdout. The keys are described in tether/boottime.py and
docs/config.md: every `guestinfo.tether.boot.<phase>` holds "<start> <end>" in seconds on
the guest's boot clock; `host.<mark>` phases are the launcher's (tether vm), placed on
the same clock.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

from tether.boottime import CLOCK_KEY, PREFIX

HOST = "host."
# The launcher's marks, in the order a boot passes them, with the words the chart uses.
HOST_LABELS = {
    "host.qemu": "QEMU start to kernel (firmware, kernel load)",
    "host.restore": "QEMU start to the VM template loaded",
    "host.template": "saving the VM template",
    "host.console": "first console byte",
    "host.guestinfo": "first guestinfo request",
    "host.started": "started=true at the host",
}


class Phase(NamedTuple):
    name: str
    start: float        # seconds on the guest's boot clock
    end: float

    @property
    def host(self) -> bool:
        return self.name.startswith(HOST)

    @property
    def point(self) -> bool:
        """A moment the launcher noted (drawn as a mark), not a phase (drawn as a bar,
        however short)."""
        return self.host and self.end == self.start

    @property
    def label(self) -> str:
        return HOST_LABELS.get(self.name, self.name)


# --------------------------------------------------------------------------- reading

# Seconds: further from zero than this (a year) no boot clock reads.
CLOCK_LIMIT = 366 * 86400.0


def read_phases(entries: dict[str, str]) -> list[Phase]:
    """The timeline of a guestinfo map: the launcher's phases first, then the guest's,
    each group by start. Malformed values are skipped."""
    phases = []
    for key, value in entries.items():
        if not key.startswith(PREFIX) or key == CLOCK_KEY:
            continue
        try:
            start, end = (float(part) for part in value.split())
        except ValueError:
            continue
        if not (abs(start) <= CLOCK_LIMIT and abs(end) <= CLOCK_LIMIT):
            continue        # NaN, infinity, or no boot's clock: a guest may write anything
        phases.append(Phase(key[len(PREFIX):], start, max(start, end)))
    return sorted(phases, key=lambda p: (not p.host, p.start, p.end))


def load_map(path: str) -> dict[str, str]:
    """A guestinfo map from a VMX or JSON file ('-': stdin)."""
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    if text.lstrip().startswith("{"):
        import json
        data = json.loads(text)
        return {str(k): str(v) for k, v in data.items()}
    from extraconfig.transport import parse_vmx
    return parse_vmx(text)


def host_keys(marks: dict[str, float], clock_host: float, clock_guest: float) -> dict[str, str]:
    """The launcher's marks (host monotonic seconds: qemu_start, console_first,
    agent_start, started; restored when QEMU started from a VM template, resume_request
    and template_saved when it saved one) as timeline keys on the guest's clock. The guest wrote its clock
    key at `clock_guest` and the host received it at `clock_host`: one message's latency
    is the error."""
    offset = clock_host - clock_guest
    keys = {}
    if "restored" in marks:      # started from a VM template: no firmware, no kernel boot
        keys[PREFIX + "host.restore"] = (f"{marks['qemu_start'] - offset:.6f} "
                                         f"{marks['restored'] - offset:.6f}")
    elif "qemu_start" in marks:
        keys[PREFIX + "host.qemu"] = f"{marks['qemu_start'] - offset:.6f} 0.000000"
    if "resume_request" in marks and "template_saved" in marks:
        keys[PREFIX + "host.template"] = (f"{marks['resume_request'] - offset:.6f} "
                                          f"{marks['template_saved'] - offset:.6f}")
    for mark, name in (("console_first", "console"), ("agent_start", "guestinfo"),
                       ("started", "started")):
        if mark in marks:
            t = marks[mark] - offset
            keys[PREFIX + HOST + name] = f"{t:.6f} {t:.6f}"
    return keys


def origin(phases: list[Phase]) -> tuple[float, str]:
    """Where the time axis starts: QEMU's start when the launcher's marks are there,
    else the guest's boot clock zero."""
    for phase in phases:
        if phase.name in ("host.qemu", "host.restore"):
            return phase.start, "seconds since QEMU started"
    return 0.0, "seconds on the guest's boot clock"


# --------------------------------------------------------------------------- text

def text_table(phases: list[Phase]) -> str:
    zero, axis = origin(phases)
    width = max([len(p.label) for p in phases] + [5])
    lines = [f"boot timeline ({axis})", f"{'phase':<{width}}  {'start':>7}  {'end':>7}  {'ms':>6}"]
    for p in phases:
        duration = "" if p.point else f"{1000 * (p.end - p.start):6.0f}"
        lines.append(f"{p.label:<{width}}  {p.start - zero:7.3f}  {p.end - zero:7.3f}  {duration:>6}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- SVG

ROW, BAR, LEFT, WIDTH, TOP = 24, 16, 16, 1000, 48
COLORS = {"host": "#8e6bbf", "kernel": "#7f8c8d", "stage0": "#e67e22", "python": "#c0392b",
          "agent": "#2e86c1", "exec": "#27ae60"}
CHAR = 6.6          # the width of one character of the 11 px sans-serif labels, roughly


def _color(phase: Phase) -> str:
    if phase.host:
        return COLORS["host"]
    if phase.name == "kernel":
        return COLORS["kernel"]
    if phase.name.startswith("stage0."):
        return COLORS["stage0"]
    if phase.name in ("python", "imports"):
        return COLORS["python"]
    if phase.name.startswith("exec:"):
        return COLORS["exec"]
    return COLORS["agent"]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _tick_step(span: float) -> float:
    """A round step giving the axis at most 12 ticks over `span` seconds."""
    for step in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0):
        if span / step <= 12:
            return step
    step = 120.0
    while span / step > 12:     # a run of hours or days: minutes, then powers of ten
        step *= 10
    return step


LEGEND = (("host", "tether vm (host)"), ("kernel", "firmware and kernel"),
          ("stage0", "stage 0"), ("python", "Python start and imports"),
          ("agent", "agent steps"), ("exec", "session exec"))


def svg(phases: list[Phase], title: str = "Boot timeline") -> str:
    """A horizontal bar chart: one row per phase, the launcher's marks on top and the
    guest's phases under them, each bar labelled with its name and duration, a time
    axis in seconds, a dashed line where the host saw started=true, a colour legend."""
    zero, axis = origin(phases)
    end = max([p.end - zero for p in phases] + [0.001])
    step = _tick_step(end)
    span = step * (int(end / step) + 1)
    scale = (WIDTH - 2 * LEFT - 200) / span        # room on the right for labels
    host = [p for p in phases if p.host]
    guest = [p for p in phases if not p.host]
    groups = [(caption, rows) for caption, rows in
              (("tether vm (host), on the guest's clock", host),
               ("guest: written back by the agent", guest)) if rows]
    rows_total = sum(len(rows) + 1 for _, rows in groups)
    bottom = TOP + ROW * rows_total
    height = bottom + 56
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
           f'<title>{_escape(title)}</title>',
           f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
           f'<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{_escape(title)}</text>']
    tick = 0.0
    while tick <= span + 1e-9:                      # the axis: grid lines and labels
        x = LEFT + tick * scale
        out.append(f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{bottom}" '
                   f'stroke="#ddd" stroke-width="1"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP - 10}" text-anchor="middle" fill="#555">'
                   f'{tick:g}</text>')
        tick = round(tick + step, 6)
    out.append(f'<text x="{WIDTH - LEFT}" y="{TOP - 10}" text-anchor="end" fill="#555">'
               f'{_escape(axis)}</text>')
    started = next((p for p in host if p.name == "host.started"), None)
    if started is not None:                         # behind the bars and their labels
        x = LEFT + (started.start - zero) * scale
        out.append(f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{bottom}" '
                   f'stroke="{COLORS["host"]}" stroke-width="1" stroke-dasharray="4,3"/>')
    row = 0
    for caption, rows in groups:
        y = TOP + row * ROW + ROW - 7
        out.append(f'<text x="{LEFT}" y="{y:.1f}" fill="#555" font-style="italic">'
                   f'{_escape(caption)}</text>')
        row += 1
        for p in rows:
            out.append(_row(p, TOP + row * ROW + (ROW - BAR) / 2, zero, scale))
            row += 1
    x = LEFT
    for key, words in LEGEND:                        # the colours
        out.append(f'<rect x="{x}" y="{bottom + 14}" width="10" height="10" fill="{COLORS[key]}"/>'
                   f'<text x="{x + 14}" y="{bottom + 23}" fill="#333">{_escape(words)}</text>')
        x += 26 + len(words) * CHAR
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _row(p: Phase, y: float, zero: float, scale: float) -> str:
    x = LEFT + (p.start - zero) * scale
    w = (p.end - p.start) * scale
    color = _color(p)
    if p.point:
        label = f"{p.label} at {p.start - zero:.2f} s"
        return (f'<g class="mark"><path d="M{x:.1f},{y:.1f} l5,{BAR / 2:.0f} l-5,{BAR / 2:.0f} '
                f'l-5,-{BAR / 2:.0f} z" fill="{color}"/>'
                f'<text x="{x + 9:.1f}" y="{y + BAR - 4:.1f}">{_escape(label)}</text></g>')
    label = f"{p.label} {1000 * (p.end - p.start):.0f} ms"
    inside = w >= len(label) * CHAR + 8
    text_x, fill = (x + 4, "#fff") if inside else (x + max(w, 1) + 4, "#222")
    return (f'<g class="bar"><rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 1):.1f}" '
            f'height="{BAR}" fill="{color}"><title>{_escape(label)}</title></rect>'
            f'<text x="{text_x:.1f}" y="{y + BAR - 4:.1f}" fill="{fill}">'
            f'{_escape(label)}</text></g>')


# --------------------------------------------------------------------------- output

def write(phases: list[Phase], target: str, title: str = "Boot timeline") -> None:
    """`-`: the text table on stdout; FILE.svg: the chart; any other name: the table."""
    if target == "-":
        sys.stdout.write(text_table(phases))
        sys.stdout.flush()
        return
    text = svg(phases, title) if target.endswith(".svg") else text_table(phases)
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)


USAGE = """usage: tether boot-timeline MAP [-o FILE.svg|-]

Show the boot timeline an agent wrote back (guestinfo.tether.boot.* keys) in MAP, a
VMX file (tether vm --out) or a JSON map, '-' for stdin: a text table on stdout, or
an SVG bar chart with -o FILE.svg.
"""


def main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="tether boot-timeline", usage=USAGE.splitlines()[0][7:])
    parser.add_argument("map", help="VMX or JSON guestinfo map ('-': stdin)")
    parser.add_argument("-o", "--output", default="-", help="FILE.svg for a chart, '-' for a text table")
    parser.add_argument("--title", default="Boot timeline")
    args = parser.parse_args(argv)
    try:
        phases = read_phases(load_map(args.map))
    except (OSError, ValueError) as err:
        print(f"tether boot-timeline: {args.map}: {err}", file=sys.stderr)
        return 2
    if not phases:
        print(f"tether boot-timeline: {args.map} holds no {PREFIX}* keys (the agent writes "
              "them once the primary session has started)", file=sys.stderr)
        return 1
    write(phases, args.output, args.title)
    return 0
