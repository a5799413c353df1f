"""VM templates end to end (`tether vm --template`, tether/vmtemplate.py): the first run
of a machine saves the guest waiting for its config, later runs restore it, and each
restored clone gets the host's clock and its own randomness. Marker `vm` (root, QEMU)."""
from __future__ import annotations

import ipaddress
import os
import time

import pytest

from tether.bootchart import read_phases
from tether.jsonform import config_from_json
from tether.vm import VmRun
from test_vm import boot, ip_of, session, single

pytestmark = pytest.mark.vm

# The clones' clock is checked against a template at least this old: a guest that kept
# the template's clock would be that far behind.
TEMPLATE_AGE = 12.0
CLOCK_SLACK = 4.0


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vm-templates"))


def boot_from(image_dir, templates, config):
    return boot(image_dir, config, template=True, template_root=templates)


def test_the_first_run_saves_a_template_and_the_next_starts_from_it(image_dir, templates):
    config = single("hello", session("/bin/echo", "hello", "world"))
    first = boot_from(image_dir, templates, config)
    assert first.result.exit_code == 0, first.explain()
    assert first.result.template == "created" and first.text() == "hello world\n"
    (saved,) = os.listdir(templates)
    assert os.path.getsize(os.path.join(templates, saved, "state")) > 1 << 20

    second = boot_from(image_dir, templates, config)
    assert second.result.exit_code == 0, second.explain()
    assert second.result.template == "restored" and second.text() == "hello world\n"
    assert second.session_key("hello", "started") == "true"
    # Its timeline starts with the restore: the template's own boot phases are not this
    # run's, and every guest phase comes after the state was loaded.
    phases = {p.name: p for p in read_phases(second.map)}
    assert "host.restore" in phases and "host.qemu" not in phases, sorted(phases)
    assert not {"kernel", "python", "imports"} & set(phases), sorted(phases)
    guest = [p for p in read_phases(second.map) if not p.host]
    assert [p.name for p in guest][0] == "resume" and "exec:hello" in phases
    assert guest[0].start >= phases["host.restore"].end - 0.05, (guest[0], phases["host.restore"])
    assert all(a.end <= b.start + 1e-6 for a, b in zip(guest, guest[1:])), guest


def test_clones_take_the_hosts_clock_and_draw_their_own_random_numbers(image_dir, templates):
    script = "date +%s; head -c 16 /dev/urandom | od -An -tx1"
    config = single("clone", session("/bin/sh", "-c", script))
    boot_from(image_dir, templates, config)          # the template, if not saved yet
    (saved,) = os.listdir(templates)
    made = os.path.getmtime(os.path.join(templates, saved, "state"))
    time.sleep(max(0.0, made + TEMPLATE_AGE - time.time()))
    clones = []
    for _ in range(2):
        vm = boot_from(image_dir, templates, config)
        host_time = time.time()
        assert vm.result.exit_code == 0 and vm.result.template == "restored", vm.explain()
        guest_time, random_bytes = vm.text().split("\n", 1)
        # written while the VM ran: within its run, not TEMPLATE_AGE behind
        assert abs(int(guest_time) - host_time) < CLOCK_SLACK, (guest_time, host_time)
        # the host's seed went into the kernel's RNG (the agent says so on the console)
        assert "resumed from a VM template: clock set to" in vm.result.console
        assert "RNG reseeded" in vm.result.console, vm.result.console[-3000:]
        clones.append(random_bytes.strip())
    # Different numbers: the seed's work, and the kernel's (it reseeds from virtio-rng
    # and interrupts within seconds of a boot; removing the seed alone does not fail this
    # line, the one above does).
    assert clones[0] != clones[1], clones


def test_a_template_that_does_not_load_is_replaced(image_dir, tmp_path):
    hello = single("hello", session("/bin/echo", "hi"))
    root = str(tmp_path / "templates")
    run = VmRun(config_from_json(hello), str(image_dir), template=True, template_root=root)
    run.close()
    os.makedirs(run.template.directory)
    with open(run.template.state, "wb") as f:      # not a QEMU migration stream
        f.write(b"QEVM" + os.urandom(4096))
    vm = boot(image_dir, hello, template=True, template_root=root)
    assert vm.result.exit_code == 0, vm.explain()
    assert vm.result.template == "created", vm.run.template_note
    assert "did not load" in vm.run.template_note
    assert os.path.getsize(vm.run.template.state) > 1 << 20      # a real one took its place


def test_a_machine_with_nics_restores_and_configures_them(image_dir, tmp_path):
    networks = {"a": {"common": {"id": "0000:00:07.0"}, "static": True, "ip": "172.31.7.2/24",
                      "network": {"type": "bridge", "default": True,
                                  "gateway": "172.31.7.1/24"}}}
    config = single("net", session("/bin/sh", "-c", "ip -o addr show; ip route"),
                    networks=networks)
    runs = [boot_from(image_dir, str(tmp_path), config) for _ in range(2)]
    assert [vm.result.template for vm in runs] == ["created", "restored"], \
        [vm.explain() for vm in runs]
    for vm in runs:
        assert vm.result.exit_code == 0, vm.explain()
        assert "inet 172.31.7.2/24" in vm.text() and "default via 172.31.7.1" in vm.text()
        assigned = vm.result.config.networks["a"].assigned
        assert ip_of(assigned.ip) == ipaddress.ip_address("172.31.7.2")
