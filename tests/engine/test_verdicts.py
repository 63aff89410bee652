"""Every verdict, one test per reason, on every bus: `kmodguard status --json` on umockdev-faked
devices (records.py) against the synthetic world of gcc-built modules, read the way a user reads it.
How status prints them (the JSON contract, the human output, hostile strings):
tests/cli/test_status.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from records import device, pci
from status_runs import GPU, PACKAGE_VERSION, SYS, by_id, status, status_json, syspath, write_policy
from synthetic import ALIAS, KVER


# --- bound -----------------------------------------------------------------------------------

def test_bound_to_its_normal_driver(indexed, tmp_path):
    doc = status_json(indexed, pci("0000:00:03.0", ALIAS["installed"], driver="kmg_core_nic"), tmp_path, code=0)
    dev = by_id(doc)["0000:00:03.0"]
    assert dev["verdict"] == "bound"
    assert dev["driver"] == "kmg_core_nic"
    assert dev["intentional"] is False
    assert "kmg_core_nic" in dev["reason"]


@pytest.mark.parametrize("driver, override", [
    ("vfio-pci", "(null)"),  # bound to vfio-pci by new_id/bind
    ("vfio-pci", "vfio-pci"),  # driverctl set-override ... vfio-pci
    ("pci-stub", "(null)"),
    ("kmg_core_nic", "kmg_core_nic"),  # a normal driver, but pinned with driver_override
])
def test_bound_on_purpose_is_intentional(indexed, tmp_path, driver, override):
    # The modalias would be 'missing' if unbound: a held device must not ask for a package.
    doc = status_json(indexed, pci("0000:00:06.0", GPU, driver=driver, override=override), tmp_path, code=0)
    dev = by_id(doc)["0000:00:06.0"]
    assert (dev["verdict"], dev["driver"], dev["intentional"]) == ("bound", driver, True)
    assert dev["candidates"] == []


# --- ignored, one test per reason --------------------------------------------------------------

def test_ignored_driver_override_without_a_driver(indexed, tmp_path):
    records = pci("0000:00:05.0", GPU, override="vfio-pci") + pci("0000:00:06.0", GPU, override="none")
    doc = status_json(indexed, records, tmp_path, code=0)
    for addr, value in (("0000:00:05.0", "vfio-pci"), ("0000:00:06.0", "none")):
        dev = by_id(doc)[addr]
        assert dev["verdict"] == "ignored", dev
        assert dev["driver"] is None
        assert "driver_override" in dev["reason"] and repr(value) in dev["reason"]
        assert dev["candidates"] == []


def test_ignored_sriov_vf_of_a_pf_with_autoprobe_off(indexed, tmp_path):
    # The PF keeps its driver; sriov_drivers_autoprobe=0 means its VFs are meant for guests.
    pf = pci("0000:00:07.0", ALIAS["installed"], driver="kmg_core_nic",
             attrs={"sriov_drivers_autoprobe": "0", "sriov_numvfs": "2", "sriov_totalvfs": "8"},
             links={"virtfn0": "../0000:00:07.1", "virtfn1": "../0000:00:07.2"})
    vfs = "".join(pci(a, ALIAS["installed"], links={"physfn": "../0000:00:07.0"}) for a in ("0000:00:07.1", "0000:00:07.2"))
    doc = status_json(indexed, pf + vfs, tmp_path, code=0)  # the VFs' driver is installed: not ignored would be exit 3
    devs = by_id(doc)
    assert devs["0000:00:07.0"]["verdict"] == "bound"
    for vf in ("0000:00:07.1", "0000:00:07.2"):
        assert devs[vf]["verdict"] == "ignored", devs[vf]
        assert "sriov_drivers_autoprobe=0" in devs[vf]["reason"] and "0000:00:07.0" in devs[vf]["reason"]
        assert devs[vf]["pci"]["physfn"] == syspath("0000:00:07.0")
        assert devs[vf]["pci"]["sriov_drivers_autoprobe"] is False


def test_ignored_when_blacklisted_in_modprobe_d(indexed, tmp_path):
    # world/modprobe.d/admin.conf: "blacklist kmg_banned"
    doc = status_json(indexed, pci("0000:00:09.0", ALIAS["blacklisted"]), tmp_path, code=0)
    dev = by_id(doc)["0000:00:09.0"]
    assert dev["verdict"] == "ignored"
    assert dev["installed_modules"] == ["kmg_banned"]
    assert dev["blacklisted"] == ["kmg_banned"]
    assert "kmg_banned" in dev["reason"] and "blacklisted" in dev["reason"]


def test_ignored_when_the_package_blacklists_its_own_module(indexed, tmp_path):
    # kernel-modules-extra ships kmg-extra-blacklist.conf ("blacklist kmg_extra"), like Fedora's.
    # Its other modules are not blacklisted: that device is missing, so only the blacklist explains the first.
    records = pci("0000:00:0a.0", ALIAS["extra_blacklisted"]) + pci("0000:00:0b.0", ALIAS["extra_xz"])
    doc = status_json(indexed, records, tmp_path, code=3)
    dev = by_id(doc)["0000:00:0a.0"]
    assert dev["verdict"] == "ignored", dev
    assert dev["candidates"] == []
    assert dev["blacklisted"] == ["kmg_extra"]
    assert "kernel-modules-extra" in dev["reason"] and "kmg_extra" in dev["reason"]
    other = by_id(doc)["0000:00:0b.0"]
    assert other["verdict"] == "missing"
    assert other["candidates"][0]["module"] == "kmg_extra_xz"


def test_ignored_by_policy_devices(indexed, tmp_path):
    virtio = "/devices/pci0000:00/0000:00:03.0/virtio0"
    # a PCI device by its address, another by its syspath; a virtio device by its id (= its syspath)
    write_policy(indexed, f'[ignore]\ndevices = ["0000:00:05.0", "{syspath("0000:00:06.0")}", "{SYS}{virtio}"]\n')
    records = (pci("0000:00:05.0", GPU) + pci("0000:00:06.0", GPU) + device(virtio, "virtio", ALIAS["virtio"])
               + pci("0000:00:07.0", GPU))
    doc = status_json(indexed, records, tmp_path, code=3)
    devs = by_id(doc)
    for ref in ("0000:00:05.0", "0000:00:06.0", SYS + virtio):
        assert devs[ref]["verdict"] == "ignored", devs[ref]
        assert "ignore.devices" in devs[ref]["reason"]
    assert devs["0000:00:07.0"]["verdict"] == "missing"  # the same device model, not named: still judged


def test_ignored_by_policy_subsystems(indexed, tmp_path):
    virtio = "/devices/pci0000:00/0000:00:03.0/virtio0"
    write_policy(indexed, '[ignore]\nsubsystems = ["virtio"]\n')
    doc = status_json(indexed, device(virtio, "virtio", ALIAS["virtio"]) + pci("0000:00:05.0", GPU), tmp_path, code=3)
    devs = by_id(doc)
    assert devs[SYS + virtio]["verdict"] == "ignored"
    assert "ignore.subsystems" in devs[SYS + virtio]["reason"] and "'virtio'" in devs[SYS + virtio]["reason"]
    assert devs["0000:00:05.0"]["verdict"] == "missing"


def _status_with_cpu_bus(runner, records: str, tmp_path):
    """umockdev files 'cpu' under /sys/class, not /sys/bus as the kernel does: add the bus dir first."""
    rec = tmp_path / "cpu.umockdev"
    rec.write_text(records)
    prelude = ('mkdir -p "$UMOCKDEV_DIR/sys/bus/cpu/devices" && '
               'ln -s ../../../devices/system/cpu/cpu0 "$UMOCKDEV_DIR/sys/bus/cpu/devices/cpu0" && exec "$0" "$@"')
    cmd = ["umockdev-run", "--device", str(rec), "--", "sh", "-c", prelude,
           sys.executable, "-m", "kmodguard", "status", "--json", "--kver", KVER]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=runner.env, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_cpu_subsystem_is_ignored_by_default(indexed, tmp_path):
    cpu = "/devices/system/cpu/cpu0"
    records = device(cpu, "cpu", "cpu:type:x86,ven0000fam0006mod003F:feature:,0000,0001,0002")
    proc = _status_with_cpu_bus(indexed, records, tmp_path)
    assert proc.returncode == 0, proc.stderr
    dev = by_id(json.loads(proc.stdout))[SYS + cpu]
    assert dev["subsystem"] == "cpu"
    assert dev["verdict"] == "ignored"
    assert "ignore.subsystems" in dev["reason"] and "'cpu'" in dev["reason"]
    # The default is what ignores it: a policy with an empty list judges the CPU like any device.
    write_policy(indexed, "[ignore]\nsubsystems = []\n")
    proc = _status_with_cpu_bus(indexed, records, tmp_path)
    assert by_id(json.loads(proc.stdout))[SYS + cpu]["verdict"] == "unknown"


# --- loadable --------------------------------------------------------------------------------

def test_loadable_installed_module(indexed, tmp_path):
    doc = status_json(indexed, pci("0000:00:03.0", ALIAS["installed"]), tmp_path, code=3)
    dev = by_id(doc)["0000:00:03.0"]
    assert dev["verdict"] == "loadable"
    assert dev["installed_modules"] == ["kmg_core_nic"]
    assert dev["builtin"] is False
    assert dev["candidates"] == []
    assert "modprobe kmg_core_nic" in dev["reason"]


def test_loadable_builtin(indexed, tmp_path):
    doc = status_json(indexed, pci("0000:00:04.0", ALIAS["builtin"]), tmp_path, code=3)
    dev = by_id(doc)["0000:00:04.0"]
    assert dev["verdict"] == "loadable"
    assert dev["installed_modules"] == ["kmg_builtin"]
    assert dev["builtin"] is True
    assert "built-in" in dev["reason"]


# --- missing ---------------------------------------------------------------------------------

def test_missing_names_module_package_version_request_and_absent_firmware(indexed, tmp_path):
    doc = status_json(indexed, pci("0000:00:05.0", GPU), tmp_path, code=3)
    dev = by_id(doc)["0000:00:05.0"]
    assert dev["verdict"] == "missing"
    assert dev["installed_modules"] == []
    assert dev["candidates"] == [{
        "module": "kmg_gpu",
        "package": "kernel-modules",
        "version": PACKAGE_VERSION,
        "request": f"kernel-modules-uname-r = {KVER}",
        "firmware_missing": ["kmg/gpu_absent.bin"],  # gpu_present.bin is in the firmware dir
        "origin": "index",  # not announced by a repository's metadata
    }]
    assert "kmg_gpu" in dev["reason"] and "kernel-modules" in dev["reason"]


def test_missing_one_modalias_two_modules(indexed, tmp_path):
    doc = status_json(indexed, pci("0000:00:05.0", ALIAS["twins"]), tmp_path, code=3)
    dev = by_id(doc)["0000:00:05.0"]
    assert dev["verdict"] == "missing"
    assert sorted(c["module"] for c in dev["candidates"]) == ["kmg_twin_a", "kmg_twin_b"]
    assert {c["package"] for c in dev["candidates"]} == {"kernel-modules"}
    assert {c["request"] for c in dev["candidates"]} == {f"kernel-modules-uname-r = {KVER}"}


# --- unindexed, unknown ----------------------------------------------------------------------

def test_unindexed_when_no_index_was_built(kmodguard, tmp_path):
    records = pci("0000:00:05.0", GPU) + pci("0000:00:03.0", ALIAS["installed"], driver="kmg_core_nic")
    doc = status_json(kmodguard, records, tmp_path)
    dev = by_id(doc)["0000:00:05.0"]
    assert dev["verdict"] == "unindexed"
    assert dev["candidates"] == []
    assert "kmodguard index build" in dev["reason"] and KVER in dev["reason"]
    assert doc["environment"]["index"]["packages"] == []
    human = status(kmodguard, records, tmp_path).stdout
    assert "unindexed: " in human and "kmodguard index build" in human


def test_unknown_when_no_package_has_a_driver(indexed, tmp_path):
    doc = status_json(indexed, pci("0000:00:08.0", ALIAS["none"]), tmp_path, code=0)
    dev = by_id(doc)["0000:00:08.0"]
    assert dev["verdict"] == "unknown"
    assert dev["candidates"] == [] and dev["installed_modules"] == []
    assert "kernel-modules" in dev["reason"] and "no driver" in dev["reason"]


# --- SR-IOV with autoprobe on -------------------------------------------------------------------

def test_sriov_vfs_of_a_pf_with_autoprobe_on_are_judged_normally(indexed, tmp_path):
    pf = pci("0000:00:07.0", ALIAS["installed"], driver="kmg_core_nic",
             attrs={"sriov_drivers_autoprobe": "1", "sriov_numvfs": "2", "sriov_totalvfs": "8",
                    "vendor": "0xaaaa", "device": "0x0001", "class": "0x020000"},
             links={"virtfn0": "../0000:00:07.1", "virtfn1": "../0000:00:07.2"})
    vfs = "".join(pci(a, ALIAS["installed"], links={"physfn": "../0000:00:07.0"}) for a in ("0000:00:07.1", "0000:00:07.2"))
    doc = status_json(indexed, pf + vfs, tmp_path, code=3)
    devs = by_id(doc)
    assert devs["0000:00:07.0"]["verdict"] == "bound"
    assert devs["0000:00:07.0"]["pci"] == {
        "vendor": "aaaa", "device": "0001", "subsystem_vendor": None, "subsystem_device": None, "class": "020000",
        "physfn": None, "virtfns": [syspath("0000:00:07.1"), syspath("0000:00:07.2")],
        "sriov_numvfs": 2, "sriov_drivers_autoprobe": True,
    }
    for vf in ("0000:00:07.1", "0000:00:07.2"):
        assert devs[vf]["verdict"] == "loadable", devs[vf]
        assert devs[vf]["installed_modules"] == ["kmg_core_nic"]
        assert devs[vf]["pci"]["physfn"] == syspath("0000:00:07.0")
        assert devs[vf]["pci"]["virtfns"] == []
        assert devs[vf]["pci"]["sriov_drivers_autoprobe"] is True


@pytest.mark.parametrize("numvfs,vendor", [("9" * 5000, "0x" + "f" * 5000), ("\u00b2", "0x\u0661\u0662"),
                                           ("-1", "zz"), ("", "")])
def test_hostile_sysfs_numbers_are_no_numbers(indexed, tmp_path, numvfs, vendor):
    # Python refuses int() of 4,300+ digits and takes '\u00b2'.isdigit() as true: neither may end the command.
    pf = pci("0000:00:07.0", ALIAS["installed"], driver="kmg_core_nic",
             attrs={"sriov_numvfs": numvfs, "vendor": vendor, "device": "0x0001"})
    doc = status_json(indexed, pf, tmp_path, code=0)
    facts = by_id(doc)["0000:00:07.0"]["pci"]
    assert (facts["sriov_numvfs"], facts["vendor"], facts["device"]) == (None, None, "0001")


# --- other buses -----------------------------------------------------------------------------

@pytest.mark.parametrize("path, subsystem, alias, module", [
    ("/devices/pci0000:00/0000:00:03.0/virtio0", "virtio", ALIAS["virtio"], "kmg_virtio"),
    ("/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/2b99a10c-ffac-4d8e-8fc6-d19e3d9cf5e0", "vmbus",
     ALIAS["vmbus"], "kmg_vmbus"),
    ("/devices/vif-0", "xen", ALIAS["xen"], "kmg_xen"),
], ids=["virtio", "vmbus", "xen"])
def test_missing_on_other_buses(indexed, tmp_path, path, subsystem, alias, module):
    doc = status_json(indexed, device(path, subsystem, alias), tmp_path, code=3)
    [dev] = doc["devices"]
    assert dev["id"] == dev["syspath"] == SYS + path  # not a PCI device: its id is the syspath
    assert (dev["subsystem"], dev["modalias"], dev["verdict"]) == (subsystem, alias, "missing")
    assert [(c["module"], c["package"], c["request"]) for c in dev["candidates"]] == [
        (module, "kernel-modules", f"kernel-modules-uname-r = {KVER}")]
    assert "pci" not in dev


def test_acpi_node_is_judged_through_its_physical_node(indexed, tmp_path):
    node = "/devices/LNXSYSTM:00/LNXSYBUS:00/KMG0001:00"
    lonely = "/devices/LNXSYSTM:00/LNXSYBUS:00/KMG0002:00"
    records = (device(node, "acpi", "acpi:KMG0001:", links={"physical_node": "../../../pci0000:00/0000:00:05.0"})
               + pci("0000:00:05.0", GPU, links={"firmware_node": "../../LNXSYSTM:00/LNXSYBUS:00/KMG0001:00"})
               + device(lonely, "acpi", "acpi:KMG0002:"))
    doc = status_json(indexed, records, tmp_path, code=3)
    devs = by_id(doc)
    acpi = devs[SYS + node]
    assert acpi["verdict"] == "ignored", acpi
    assert syspath("0000:00:05.0") in acpi["reason"]
    assert devs["0000:00:05.0"]["verdict"] == "missing"  # the companion carries the verdict
    assert devs[SYS + lonely]["verdict"] == "unknown"  # no physical node: judged itself
