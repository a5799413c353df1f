"""The boot timeline, host side (tether/bootchart.py): reading the keys from a map, the
launcher's marks on the guest's clock, the text table, the SVG chart, and the
`tether boot-timeline` command."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

from helpers import REPO
from extraconfig.transport import format_vmx
from tether import bootchart

SVG = "{http://www.w3.org/2000/svg}"
GUEST = {
    "guestinfo.tether.boot.kernel": "0.000000 1.200000",
    "guestinfo.tether.boot.stage0.modules": "1.200000 1.330000",
    "guestinfo.tether.boot.python": "1.330000 1.800000",
    "guestinfo.tether.boot.config": "1.800000 2.000000",
    "guestinfo.tether.boot.networks": "2.000000 2.000000",
    "guestinfo.tether.boot.exec:web": "2.000000 2.060000",
    "guestinfo.tether.boot.clock": "2.070000",
    "guestinfo.tether.boot.broken": "soon",
    "guestinfo.vice..sessions|web.started": "true",
}


def with_host() -> dict[str, str]:
    marks = {"qemu_start": 100.0, "console_first": 101.9, "agent_start": 102.2,
             "started": 102.41}
    # the guest wrote its clock (2.07) when the host's clock read 102.42: offset 100.35
    return dict(GUEST, **bootchart.host_keys(marks, 102.42, 2.07))


def test_phases_are_read_in_order_and_bad_values_skipped():
    names = [p.name for p in bootchart.read_phases(GUEST)]
    assert names == ["kernel", "stage0.modules", "python", "config", "networks", "exec:web"]


def test_values_no_clock_has_are_skipped_and_the_axis_stays_short():
    # A guest writes these keys: NaN, infinity and a phase lasting 1e300 s are not a
    # boot's (the chart's axis would count 1e298 ticks); a long but real span gets about
    # a dozen ticks whatever its length.
    hostile = dict(GUEST, **{"guestinfo.tether.boot.nan": "nan nan",
                             "guestinfo.tether.boot.inf": "0 inf",
                             "guestinfo.tether.boot.huge": "0 1e300",
                             "guestinfo.tether.boot.negative": "-1e300 0"})
    assert [p.name for p in bootchart.read_phases(hostile)] == \
        [p.name for p in bootchart.read_phases(GUEST)]
    long = {"guestinfo.tether.boot.uptime": "0 900000"}
    chart = ET.fromstring(bootchart.svg(bootchart.read_phases(long)))
    ticks = [t for t in chart.iter(SVG + "line") if t.get("stroke") == "#ddd"]
    assert 2 <= len(ticks) <= 13


def test_host_marks_land_on_the_guest_clock():
    keys = bootchart.host_keys({"qemu_start": 100.0, "started": 102.41}, 102.42, 2.07)
    assert keys["guestinfo.tether.boot.host.qemu"] == "-0.350000 0.000000"
    assert keys["guestinfo.tether.boot.host.started"] == "2.060000 2.060000"
    phases = bootchart.read_phases(with_host())
    assert [p.name for p in phases][:4] == ["host.qemu", "host.console", "host.guestinfo",
                                            "host.started"]
    assert bootchart.origin(phases) == (-0.35, "seconds since QEMU started")


def test_text_table_has_a_row_per_phase_with_its_duration():
    table = bootchart.text_table(bootchart.read_phases(with_host()))
    lines = table.splitlines()
    assert lines[0] == "boot timeline (seconds since QEMU started)"
    python = next(line for line in lines if line.startswith("python "))
    assert python.split()[1:] == ["1.680", "2.150", "470"]     # from QEMU's start
    assert len(lines) == 2 + 10


def test_svg_parses_with_one_bar_per_phase_and_one_mark_per_point():
    phases = bootchart.read_phases(with_host())
    root = ET.fromstring(bootchart.svg(phases, "Boot timeline: web"))
    assert root.tag == SVG + "svg"
    bars = [g for g in root.iter(SVG + "g") if g.get("class") == "bar"]
    marks = [g for g in root.iter(SVG + "g") if g.get("class") == "mark"]
    assert len(bars) == len([p for p in phases if not p.point]) == 7
    assert len(marks) == len([p for p in phases if p.point]) == 3
    labels = [bar.find(SVG + "text").text for bar in bars]
    assert "python 470 ms" in labels and "kernel 1200 ms" in labels
    assert "QEMU start to kernel (firmware, kernel load) 350 ms" in labels
    assert any(m.find(SVG + "text").text == "started=true at the host at 2.41 s" for m in marks)
    widths = {bar.find(SVG + "text").text: float(bar.find(SVG + "rect").get("width"))
              for bar in bars}
    assert widths["kernel 1200 ms"] > widths["python 470 ms"] > widths["exec:web 60 ms"]
    axis = [t.text for t in root.iter(SVG + "text") if t.get("text-anchor") == "middle"]
    assert axis[0] == "0" and "2" in axis


def test_boot_timeline_command_reads_vmx_and_json(tmp_path):
    vmx, js, out = tmp_path / "map.vmx", tmp_path / "map.json", tmp_path / "chart.svg"
    vmx.write_text(format_vmx(with_host()))
    js.write_text(json.dumps(with_host()))
    run = lambda *args: subprocess.run([sys.executable, "-m", "tether", "boot-timeline", *args],  # noqa: E731
                                       capture_output=True, text=True, cwd=REPO)
    table = run(str(vmx))
    assert table.returncode == 0, table.stderr
    assert "first guestinfo request" in table.stdout and "exec:web" in table.stdout
    drawn = run(str(js), "-o", str(out))
    assert drawn.returncode == 0, drawn.stderr
    assert ET.parse(out).getroot().tag == SVG + "svg"
    empty = tmp_path / "empty.vmx"
    empty.write_text(format_vmx({"guestinfo.vice./common/id": "x"}))
    missing = run(str(empty))
    assert missing.returncode == 1 and "guestinfo.tether.boot." in missing.stderr
