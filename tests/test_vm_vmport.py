"""Under QEMU with the VMware backdoor port (`-machine vmport=on`) the agent's probe gets
the VMware magic from GETVERSION, finds the RPC channel unusable (QEMU has no RPCI), and
falls back to virtio-serial, saying so on the console. With `vmport=off` the probe finds
no backdoor. A VM given the virtio guestinfo port probes only when asked to (kernel
argument tether.probe_backdoor=1, which these boots pass); by default it does not touch
the ports at all. Boots the bootstrap image (built first by the `image_dir` fixture, as
in test_vm.py) under QEMU TCG."""

from __future__ import annotations


import pytest

from helpers import sid
from test_vm import boot as boot_vm, session, single

pytestmark = pytest.mark.vm
TIMEOUT = 600.0


PROBE = "tether.probe_backdoor=1"


def boot(image_dir, qemu_args, kernel_args=PROBE):
    import inspect
    from tether.vm import VmRun
    if "qemu_args" not in inspect.signature(VmRun).parameters:
        pytest.fail("tether.vm.VmRun takes no qemu_args yet: the hook in docs/vsphere.md "
                    "(Integration hooks) is missing")
    config = single(sid(), session("/bin/sh", "-c", "exit 3"))
    return boot_vm(image_dir, config, TIMEOUT, qemu_args=qemu_args,
                   kernel_args=kernel_args).result


def test_vmport_on_getversion_magic_then_fallback_to_virtio(image_dir):
    result = boot(image_dir, ["-machine", "vmport=on"])
    console = result.console
    assert "port I/O extension is not available" not in console, (
        "the image has no extraconfig/backdoor/_portio: init/provision/project must build "
        "it (docs/vsphere.md)")
    assert "GETVERSION answered with the VMware magic" in console, console[-4000:]
    assert "RPC channel is unusable" in console, console[-4000:]
    assert "falling back to the next transport" in console
    assert "guestinfo: using extraconfig.virtio" in console, console[-4000:]
    assert result.exit_code == 3, (result.message, console[-4000:])


def test_the_host_given_port_is_used_without_probing_the_backdoor(image_dir):
    result = boot(image_dir, ["-machine", "vmport=on"], kernel_args="")
    console = result.console
    assert "the VMware backdoor is not probed" in console, console[-4000:]
    assert "GETVERSION" not in console, console[-4000:]
    assert "guestinfo: using extraconfig.virtio" in console, console[-4000:]
    assert result.exit_code == 3, (result.message, console[-4000:])


def test_vmport_off_no_backdoor_then_virtio(image_dir):
    result = boot(image_dir, ["-machine", "vmport=off"])
    console = result.console
    assert "did not answer GETVERSION with the VMware magic" in console, console[-4000:]
    assert "guestinfo: using extraconfig.virtio" in console, console[-4000:]
    assert result.exit_code == 3, (result.message, console[-4000:])
