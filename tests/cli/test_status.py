"""`kmodguard status` on umockdev-faked devices: every verdict, every bus, the JSON contract, the
human output and hostile sysfs strings, checked the way a user would read them.

Devices are hand-written umockdev records; the CLI runs for real under `umockdev-run`, against the
synthetic world of gcc-built modules (see synthetic.py: ALIAS names a modalias for each outcome).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from records import device, pci
from synthetic import ALIAS, KVER

PACKAGE_VERSION = "6.1.0-1.kmg"  # what the `indexed` fixture records
SYS = "/sys"
GPU = ALIAS["gpu"]  # missing: kmg_gpu in kernel-modules (if unbound and not ignored)


# --- records ---------------------------------------------------------------------------------

def syspath(addr: str) -> str:
    return f"{SYS}/devices/pci0000:00/{addr}"


# --- running ---------------------------------------------------------------------------------

def status(runner, records: str, tmp_path, *args: str, code: int | None = None, env: dict | None = None):
    """`kmodguard status --kver KVER ARGS` with exactly these devices; `env` adds variables."""
    run = runner.with_devices(records, tmp_path)
    if env:
        run = dataclasses.replace(run, env={**run.env, **env})
    return run("status", "--kver", KVER, *args, check_code=code)


def status_json(runner, records: str, tmp_path, code: int | None = None, env: dict | None = None) -> dict:
    res = status(runner, records, tmp_path, "--json", code=code, env=env)
    return res.json


def by_id(doc: dict) -> dict:
    return {d["id"]: d for d in doc["devices"]}


def write_policy(runner, text: str) -> None:
    etc = Path(runner.env["KMODGUARD_CONFIG_DIR"])
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "kmodguard.toml").write_text(text)


def assert_no_control_characters(text: str) -> None:
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    assert not bad, f"raw control characters in output: {bad!r}"


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


# --- the JSON contract -----------------------------------------------------------------------

DEVICE_KEYS = {"id", "syspath", "subsystem", "modalias", "driver", "verdict", "reason", "installed_modules",
               "candidates"}


def test_json_document_shape(indexed, world, tmp_path):
    records = (pci("0000:00:03.0", ALIAS["installed"], driver="kmg_core_nic") + pci("0000:00:05.0", GPU)
               + device("/devices/pci0000:00/0000:00:04.0/virtio1", "virtio", ALIAS["virtio"]))
    res = status(indexed, records, tmp_path, "--json", code=3)
    assert res.stdout.count("\n{") == 0 and res.stdout.startswith("{")  # exactly one document
    doc = res.json
    assert {"kernel", "environment", "daemon", "devices"} <= set(doc)
    assert doc["kernel"] == KVER
    env = doc["environment"]
    assert {"container", "image_mode", "modules_dir", "index", "can_install"} <= set(env)
    assert env["modules_dir"] == str(world.installed)
    assert env["image_mode"] is None
    assert sorted(p["package"] for p in env["index"]["packages"]) == ["kernel-modules", "kernel-modules-extra"]
    assert all(p["version"] == PACKAGE_VERSION for p in env["index"]["packages"])
    assert env["index"]["errors"] == []
    assert doc["daemon"] is None  # no daemon snapshot in the runtime dir
    assert [d["id"] for d in doc["devices"]] == ["0000:00:03.0", "/sys/devices/pci0000:00/0000:00:04.0/virtio1",
                                                 "0000:00:05.0"]  # sorted by syspath
    for dev in doc["devices"]:
        assert DEVICE_KEYS <= set(dev), dev
        assert dev["verdict"] in ("bound", "ignored", "loadable", "missing", "unindexed", "unknown")
        assert isinstance(dev["reason"], str) and dev["reason"]
        assert dev["syspath"].startswith("/sys/devices/")
        if dev["subsystem"] == "pci":
            assert dev["id"] == dev["syspath"].rsplit("/", 1)[1]
        else:
            assert dev["id"] == dev["syspath"]
    devs = by_id(doc)
    assert devs["0000:00:03.0"]["driver"] == "kmg_core_nic"
    assert devs["0000:00:05.0"]["driver"] is None
    assert devs["0000:00:05.0"]["modalias"] == GPU


def test_daemon_snapshot_is_attached_while_its_writer_lives(indexed, tmp_path):
    # the real daemon writes it (tests/daemon/test_daemon.py); here a live process stands in for it
    snapshot = {"pid": os.getpid(), "mode": "offer", "since": "2026-01-01T00:00:00Z",
                "needs_driver": ["0000:00:05.0"], "last_fix": None, "extra": {"kept": True}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps(snapshot))
    assert indexed.env["KMODGUARD_RUNTIME_DIR"] == str(run)
    doc = status_json(indexed, pci("0000:00:05.0", GPU), tmp_path, code=3)
    assert doc["daemon"] == snapshot
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / "state.json").write_text(json.dumps({**snapshot, "pid": gone.pid}))  # a killed daemon's leftover
    assert status_json(indexed, pci("0000:00:05.0", GPU), tmp_path, code=3)["daemon"] is None


@pytest.mark.parametrize("content", ['["not", "an", "object"]', "{truncated", "", "\xff"],
                         ids=["a-list", "truncated", "empty", "not-utf8"])
def test_daemon_snapshot_that_is_not_an_object_is_null(indexed, tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(content, "latin-1")
    doc = status_json(indexed, pci("0000:00:05.0", GPU), tmp_path, code=3)
    assert doc["daemon"] is None
    assert by_id(doc)["0000:00:05.0"]["verdict"] == "missing"


def test_exit_code_0_when_nothing_needs_action(indexed, tmp_path):
    records = (pci("0000:00:03.0", ALIAS["installed"], driver="kmg_core_nic")  # bound
               + pci("0000:00:05.0", GPU, override="vfio-pci")  # ignored
               + pci("0000:00:08.0", ALIAS["none"]))  # unknown
    doc = status_json(indexed, records, tmp_path, code=0)
    assert sorted(d["verdict"] for d in doc["devices"]) == ["bound", "ignored", "unknown"]
    assert status(indexed, records, tmp_path, code=0).returncode == 0  # human output too


@pytest.mark.parametrize("alias, verdict", [(ALIAS["installed"], "loadable"), (GPU, "missing")],
                         ids=["loadable", "missing"])
def test_exit_code_3_when_one_device_needs_action(indexed, tmp_path, alias, verdict):
    records = (pci("0000:00:03.0", ALIAS["installed"], driver="kmg_core_nic")
               + pci("0000:00:08.0", ALIAS["none"]) + pci("0000:00:09.0", alias))
    doc = status_json(indexed, records, tmp_path, code=3)
    assert by_id(doc)["0000:00:09.0"]["verdict"] == verdict
    assert status(indexed, records, tmp_path, code=3).returncode == 3


def test_no_devices_at_all(indexed, tmp_path):
    # A record file whose only device has no modalias: nothing to judge, exit 0.
    doc = status_json(indexed, "P: /devices/platform/kmg-nomodalias\nE: SUBSYSTEM=platform\n\n", tmp_path, code=0)
    assert doc["devices"] == []


# --- human output ----------------------------------------------------------------------------

def _sections(text: str) -> dict[str, list[str]]:
    """Heading line -> the lines under it, for the verdict groups of the human output."""
    sections, current = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "(" in line and line.split(":")[0].split(" ")[0] in (
                "missing", "loadable", "unindexed", "unknown", "ignored", "bound"):
            current = line
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line)
    return sections


MIXED = (pci("0000:00:01.0", GPU) + pci("0000:00:02.0", ALIAS["extra_xz"])
         + pci("0000:00:03.0", ALIAS["installed"]) + pci("0000:00:04.0", ALIAS["builtin"])
         + pci("0000:00:08.0", ALIAS["none"]) + pci("0000:00:09.0", ALIAS["blacklisted"])
         + pci("0000:00:0a.0", ALIAS["installed"], driver="kmg_core_nic"))


def test_human_output_groups_devices_by_verdict(indexed, tmp_path):
    out = status(indexed, MIXED, tmp_path, code=3).stdout
    assert out.splitlines()[0] == f"kmodguard: kernel {KVER}, 7 devices with a modalias"
    sections = _sections(out)
    headings = list(sections)
    assert [h.split(":")[0].split(" ")[0] for h in headings] == ["missing", "loadable", "unknown", "ignored", "bound"]
    assert [h.rsplit("(", 1)[1] for h in headings] == ["2)", "2)", "1)", "1)", "1)"]
    members = {h.split(":")[0].split(" ")[0]: "\n".join(lines) for h, lines in sections.items()}
    assert "0000:00:01.0" in members["missing"] and "kmg_gpu in kernel-modules" in members["missing"]
    assert "0000:00:02.0" in members["missing"] and "kmg_extra_xz in kernel-modules-extra" in members["missing"]
    assert "0000:00:03.0" in members["loadable"] and "0000:00:04.0" in members["loadable"]
    assert "modprobe -a kmg_core_nic" in members["loadable"]
    assert "0000:00:08.0" in members["unknown"]
    # bound and ignored are only counted unless --all
    assert "0000:00:09.0" not in out and "0000:00:0a.0" not in out
    assert "--all" in members["ignored"]
    every = _sections(status(indexed, MIXED, tmp_path, "--all", code=3).stdout)
    listed = {h.split(":")[0].split(" ")[0]: "\n".join(lines) for h, lines in every.items()}
    assert "0000:00:09.0" in listed["ignored"] and "kmg_banned" in listed["ignored"]
    assert "0000:00:0a.0" in listed["bound"] and "kmg_core_nic" in listed["bound"]


def test_human_output_gives_the_exact_install_command(indexed, tmp_path):
    out = status(indexed, MIXED, tmp_path, code=3, env={"KMODGUARD_CONTAINER": "none"}).stdout
    missing = _sections(out)[next(h for h in _sections(out) if h.startswith("missing"))]
    [command] = [line.split("next:", 1)[1] for line in missing if line.strip().startswith("next:")]
    argv = shlex.split(command)  # what the shell makes of it when the user pastes it
    assert "install" in argv
    requests = argv[argv.index("install") + 1:]
    assert requests == [f"kernel-modules-uname-r = {KVER}", f"kernel-modules-extra-uname-r = {KVER}"]
    assert "nothing can be installed" not in out


def test_human_output_in_a_container_installs_nothing(indexed, tmp_path):
    env = {"KMODGUARD_CONTAINER": "docker"}
    res = status(indexed, MIXED, tmp_path, code=3, env=env)
    assert "nothing can be installed here" in res.stdout
    assert "container (docker)" in res.stdout
    assert "uname-r = " not in res.stdout  # no install command is offered
    doc = status_json(indexed, MIXED, tmp_path, code=3, env=env)
    assert doc["environment"]["container"] == "docker"
    assert doc["environment"]["can_install"] is False
    assert by_id(doc)["0000:00:01.0"]["verdict"] == "missing"  # still reported as seen


# --- hostile sysfs strings -------------------------------------------------------------------

def _hostile_run(runner, tmp_path, bad: dict[str, bytes], *args: str, code: int | None = 3):
    """Devices with raw-byte modaliases (E: and A:) plus one normal 'missing' GPU; the file is built as bytes."""
    data = b""
    for addr, raw in bad.items():
        uevent = b"SUBSYSTEM=pci\nPCI_SLOT_NAME=" + addr.encode() + b"\nMODALIAS=" + raw + b"\n"
        # H: lines carry hex, so any byte fits (the record parser itself wants UTF-8 text)
        data += (f"P: /devices/pci0000:00/{addr}\nE: SUBSYSTEM=pci\n".encode()
                 + b"H: uevent=" + uevent.hex().encode() + b"\n"
                 + b"H: modalias=" + (raw + b"\n").hex().encode() + b"\n"
                 + b"A: driver_override=(null)\n\n")
    data += pci("0000:00:05.0", GPU).encode()
    path = tmp_path / f"hostile-{len(list(tmp_path.glob('hostile-*')))}.umockdev"
    path.write_bytes(data)
    run = dataclasses.replace(runner, umockdev=path)
    return run("status", "--kver", KVER, *args, check_code=code)


def _judged_despite(doc: dict, addr: str, fragment: str) -> dict:
    devs = by_id(doc)
    assert devs["0000:00:05.0"]["verdict"] == "missing"  # the other devices are still judged
    dev = devs[addr]
    assert dev["verdict"] == "unknown", dev
    assert "malformed modalias" in dev["reason"] and fragment in dev["reason"], dev["reason"]
    assert dev["candidates"] == [] and dev["installed_modules"] == []
    return dev


@pytest.mark.parametrize("raw", [b"pci:v0000\x01ABCD", b"pci:v0000AAAA\x1b[2J\x1b[31mRED", b"pci:v0000\rAAAA\x7f",
                                 b"pci:v0000\xc2\x9bAAAA"],  # the last: U+009B, a C1 CSI in UTF-8
                         ids=["soh", "ansi-escape", "cr-del", "c1-csi"])
def test_hostile_control_characters(indexed, tmp_path, raw):
    doc = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}, "--json").json
    dev = _judged_despite(doc, "0000:00:01.0", "only printable ASCII")
    assert dev["modalias"] == raw.decode("utf-8")  # reported as the device wrote it (JSON escapes it)
    res = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw})
    assert_no_control_characters(res.stdout)
    assert_no_control_characters(res.stderr)
    assert "0000:00:01.0" in res.stdout and "malformed modalias" in res.stdout


@pytest.mark.parametrize("raw", [b"pci:v0000AAAA\x0b", b"\x1cpci:v0000AAAA", b"pci:v0000AAAA\x1f\x1e ",
                                 b"\x0cpci:v0000AAAA\t"], ids=["trailing-vt", "leading-fs", "trailing-us-rs", "ff-tab"])
def test_control_bytes_at_either_end_are_kept_and_refused(indexed, tmp_path, raw):
    """Whitespace to str.strip() (\x0b, \x1c..\x1f, \x0c, \t, blanks) is a control byte to a modalias:
    kept as the device wrote it, and refused, not silently trimmed into a well-formed one."""
    doc = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}, "--json").json
    dev = _judged_despite(doc, "0000:00:01.0", "only printable ASCII")
    assert dev["modalias"] == raw.decode()


def test_hostile_shell_metacharacters(indexed, tmp_path):
    marker = tmp_path / "PWNED"
    bad = {
        "0000:00:01.0": f"pci:$(touch${{IFS}}{marker});rm".encode(),
        "0000:00:02.0": f"pci:`touch${{IFS}}{marker}`|&&>x".encode(),
    }
    doc = _hostile_run(indexed, tmp_path, bad, "--json").json
    devs = by_id(doc)
    assert devs["0000:00:05.0"]["verdict"] == "missing"
    for addr, raw in bad.items():
        # well-formed (printable ASCII, a bus name): judged like any other string, matching nothing
        assert devs[addr]["modalias"] == raw.decode()
        assert devs[addr]["verdict"] == "unknown", devs[addr]
    res = _hostile_run(indexed, tmp_path, bad)
    assert "pci:$(touch${IFS}/" in res.stdout and "pci:`touch${IFS}/" in res.stdout  # shown as text
    assert not marker.exists()


def test_hostile_very_long_modalias(indexed, tmp_path):
    raw = b"pci:v" + b"A" * 4995  # 5000 characters; sysfs never writes more than a page
    doc = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}, "--json").json
    dev = _judged_despite(doc, "0000:00:01.0", "5000 characters long")
    assert dev["modalias"] == raw.decode()
    out = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}).stdout
    assert "0000:00:01.0" in out and "5000 characters long" in out
    assert max(len(line) for line in out.splitlines()) < 600  # shortened for a terminal


def test_hostile_non_utf8_modalias(indexed, tmp_path):
    raw = b"pci:v0000\xff\xfeBBBBd\x80"
    doc = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}, "--json").json
    dev = _judged_despite(doc, "0000:00:01.0", "only printable ASCII")
    # bytes kept visible as \xNN text, not replaced, and no lone surrogate for strict JSON parsers
    assert dev["modalias"] == "pci:v0000\\xff\\xfeBBBBd\\x80"
    res = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw})
    assert "\ufffd" not in res.stdout  # the runner decodes with 'replace': stdout was valid UTF-8
    assert_no_control_characters(res.stdout)
    assert "pci:v0000\\xff\\xfeBBBBd\\x80" in res.stdout  # the bytes as sysfs holds them
    assert "'\\xff' (a byte that is not UTF-8)" in res.stdout


def test_hostile_non_utf8_modalias_without_the_attribute(indexed, tmp_path):
    # Only the uevent carries MODALIAS (no modalias attribute file): the device must still be reported.
    raw = b"pci:v0000\xff\xfeBBBB"
    uevent = b"SUBSYSTEM=pci\nMODALIAS=" + raw + b"\n"
    records = (b"P: /devices/pci0000:00/0000:00:01.0\nE: SUBSYSTEM=pci\nH: uevent=" + uevent.hex().encode()
               + b"\nA: driver_override=(null)\n\n" + pci("0000:00:05.0", GPU).encode())
    path = tmp_path / "uevent-only.umockdev"
    path.write_bytes(records)
    doc = dataclasses.replace(indexed, umockdev=path)("status", "--json", "--kver", KVER, check_code=3).json
    dev = _judged_despite(doc, "0000:00:01.0", "only printable ASCII")
    assert dev["modalias"] == "pci:v0000\\xff\\xfeBBBB"


def test_hostile_devices_all_at_once(indexed, tmp_path):
    bad = {
        "0000:00:01.0": b"pci:v0000\x01ABCD",
        "0000:00:02.0": b"pci:$(reboot);rm",
        "0000:00:03.0": b"pci:v" + b"A" * 4995,
        "0000:00:04.0": b"pci:v0000\xff\xfe",
    }
    doc = _hostile_run(indexed, tmp_path, bad, "--json").json
    assert len(doc["devices"]) == 5
    assert [by_id(doc)[a]["verdict"] for a in bad] == ["unknown"] * 4
    res = _hostile_run(indexed, tmp_path, bad)
    assert_no_control_characters(res.stdout)
    assert all(a in res.stdout for a in bad)
