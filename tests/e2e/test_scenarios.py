"""kmodguard on a real kernel: Debian's 6.1 in QEMU (TCG), real udevd, a real system bus
(dbus-daemon --system), `kmodguard daemon` reacting to the devices by itself, real dnf/rpm with
signature checks, real dracut/lsinitrd. Each test asserts what a user would check in the guest:
the driver bound (sysfs), the packages installed (the rpm database), the transactions (dnf's
history, rpm's install transaction ids), the initramfs (who ran dracut, lsinitrd of the image), and
what the daemon said: its first verdict, its fixes, its snapshot, its MOTD, its D-Bus signals.

The scenarios run two at a time from the module's fixture (conftest.py); see tests/e2e/README.md.
Nothing here skips: a missing tool or kernel package fails the test with the reason.
"""

from __future__ import annotations

import itertools
import json
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
    """A scenario that may take four times its usual time (at least 10 minutes) before it fails:
    a hung guest costs minutes, not the CI's whole budget, and a slow day (TCG on a busy host ran
    guests three times slower than the hints) is not a failure."""
    return Entry(Scenario(timeout=max(600.0, 4 * hint), **kw), hint)


SCENARIOS = {
    "hda": entry(100, hotplug=["intel-hda"], name="hda"),
    "storage": entry(130, hotplug=["megasas"], initramfs="always", name="storage"),
    "e1000e": entry(25, hotplug=["e1000e"], name="e1000e"),
    "testdev": entry(25, hotplug=["pci-testdev"], name="testdev"),
    "offer": entry(25, hotplug=["intel-hda"], mode="offer", name="offer"),
    "passthrough": entry(25, passthrough=["intel-hda"], name="passthrough"),
    "four": entry(100, hotplug=["intel-hda", "megasas", "tulip", "ES1370"], name="four"),
    "full": entry(150, hotplug=["AC97"], full_modules=True, name="full"),
}

# test function -> its scenario (the fixture starts the selected ones up front; tests may share one)
TESTS = {
    "test_hda_installs_kernel_modules_and_leaves_the_initramfs_to_its_posttrans": "hda",
    "test_hda_daemon_signals_on_the_system_bus": "hda",
    "test_storage_controller_with_initramfs_always_is_in_the_rebuilt_image": "storage",
    "test_e1000e_from_kernel_modules_core_binds_with_nothing_installed": "e1000e",
    "test_pci_testdev_has_no_driver_anywhere": "testdev",
    "test_offer_mode_names_the_package_in_status_motd_and_on_the_bus_and_installs_nothing": "offer",
    "test_device_claimed_for_passthrough_is_left_alone": "passthrough",
    "test_four_devices_hotplugged_back_to_back_make_one_fix_and_one_transaction": "four",
    "test_full_kernel_modules_package": "full",
}

BUS_NAME = "org.kmodguard.Daemon1"
PCSPKR = "/sys/devices/platform/pcspkr"


def request_of(run: harness.Run) -> str:
    """'kernel-modules-uname-r = 6.1.0-56.amd64': the exact provide for the guest's kernel release."""
    return f"kernel-modules-uname-r = {rpm_uname(run.doc['kernel'])}"


def device(run: harness.Run, qemu: str) -> dict:
    (d,) = [d for d in run.doc["devices"] if d["device"] == qemu]
    return d


def where(run: harness.Run) -> str:
    return f"results kept in {run.results_dir}"


def daemon(run: harness.Run) -> dict:
    return run.result["daemon"]


def fixes(run: harness.Run) -> list[dict]:
    """Every fix the daemon ran (its fix-started/fix-finished events, with the fix's record)."""
    return daemon(run)["fixes"]


def signals(run: harness.Run, member: str | None = None) -> list[dict]:
    """kmodguard's signals the bus monitor saw, sent by the connection that owned org.kmodguard.Daemon1."""
    owners = {s["args"][2] for s in run.result["bus"]["signals"]
              if s["member"] == "NameOwnerChanged" and s["args"][0] == BUS_NAME and s["args"][2]}
    return [s for s in run.result["bus"]["signals"] if s["interface"] == BUS_NAME and s["sender"] in owners
            and (member is None or s["member"] == member)]


def status_doc(run: harness.Run) -> dict:
    """`kmodguard status --json`, run in the guest while the daemon ran."""
    (doc,) = [k["doc"] for k in run.result["kmodguard"] if k["command"] == "status"]
    return doc


def motd(run: harness.Run) -> str | None:
    (text,) = [k["text"] for k in run.result["kmodguard"] if k["command"] == "motd"]
    return text


def assert_daemon_behaved(run: harness.Run) -> None:
    """Every scenario: the daemon owned its name on the real system bus, logged no error, acted only
    on the scenario's devices (never on q35's LPC bridge or pcspkr, which its default policy
    ignores), and on SIGTERM exited 0 taking its snapshot and MOTD along."""
    d = daemon(run)
    assert d["exit_code"] == 0, where(run)
    assert d["snapshot_removed"] and d["motd_removed"], where(run)
    assert d["bus"] == BUS_NAME, where(run)
    owners = [s["args"] for s in run.result["bus"]["signals"] if s["member"] == "NameOwnerChanged"]
    assert len(owners) == 2 and owners[0][1] == "" and owners[1][2] == "" and owners[0][2] == owners[1][1], where(run)
    assert d["log"]["errors"] == [] and d["log"]["not_json"] == [], where(run)
    assert d["first_snapshot_decisions"] >= 1, where(run)
    ours = {x["address"] for x in run.doc["devices"]}
    for f in fixes(run):
        assert set(f["devices"]) <= ours, (f["devices"], where(run))
    status = {x["id"]: x for x in status_doc(run)["devices"]}
    assert status[harness.LPC]["verdict"] == "ignored" and "lpc_ich" in status[harness.LPC]["reason"], where(run)
    assert status[PCSPKR]["verdict"] == "ignored", where(run)
    assert not any(e.get("device") in (harness.LPC, PCSPKR) and e["kind"] == "verdict" and e["verdict"] != "ignored"
                   for e in d["events"]), where(run)


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


def assert_one_auto_fix(run: harness.Run, addresses: list[str]) -> dict:
    """The daemon ran exactly one fix, of its own accord, for exactly these devices; it bound them."""
    (fix,) = fixes(run)
    assert fix["requested_by"] == "auto" and sorted(fix["devices"]) == sorted(addresses), where(run)
    assert fix["exit_code"] == 0, where(run)
    assert fix["outcomes"] == {a: "now-bound" for a in addresses}, where(run)
    assert fix["record"]["requested_by"] == "auto" and sorted(fix["record"]["devices"]) == sorted(addresses), where(run)
    assert daemon(run)["last_fix"]["id"] == fix["request"], where(run)  # /var/lib/kmodguard/last-fix.json
    return fix


def assert_nothing_installed(run: harness.Run) -> None:
    assert run.doc["packages_installed"] == [], where(run)
    assert run.doc["transactions"] == 0 and run.doc["rpm_transactions"] == 0, where(run)
    assert "kernel-modules" not in run.result["rpm_qa"], where(run)
    assert run.doc["initramfs"]["rebuilds"] == [] and not run.doc["initramfs"]["changed"], where(run)
    assert fixes(run) == [], where(run)
    assert daemon(run)["last_fix"] is None, where(run)


def assert_verdict_timing(run: harness.Run, d: dict) -> None:
    """A device no installed module matches (missing, unknown) is announced as soon as it is
    judged: before timeouts.settle has passed. One an installed module matches waits for udev to
    load it, at most the settle window (its bind ends the wait), and is judged soon after. The host
    saw the same from QMP's device_add (its clock lined up with the guest's through the serial marks)."""
    settle = daemon(run)["settle"]
    t = d["timings"]
    if d["verdict"] in ("missing", "unknown"):
        assert 0 <= t["event_to_verdict_s"] < settle, (t, where(run))
    else:
        assert 0 <= t["event_to_verdict_s"] < settle + 8, (t, where(run))
    assert 0 <= t["device_add_to_event_s"] < 5, (t, where(run))
    assert t["event_to_verdict_s"] <= t["device_add_to_verdict_s"] < t["event_to_verdict_s"] + 5, (t, where(run))


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
    assert_one_auto_fix(run, [d["address"]])
    assert_daemon_behaved(run)
    # the package's %posttrans ran dracut once; kmodguard did not run it a second time
    assert run.doc["initramfs"]["rebuilds"] == ["package"], where(run)
    posttrans = f"kernel-modules posttrans: dracut -f --kver {run.doc['kernel']}"
    assert posttrans in run.result["initramfs"]["scriptlet_log"], where(run)
    assert d["initramfs_rebuilt_by"] == "package", where(run)
    assert not d["initramfs_has_module"], where(run)  # not needed at boot: not put there
    assert run.doc["initramfs"]["drop_in"] is None, where(run)
    assert_verdict_timing(run, d)
    t = d["timings"]  # install's end is the fix's start plus its timed steps: compare loosely
    assert t["event_to_verdict_s"] < t["event_to_installed_s"] <= t["event_to_bound_s"] + 0.5, (t, where(run))
    assert t["event_to_bound_s"] <= t["event_to_fix_finished_s"] + 0.5, (t, where(run))


def test_hda_daemon_signals_on_the_system_bus(scenario):
    """What a desktop applet or a fleet agent listening on the system bus sees for one hot-plugged
    device: DeviceNeedsDriver naming the package and module, the fix's progress, RemediationFinished
    for that device with exit 0, and DeviceResolved (bound)."""
    run = scenario("hda")
    addr = device(run, "intel-hda")["address"]
    sigs = signals(run)
    needs = [s for s in sigs if s["member"] == "DeviceNeedsDriver" and s["args"][0] == addr]
    assert len(needs) == 1, where(run)
    (need,) = needs
    assert need["args"][2:5] == ["missing", "kernel-modules", "snd_hda_intel"], where(run)
    (done,) = signals(run, "RemediationFinished")
    request, code, record = done["args"][0], done["args"][1], done["record"]
    assert code == 0 and record["requested_by"] == "auto" and record["devices"] == [addr], where(run)
    assert request == fixes(run)[0]["request"], where(run)
    progress = [s for s in signals(run, "FixProgress") if s["args"][0] == request]
    assert any("dnf" in s["args"][1] for s in progress), where(run)
    resolved = [s for s in signals(run, "DeviceResolved") if s["args"] == [addr, "bound"]]
    assert resolved, where(run)
    # needs a driver, then the fix's progress, then its end; resolved once the fix had begun (the
    # daemon may judge the bind event's burst before the fix process has ended, or after)
    order = [need["t"], min(s["t"] for s in progress), done["t"]]
    assert order == sorted(order), (order, where(run))
    assert order[1] < resolved[0]["t"], where(run)
    # the properties a client polls instead: FixRunning went true, then false with a LastResult
    changes = [s["args"][1] for s in run.result["bus"]["signals"] if s["member"] == "PropertiesChanged"]
    running = [c["FixRunning"]["data"] for c in changes if "FixRunning" in c]
    assert running[:2] == [True, False], where(run)


def test_storage_controller_with_initramfs_always_is_in_the_rebuilt_image(scenario, scenarios):
    run = scenario("storage")
    d = device(run, "megasas")
    assert d["verdict"] == "missing", where(run)
    assert d["driver"] == "megaraid_sas", where(run)
    assert_installed_kernel_modules(run, scenarios.build.manifest, trimmed(scenarios))
    fix = assert_one_auto_fix(run, [d["address"]])
    assert_daemon_behaved(run)
    # the drop-in was there before the transaction, so the package's own dracut run put the driver in:
    # one rebuild, and the image (lsinitrd in the guest) holds megaraid_sas
    assert "megaraid_sas" in (run.doc["initramfs"]["drop_in"] or ""), where(run)
    assert run.doc["initramfs"]["rebuilds"] == ["package"], where(run)
    assert "megaraid_sas" in run.result["initramfs"]["modules"], where(run)
    assert d["initramfs_has_module"], where(run)
    assert fix["record"]["report"]["initramfs"]["rebuild"] is True, where(run)


def test_e1000e_from_kernel_modules_core_binds_with_nothing_installed(scenario):
    run = scenario("e1000e")
    d = device(run, "e1000e")
    assert d["verdict"] == "bound", where(run)  # udev loaded e1000e before the daemon's window closed
    assert d["driver"] == "e1000e", where(run)
    assert d["installed"] == [], where(run)
    assert_nothing_installed(run)
    assert_daemon_behaved(run)
    assert_verdict_timing(run, d)
    assert signals(run, "DeviceNeedsDriver") == [], where(run)


def test_pci_testdev_has_no_driver_anywhere(scenario):
    run = scenario("testdev")
    d = device(run, "pci-testdev")
    assert d["verdict"] == "unknown", where(run)
    assert d["candidates"] == [] and d["driver"] is None, where(run)
    assert_nothing_installed(run)
    assert_daemon_behaved(run)
    assert signals(run, "DeviceNeedsDriver") == [], where(run)  # nothing to offer: nobody is bothered


def test_offer_mode_names_the_package_in_status_motd_and_on_the_bus_and_installs_nothing(scenario):
    run = scenario("offer")
    d = device(run, "intel-hda")
    addr = d["address"]
    assert d["verdict"] == "missing", where(run)
    assert d["candidates"][0]["package"] == "kernel-modules", where(run)
    assert d["driver"] is None, where(run)
    assert_nothing_installed(run)
    assert_daemon_behaved(run)
    # `kmodguard status --json`: the device, the package and its exact request; "daemon" is the
    # running daemon's snapshot
    doc = status_doc(run)
    (st,) = [x for x in doc["devices"] if x["id"] == addr]
    assert st["verdict"] == "missing", where(run)
    assert {"module": "snd_hda_intel", "package": "kernel-modules", "request": request_of(run)}.items() <= \
        st["candidates"][0].items(), where(run)
    snap = doc["daemon"]
    assert snap is not None and snap["pid"] == daemon(run)["pid"] and snap["mode"] == "offer", where(run)
    assert snap["needs_driver"] == [addr] and snap["fixes"] == 0 and not snap["fix_running"], where(run)
    assert snap["bus"] == BUS_NAME, where(run)
    # the message of the day: the device, the module, the package, the one command
    text = motd(run)
    assert text is not None, where(run)
    assert addr in text and "snd_hda_intel" in text and "kernel-modules" in text, (text, where(run))
    assert "sudo kmodguard fix" in text, (text, where(run))
    # the bus: DeviceNeedsDriver for it; no fix was run
    (need,) = signals(run, "DeviceNeedsDriver")
    assert need["args"][0] == addr and need["args"][3:5] == ["kernel-modules", "snd_hda_intel"], where(run)
    assert signals(run, "RemediationFinished") == [] and signals(run, "FixProgress") == [], where(run)


def test_device_claimed_for_passthrough_is_left_alone(scenario):
    run = scenario("passthrough")
    d = device(run, "intel-hda")
    assert d["driver_override"] == "vfio-pci", where(run)  # the udev rule ran
    assert d["verdict"] == "ignored" or (d["verdict"] == "bound" and d["driver"] == "vfio-pci"), where(run)
    assert d["driver"] in (None, "vfio-pci"), where(run)
    assert_nothing_installed(run)
    assert_daemon_behaved(run)
    assert signals(run, "DeviceNeedsDriver") == [], where(run)


def test_four_devices_hotplugged_back_to_back_make_one_fix_and_one_transaction(scenario, scenarios):
    run = scenario("four")
    expected = {"intel-hda": "snd_hda_intel", "megasas": "megaraid_sas", "tulip": "tulip", "ES1370": "snd_ens1370"}
    addresses = []
    for qemu, driver in expected.items():
        d = device(run, qemu)
        assert d["verdict"] == "missing", (qemu, where(run))
        assert d["driver"] == driver, (qemu, where(run))
        assert d["installed"] == ["kernel-modules"], (qemu, where(run))
        addresses.append(d["address"])
    # the QMP hot-plugs were back to back: udev's events reached the daemon within one settle window
    # of each other (each was announced when judged, the fix waited for udev to be quiet)
    settle = daemon(run)["settle"]
    arrived = sorted(d["verdict_event"]["uevent_t"] for d in run.result["devices"])
    gaps = [b - a for a, b in itertools.pairwise(arrived)]
    assert max(gaps) < settle, (gaps, settle, where(run))
    # ONE fix by the daemon for all four, ONE dnf transaction naming all four
    assert_one_auto_fix(run, addresses)
    assert_installed_kernel_modules(run, scenarios.build.manifest, trimmed(scenarios))
    (trans,) = run.result["dnf_history"]
    for addr in addresses:
        assert addr in trans["cmdline"] or addr in (trans.get("comment") or ""), where(run)
    assert run.doc["initramfs"]["rebuilds"] == ["package"], where(run)
    assert_daemon_behaved(run)
    for qemu in expected:
        assert_verdict_timing(run, device(run, qemu))


def test_full_kernel_modules_package(scenario, scenarios):
    run = scenario("full")
    d = device(run, "AC97")
    assert d["verdict"] == "missing", where(run)
    assert d["driver"] == "snd_intel8x0", where(run)
    full = scenarios.build.manifest["modules"]["kernel-modules-full"]
    assert full > 2 * trimmed(scenarios)
    assert_installed_kernel_modules(run, scenarios.build.manifest, full)
    assert_one_auto_fix(run, [d["address"]])
    assert_daemon_behaved(run)
    assert run.doc["initramfs"]["rebuilds"] == ["package"], where(run)
