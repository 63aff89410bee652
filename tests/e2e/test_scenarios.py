"""kmodguard on a real kernel: Debian's 6.1 in QEMU (TCG), real udevd, real dnf/rpm with signature
checks, real dracut/lsinitrd. Each test asserts what a user would check in the guest: the driver
bound (sysfs), the packages installed (the rpm database), the transactions (dnf's history, rpm's
install transaction ids), the initramfs (who ran dracut, lsinitrd of the image).

The scenarios run two at a time from the module's fixture (conftest.py); see tests/e2e/README.md.
Nothing here skips: a missing tool or kernel package fails the test with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import harness
import pytest
from artifacts import rpm_uname
from harness import Scenario

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Entry:
    scenario: Scenario
    timeout_hint: float  # the expected wall time (s): the longest start first


def entry(hint: float, **kw) -> Entry:
    """A scenario that may take three times its usual time (at least 5 minutes) before it fails:
    a hung guest costs minutes, not the CI's whole budget."""
    return Entry(Scenario(timeout=max(300.0, 3 * hint), **kw), hint)


SCENARIOS = {
    "hda": entry(85, hotplug=["intel-hda"], name="hda"),
    "storage": entry(125, hotplug=["megasas"], initramfs="always", name="storage"),
    "e1000e": entry(20, hotplug=["e1000e"], name="e1000e"),
    "testdev": entry(20, hotplug=["pci-testdev"], name="testdev"),
    "offer": entry(20, hotplug=["intel-hda"], mode="offer", name="offer"),
    "passthrough": entry(20, passthrough=["intel-hda"], name="passthrough"),
    "four": entry(80, hotplug=["intel-hda", "megasas", "tulip", "ES1370"], name="four"),
    "coldplug": entry(100, coldplug=["lsi53c895a"], name="coldplug"),
    "full": entry(140, hotplug=["AC97"], full_modules=True, name="full"),
}

# test function -> its scenario (the fixture starts the selected ones up front)
TESTS = {
    "test_hda_installs_kernel_modules_and_leaves_the_initramfs_to_its_posttrans": "hda",
    "test_storage_controller_with_initramfs_always_is_in_the_rebuilt_image": "storage",
    "test_e1000e_from_kernel_modules_core_binds_with_nothing_installed": "e1000e",
    "test_pci_testdev_has_no_driver_anywhere": "testdev",
    "test_offer_mode_names_the_package_and_installs_nothing": "offer",
    "test_device_claimed_for_passthrough_is_left_alone": "passthrough",
    "test_four_devices_hotplugged_back_to_back_make_one_transaction": "four",
    "test_coldplugged_device_is_fixed_by_the_startup_run": "coldplug",
    "test_full_kernel_modules_package": "full",
}


def request_of(run: harness.Run) -> str:
    """'kernel-modules-uname-r = 6.1.0-56.amd64': the exact provide for the guest's kernel release."""
    return f"kernel-modules-uname-r = {rpm_uname(run.doc['kernel'])}"


def device(run: harness.Run, qemu: str) -> dict:
    (d,) = [d for d in run.doc["devices"] if d["device"] == qemu]
    return d


def where(run: harness.Run) -> str:
    return f"results kept in {run.results_dir}"


def fixes(run: harness.Run) -> list[dict]:
    return [k for k in run.result["kmodguard"] if k["command"] == "fix"]


def assert_installed_kernel_modules(run: harness.Run, build_manifest: dict, modules: int) -> None:
    """kernel-modules is in the rpm database by its exact provide, signed by the test key, with
    every module file, from exactly one transaction kmodguard tagged."""
    assert run.doc["packages_installed"] == ["kernel-modules"], where(run)
    pkg = run.result["packages"]["kernel-modules"]
    assert pkg["uname_r"] == [request_of(run)], where(run)
    assert pkg["modules"] == modules, where(run)
    assert build_manifest["key_fingerprint"][-16:].lower() in pkg["nevra_sig"].lower(), where(run)
    assert run.doc["transactions"] == 1 and run.doc["rpm_transactions"] == 1, where(run)
    (trans,) = run.result["dnf_history"]
    assert "install" in trans["cmdline"] and request_of(run) in trans["cmdline"], where(run)
    assert "--nogpgcheck" not in trans["cmdline"], where(run)
    assert (trans.get("comment") or trans["cmdline"]).find("kmodguard:") >= 0, where(run)


def assert_nothing_installed(run: harness.Run) -> None:
    assert run.doc["packages_installed"] == [], where(run)
    assert run.doc["transactions"] == 0 and run.doc["rpm_transactions"] == 0, where(run)
    assert "kernel-modules" not in run.result["rpm_qa"], where(run)
    assert run.doc["initramfs"]["rebuilds"] == [] and not run.doc["initramfs"]["changed"], where(run)
    assert fixes(run) == [], where(run)


def trimmed(scenarios) -> int:
    return scenarios.build.manifest["modules"]["kernel-modules-trim"]


def test_hda_installs_kernel_modules_and_leaves_the_initramfs_to_its_posttrans(scenario, scenarios):
    run = scenario("hda")
    d = device(run, "intel-hda")
    assert d["verdict"] == "missing", where(run)
    assert {"module": "snd_hda_intel", "package": "kernel-modules", "request": request_of(run)}.items() <= \
        d["candidates"][0].items(), where(run)
    assert d["driver"] == "snd_hda_intel", where(run)
    assert d["installed"] == ["kernel-modules"], where(run)
    assert_installed_kernel_modules(run, scenarios.build.manifest, trimmed(scenarios))
    # the package's %posttrans ran dracut once; kmodguard did not run it a second time
    assert run.doc["initramfs"]["rebuilds"] == ["package"], where(run)
    posttrans = f"kernel-modules posttrans: dracut -f --kver {run.doc['kernel']}"
    assert posttrans in run.result["initramfs"]["scriptlet_log"], where(run)
    assert d["initramfs_rebuilt_by"] == "package", where(run)
    assert not d["initramfs_has_module"], where(run)  # not needed at boot: not put there
    assert run.doc["initramfs"]["drop_in"] is None, where(run)
    t = d["timings"]  # install's end is estimated from kmodguard's step times: compare loosely
    assert 0 < t["event_to_verdict_s"] < t["event_to_installed_s"], where(run)
    assert t["event_to_verdict_s"] < t["event_to_bound_s"], where(run)


def test_storage_controller_with_initramfs_always_is_in_the_rebuilt_image(scenario, scenarios):
    run = scenario("storage")
    d = device(run, "megasas")
    assert d["verdict"] == "missing", where(run)
    assert d["driver"] == "megaraid_sas", where(run)
    assert_installed_kernel_modules(run, scenarios.build.manifest, trimmed(scenarios))
    # the drop-in was there before the transaction, so the package's own dracut run put the driver in:
    # one rebuild, and the image (lsinitrd in the guest) holds megaraid_sas
    assert "megaraid_sas" in (run.doc["initramfs"]["drop_in"] or ""), where(run)
    assert run.doc["initramfs"]["rebuilds"] == ["package"], where(run)
    assert "megaraid_sas" in run.result["initramfs"]["modules"], where(run)
    assert d["initramfs_has_module"], where(run)
    (fix,) = fixes(run)
    assert fix["doc"]["initramfs"]["rebuild"] is True, where(run)


def test_e1000e_from_kernel_modules_core_binds_with_nothing_installed(scenario):
    run = scenario("e1000e")
    d = device(run, "e1000e")
    assert d["verdict"] == "bound", where(run)
    assert d["driver"] == "e1000e", where(run)
    assert d["installed"] == [], where(run)
    assert_nothing_installed(run)


def test_pci_testdev_has_no_driver_anywhere(scenario):
    run = scenario("testdev")
    d = device(run, "pci-testdev")
    assert d["verdict"] == "unknown", where(run)
    assert d["candidates"] == [] and d["driver"] is None, where(run)
    assert_nothing_installed(run)


def test_offer_mode_names_the_package_and_installs_nothing(scenario):
    run = scenario("offer")
    d = device(run, "intel-hda")
    assert d["verdict"] == "missing", where(run)
    assert d["candidates"][0]["package"] == "kernel-modules", where(run)
    assert d["driver"] is None, where(run)
    assert_nothing_installed(run)
    (text,) = [k["text"] for k in run.result["kmodguard"] if k["command"] == "status-text"]
    assert "kernel-modules" in text and request_of(run) in text, where(run)


def test_device_claimed_for_passthrough_is_left_alone(scenario):
    run = scenario("passthrough")
    d = device(run, "intel-hda")
    assert d["driver_override"] == "vfio-pci", where(run)  # the udev rule ran
    assert d["verdict"] == "ignored" or (d["verdict"] == "bound" and d["driver"] == "vfio-pci"), where(run)
    assert d["driver"] in (None, "vfio-pci"), where(run)
    assert_nothing_installed(run)


def test_four_devices_hotplugged_back_to_back_make_one_transaction(scenario, scenarios):
    run = scenario("four")
    expected = {"intel-hda": "snd_hda_intel", "megasas": "megaraid_sas", "tulip": "tulip", "ES1370": "snd_ens1370"}
    for qemu, driver in expected.items():
        d = device(run, qemu)
        assert d["verdict"] == "missing", (qemu, where(run))
        assert d["driver"] == driver, (qemu, where(run))
        assert d["installed"] == ["kernel-modules"], (qemu, where(run))
    assert_installed_kernel_modules(run, scenarios.build.manifest, trimmed(scenarios))
    (trans,) = run.result["dnf_history"]
    for qemu in expected:
        assert device(run, qemu)["address"] in trans["cmdline"], where(run)  # one transaction for all four
    assert run.doc["initramfs"]["rebuilds"] == ["package"], where(run)


def test_coldplugged_device_is_fixed_by_the_startup_run(scenario, scenarios):
    run = scenario("coldplug")
    d = device(run, "lsi53c895a")
    assert d["how"] == "coldplug" and d["verdict"] == "missing", where(run)
    assert d["driver"] == "sym53c8xx", where(run)
    assert_installed_kernel_modules(run, scenarios.build.manifest, trimmed(scenarios))
    (fix,) = fixes(run)
    assert fix["when"] == "startup" and fix["exit"] == 0, where(run)


def test_full_kernel_modules_package(scenario, scenarios):
    run = scenario("full")
    d = device(run, "AC97")
    assert d["verdict"] == "missing", where(run)
    assert d["driver"] == "snd_intel8x0", where(run)
    full = scenarios.build.manifest["modules"]["kernel-modules-full"]
    assert full > 2 * trimmed(scenarios)
    assert_installed_kernel_modules(run, scenarios.build.manifest, full)
    assert run.doc["initramfs"]["rebuilds"] == ["package"], where(run)
