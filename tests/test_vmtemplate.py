"""VM templates without booting (tether/vmtemplate.py and VmRun's choice): the key, which
machines are templated, the resume answer, eviction. The boots are in test_vm_template.py."""
from __future__ import annotations

import os
import re
import time

from tether import vmtemplate
from tether.jsonform import config_from_json
from tether.vm import VmRun

CONFIG = {"common": {"id": "a"}, "sessions": {"a": {"cmd": {"path": "/bin/true"}}}}


def image(tmp_path):
    for name in ("vmlinux", "initrd.img", "root.ext4", "containerfs.img", "bootstrap-debug.iso"):
        if not (tmp_path / name).exists():
            (tmp_path / name).write_bytes(name.encode())
    return tmp_path


def run_of(tmp_path, networks=None, **kwargs) -> VmRun:
    config = config_from_json({**CONFIG, **({"networks": networks} if networks else {})})
    run = VmRun(config, str(image(tmp_path)), template=True,
                template_root=str(tmp_path / "templates"), **kwargs)
    run.close()
    return run


def test_the_same_machine_has_the_same_key_and_any_change_another(tmp_path):
    first = run_of(tmp_path)
    assert first.template is not None and first.template_mode == "create"
    assert "tether.template=1" in first.spec.kernel_args.split()
    assert run_of(tmp_path).template.key == first.template.key   # other run dirs, same key
    assert run_of(tmp_path, memory_mb=256).template.key != first.template.key
    with_nic = run_of(tmp_path, networks={"n": {"network": {}}})
    assert with_nic.template.key != first.template.key
    # a user-mode NIC's MAC is the same in every run: the same machine, the same key
    assert run_of(tmp_path, networks={"n": {"network": {}}}).template.key == with_nic.template.key
    later = time.time() + 5     # the initrd rebuilt: a new template
    os.utime(tmp_path / "initrd.img", (later, later))
    assert run_of(tmp_path).template.key != first.template.key


def test_writable_disks_and_the_iso_boot_cold_and_say_why(tmp_path):
    disk = tmp_path / "mine.img"
    disk.write_bytes(b"x")
    run = run_of(tmp_path, rootfs_disk=str(disk))
    assert run.template is None and "writable disk" in run.template_note
    assert "tether.template=1" not in run.spec.kernel_args
    (tmp_path / "bootstrap.iso").write_bytes(b"")
    run = run_of(tmp_path, vic_serial=True)
    assert run.template is None and "--vic-serial" in run.template_note
    # a tap NIC with a MAC of its own per run: clones would all have the template's
    run = run_of(tmp_path, networks={"n": {"network": {}}}, nets={"n": "tap:tap7"})
    assert run.template is None and "shared backend" in run.template_note
    mac_id = {"n": {"common": {"id": "52:54:00:aa:bb:cc"}, "network": {}}}
    assert run_of(tmp_path, networks=mac_id, nets={"n": "tap:tap7"}).template is not None
    for debug in ({"debug_image": True}, {"kernel_args": "tether.shell=1"}):
        run = run_of(tmp_path, **debug)
        assert run.template is None and "debug boot" in run.template_note


def test_a_saved_template_is_restored(tmp_path):
    first = run_of(tmp_path)
    os.makedirs(first.template.directory)
    with open(first.template.state, "wb") as f:
        f.write(b"state")
    run = run_of(tmp_path)
    assert run.template_mode == "restore"
    args = run.template.incoming_args()
    assert args[0] == "-incoming" and args[1].endswith(run.template.state)


def test_the_resume_answer_carries_the_clock_and_a_fresh_seed():
    before = time.time()
    first, second = vmtemplate.resume_value(), vmtemplate.resume_value()
    fields = dict(part.split("=") for part in first.split())
    assert set(fields) == {"clock", "seed"}
    assert before - 1 <= float(fields["clock"]) <= time.time() + 1
    assert re.fullmatch(r"[0-9a-f]{64}", fields["seed"])
    assert first.split()[1] != second.split()[1]
    assert vmtemplate.resume_value(cold=True).endswith(" cold=1")   # the run that saved it


def test_eviction_keeps_the_most_recently_used(tmp_path):
    for age, name in enumerate(["new", "mid", "old", "older"]):
        (tmp_path / name).mkdir()
        stamp = time.time() - 100 * age
        os.utime(tmp_path / name, (stamp, stamp))
    assert sorted(vmtemplate.evict(str(tmp_path), keep=2, spare="older")) == ["old"]
    assert sorted(os.listdir(tmp_path)) == ["mid", "new", "older"]
