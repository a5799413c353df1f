"""`tether vsphere`'s plain parts, without a server: the URL, the NIC layout, the extraConfig
values (secret scope), the ConfigSpec, the read-back rules, and that the agent never loads
pyVmomi. The calls against a simulated vCenter are in test_vsphere_vcsim.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pyVmomi import vim

from extraconfig import encode
from extraconfig.transport import GuestSource, MapTransport
from tether.jsonform import config_from_json
from tether.network.nic import classify, slot_to_pci_path
from tether.vsphere import spec as S
from tether.vsphere.connection import VsphereError, parse_url, split_datastore_path
from tether.outcome import primary_outcome
from tether.vsphere.guestinfo import extra_config_values, guestinfo_view, host_map, raw_map

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the URL

def test_url_forms():
    t = parse_url("https://admin%40vsphere.local:p%3Ass@vc.example:8443/sdk", env={})
    assert (t.host, t.port, t.path, t.user, t.password) == (
        "vc.example", 8443, "/sdk", "admin@vsphere.local", "p:ss")
    assert t.display == "https://vc.example:8443/sdk"
    t = parse_url("esx1", env={"TETHER_VSPHERE_USERNAME": "root", "TETHER_VSPHERE_PASSWORD": "pw"})
    assert (t.host, t.port, t.path, t.user, t.password) == ("esx1", 443, "/sdk", "root", "pw")
    t = parse_url(None, insecure=True, env={"TETHER_VSPHERE_URL": "https://u:p@h/sdk"})
    assert t.insecure and t.host == "h"


@pytest.mark.parametrize("url,message", [
    (None, "no vSphere URL"),
    ("http://u:p@h/sdk", "served over https"),
    ("https://h/sdk", "no user name and password"),
    ("https://u:secret@h:notaport/sdk", "bad port"),
])
def test_url_errors_are_one_line_and_hide_the_password(url, message):
    with pytest.raises(VsphereError, match=message) as err:
        parse_url(url, env={})
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_datastore_paths():
    assert split_datastore_path("[datastore 1] iso/boot.iso") == ("datastore 1", "iso/boot.iso")
    with pytest.raises(VsphereError, match="not a datastore path"):
        split_datastore_path("iso/boot.iso")


# --------------------------------------------------------------------------- NICs

def _config(networks):
    return config_from_json({"common": {"id": "c"},
                             "sessions": {"c": {"cmd": {"path": "/bin/true"}}},
                             "networks": networks})


def test_nics_get_vic_slots_in_endpoint_order_and_ids_become_the_slot():
    config = _config({"web": {"network": {"type": "external"}},
                      "db": {"network": {"type": "bridge"}},
                      "mgmt": {"common": {"id": "1216"}, "network": {"type": "bridge"}},
                      "mac": {"common": {"id": "00:50:56:AA:BB:CC"}, "network": {"type": "bridge"}}})
    nets = S.endpoint_networks(config, {"web": "VM Network"}, "DPortGroup")
    assert nets == {"db": "DPortGroup", "mac": "DPortGroup", "mgmt": "DPortGroup", "web": "VM Network"}
    nics = S.assign_nics(config, nets)
    assert [(n.endpoint, n.slot, n.mac) for n in nics] == [
        ("db", 1184, None), ("mgmt", 1216, None), ("mac", 1248, "00:50:56:aa:bb:cc"),
        ("web", 1280, None)]
    ids = {name: ep.common.id for name, ep in config.networks.items()}
    assert ids == {"db": "1184", "mgmt": "1216", "mac": "00:50:56:AA:BB:CC", "web": "1280"}
    # the agent reads those IDs as VMware slots, one bridge each
    assert all(classify(ids[n]) == "slot" for n in ("db", "mgmt", "web"))
    bridges = {slot_to_pci_path(n.slot, "new").split("/")[0] for n in nics}
    assert len(bridges) == len(nics)


def test_endpoint_networks_default_to_the_config_network_name():
    config = _config({"ext": {"network": {"common": {"name": "public"}, "type": "external"}}})
    assert S.endpoint_networks(config, {}, None) == {"ext": "public"}
    with pytest.raises(S.SpecError, match="no network endpoint of the config: nope"):
        S.endpoint_networks(config, {"nope": "x"}, None)


def test_nic_id_errors():
    with pytest.raises(S.SpecError, match="both ask for PCI slot 1184"):
        S.assign_nics(_config({"a": {"common": {"id": "1184"}}, "b": {"common": {"id": "1184"}}}),
                      {"a": "n", "b": "n"})
    with pytest.raises(S.SpecError, match="is a PCI address"):
        S.assign_nics(_config({"a": {"common": {"id": "0000:00:05.0"}}}), {"a": "n"})
    many = {f"n{i:02d}": {} for i in range(28)}
    with pytest.raises(S.SpecError, match="too many networks: at most 27"):
        S.assign_nics(_config(many), {name: "n" for name in many})


# --------------------------------------------------------------------------- extraConfig

def test_extra_config_values_store_empty_as_nil_and_nothing_else_changes():
    config = config_from_json({"common": {"id": "h"}, "sessions": {"h": {"cmd": {"path": "/bin/true"}}}})
    entries = encode(config)
    values = extra_config_values(entries)
    assert values == {k: (v if v != "" else "<nil>") for k, v in entries.items()}
    assert "guestinfo.ovfEnv" not in values


def test_secret_keys_are_sealed_under_a_key_in_ovfenv():
    entries = {"guestinfo.vice./token@secret": "s3cret", "guestinfo.vice./plain": "p",
               "guestinfo.vice./empty@secret": ""}
    values = extra_config_values(entries)
    assert values["guestinfo.vice./plain"] == "p"
    assert values["guestinfo.vice./token@secret"] not in ("s3cret", "<nil>")
    assert "guestinfo.ovfEnv" in values
    # the guest opens them with the key it finds in guestinfo.ovfEnv
    guest = GuestSource(MapTransport(dict(values)))
    assert guest["guestinfo.vice./token@secret"] == "s3cret"
    assert guest["guestinfo.vice./empty@secret"] == ""
    # a fresh key each time: a VM's secrets do not open another's
    again = extra_config_values(entries)
    assert again["guestinfo.ovfEnv"] != values["guestinfo.ovfEnv"]


def _options(*pairs):
    return [vim.option.OptionValue(key=k, value=v) for k, v in pairs]


def test_read_back_takes_the_last_of_repeated_keys_and_nil_as_empty():
    options = _options(("a", "1"), ("b", "<nil>"), ("a", "2"), ("guestinfo.x", "true"),
                       ("vmx.option", "y"))
    assert raw_map(options) == {"a": "2", "b": "<nil>", "guestinfo.x": "true", "vmx.option": "y"}
    assert host_map(options) == {"a": "2", "b": "", "guestinfo.x": "true", "vmx.option": "y"}
    assert guestinfo_view(host_map(options), {"a": "", "b": ""}) == {
        "a": "2", "b": "", "guestinfo.x": "true"}


# --------------------------------------------------------------------------- the spec

def test_config_spec_lays_out_vics_devices():
    plan = S.VmPlan(name="c-1", datastore="ds1", iso="[ds1] tether/bootstrap-x.iso",
                    nics=[S.Nic("a", "VM Network", 1184), S.Nic("b", "VM Network", 1216, "00:50:56:00:00:01")],
                    extra_config={"guestinfo.vice./common/id": "c"},
                    containerfs_parent="[ds1] images/l/l.vmdk", attach_uri="tcp://10.0.0.1:2377",
                    memory_mb=256, cpus=2, annotation="tether-vsphere: test")
    backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network")
    spec = S.config_spec(plan, {"VM Network": backing})
    assert spec.files.vmPathName == "[ds1] c-1/c-1.vmx"
    assert (spec.numCPUs, spec.memoryMB, spec.guestId) == (2, 256, "otherLinux64Guest")
    kinds = [type(c.device).__name__.rsplit(".", 1)[-1] for c in spec.deviceChange]
    assert kinds == ["VirtualIDEController", "VirtualCdrom", "VirtualSerialPort",
                     "VirtualSerialPort", "VirtualSerialPort", "VirtualVmxnet3", "VirtualVmxnet3",
                     "ParaVirtualSCSIController", "VirtualDisk"]
    devices = [c.device for c in spec.deviceChange]
    assert len({d.key for d in devices}) == len(devices) and all(d.key < 0 for d in devices)
    assert devices[1].controllerKey == devices[0].key
    assert devices[1].backing.fileName == "[ds1] tether/bootstrap-x.iso"
    assert devices[2].backing.serviceURI == "tcp://10.0.0.1:2377"
    assert devices[2].connectable.startConnected
    assert [d.backing.fileName for d in devices[3:5]] == ["[ds1] c-1/tether.debug",
                                                          "[ds1] c-1/output.log"]
    assert [d.slotInfo.pciSlotNumber for d in devices[5:7]] == [1184, 1216]
    assert devices[5].addressType == "generated"
    assert (devices[6].addressType, devices[6].macAddress) == ("manual", "00:50:56:00:00:01")
    assert devices[8].controllerKey == devices[7].key
    assert devices[8].backing.parent.fileName == "[ds1] images/l/l.vmdk"
    assert spec.deviceChange[8].fileOperation == "create"
    extra = {o.key: o.value for o in spec.extraConfig}
    assert extra == {**S.VMX_OPTIONS, "guestinfo.vice./common/id": "c"}


def test_config_spec_without_attach_uri_or_disk():
    plan = S.VmPlan(name="c", datastore="ds", iso="[ds] i.iso", nics=[], extra_config={})
    spec = S.config_spec(plan, {})
    serial = [c.device for c in spec.deviceChange
              if isinstance(c.device, vim.vm.device.VirtualSerialPort)]
    assert serial[0].backing.serviceURI == S.UNCONNECTED_ATTACH_URI
    assert not serial[0].connectable.startConnected and not serial[0].connectable.connected
    assert not any(isinstance(c.device, vim.vm.device.VirtualDisk) for c in spec.deviceChange)


# --------------------------------------------------------------------------- exit codes

def _final(started="true", status=0, message=""):
    config = config_from_json({"common": {"id": "p"}, "sessions": {"p": {"cmd": {"path": "/x"}}}})
    primary = config.sessions["p"]
    primary.started, primary.exit_status = started, status
    if message:
        from tether.config import ExitLog
        primary.diagnostics.exit_logs = [ExitLog(message=message)]
    return encode(config)


@pytest.mark.parametrize("final,code", [
    (_final(status=0), 0), (_final(status=3), 3), (_final(status=256 + 7), 7),
    (_final(status=-1, message="killed by signal 15"), 128 + 15),
    (_final(started="no such file"), 127), (_final(started=""), 127),
    # what a guest can write into its exit log: no signal number, no crash
    (_final(status=-1, message="signal " + "9" * 5000), 128 + 9),
    (_final(status=-1, message="killed by signal 99999999999"), 128 + 9),
    (_final(status=-1, message="killed by signal 0"), 128 + 9),
])
def test_exit_code_of_the_primary(final, code):
    assert primary_outcome(final).exit_code == code


# --------------------------------------------------------------------------- boot path

def test_the_agent_and_the_command_dispatcher_never_load_pyvmomi():
    probe = ("import sys, tether.agent, tether.cli, tether.sandbox, tether.vm; "
             "sys.exit('pyVmomi' in sys.modules or 'tether.vsphere.connection' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO).returncode == 0
    # and the command without a subcommand shows vsphere in its list, still without it
    listing = subprocess.run([sys.executable, "-m", "tether", "--help"], cwd=REPO,
                             capture_output=True, text=True)
    assert "vsphere" in listing.stdout
