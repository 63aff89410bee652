"""kmodguard as it ships: installed from its RPM (`rpm -i`, scriptlets run) into a guest that boots
the real systemd as PID 1, with journald, udevd, the system bus, the real polkitd reading the
shipped org.kmodguard.policy, real cloud-init with a NoCloud seed, and a kernel upgrade by the
real dnf followed by a reboot into the new kernel (systemd_guest.py, guest/systemd_agent.py).

What each test asserts is read from the guest's own system: sysfs for drivers, the rpm database,
dnf's history for transactions (whoever started them), systemctl for units and their hardening,
`journalctl -o json` for events and their order, lsinitrd for the new kernel's initramfs.
The scenarios share conftest.py's pool with test_scenarios.py; see tests/e2e/README.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from systemd_guest import SystemdScenario
from test_scenarios import Entry

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# The MESSAGE_IDs README.md documents (the Contract): the tests find them in the real journal
MESSAGE_IDS = {
    "needs-driver": "c167d616d03446fb8fe127f7a6b46fa6",
    "resolved": "0d56fb3196074acfb06230fc845abecb",
    "fix-started": "9c94234644bc400cbdf097810b10c56b",
    "fix-finished": "d122649fd7854f629fea458b7bce3c1e",
    "started": "e9a8c2903ea14b54998876412b60905f",
    "unindexed": "5286700606504ef88575b02c65f313d2",
    "initramfs-lacks-driver": "1e8150f94bc64906ac691f12b369fc7f",
}
USER_DATA = (REPO / "docs" / "cloud-init" / "auto-fix-gpus.yaml").read_text()  # the example users copy


def entry(hint: float, **kw) -> Entry:
    return Entry(SystemdScenario(timeout=max(900.0, 4 * hint), **kw), hint)  # as test_scenarios.entry


SCENARIOS = {
    "sd-auto": entry(230, name="sd-auto", hotplug=["intel-hda"], probes=["restart"]),
    "sd-offer": entry(330, name="sd-offer", coldplug=["megasas"], hotplug=["intel-hda"], mode="offer",
                      probes=["no-index", "authorization"]),
    "cloud-check": entry(270, name="cloud-check", coldplug=["intel-hda"], mode=None, user_data=USER_DATA,
                         enable=["kmodguard-check.service"]),
    "cloud-both": entry(400, name="cloud-both", coldplug=["intel-hda"], mode=None, user_data=USER_DATA,
                        enable=["kmodguard.service", "kmodguard-check.service"], again=True),
    # kernel A with megasas (initramfs "always") fixed by the daemon's start-up scan: the root the
    # three upgrade scenarios start from (each on a copy of its disk)
    "upgrade-base": entry(300, name="upgrade-base", coldplug=["megasas"], initramfs="always", keep_disk=True),
    "upgrade": entry(300, name="upgrade", coldplug=["megasas"], initramfs="always", upgrade="upgrade",
                     base="upgrade-base"),
    "upgrade-install": entry(300, name="upgrade-install", coldplug=["megasas"], initramfs="always",
                             upgrade="install", base="upgrade-base"),
    "no-plugin": entry(380, name="no-plugin", coldplug=["megasas"], initramfs="always", upgrade="install",
                       dnf_plugin=False, base="upgrade-base"),
}

TESTS = {
    "test_hotplug_auto_the_daemon_starts_the_fix_unit_and_the_device_binds": "sd-auto",
    "test_restart_of_the_daemon_mid_fix_keeps_the_transaction": "sd-auto",
    "test_offer_journal_motd_and_status_summary": "sd-offer",
    "test_authorization_with_the_real_polkitd": "sd-offer",
    "test_cloud_init_check_fixes_after_cloud_config_and_before_cloud_final": "cloud-check",
    "test_cloud_init_with_both_units_one_transaction_and_a_quiet_second_boot": "cloud-both",
    "test_dnf_upgrade_brings_the_modules_once_and_the_reboot_binds_at_boot": "upgrade",
    "test_kernel_core_install_gets_the_modules_from_the_dnf_plugin": "upgrade-install",
    "test_without_the_dnf_plugin_the_stranded_device_is_named_and_fixed_after_the_reboot": "no-plugin",
}


# --- helpers ---------------------------------------------------------------------------------------

def boots(scenario, name: str) -> list[dict]:
    run = scenario(name)
    found = run.result["boots"]
    for b in found:
        assert "error" not in b, f"the agent failed in boot {b['boot']}: {b['error'][-1500:]}"
    return found


def device(boot: dict, qemu: str) -> dict:
    return next(d for d in boot["devices"] if d["device"] == qemu)


def ids(boot: dict) -> set[str]:
    return {k for k, v in MESSAGE_IDS.items() if v in boot["message_ids"]}


def unit_runs(boot: dict, unit: str) -> list[dict]:
    """systemd's own journal entries for each finished start job of unit (JOB_TYPE=start)."""
    return [e for e in boot["unit_journal"] if e.get("UNIT") == unit and e.get("JOB_TYPE") == "start"
            and e.get("JOB_RESULT") == "done"]


def at(entries: list[dict], unit: str, job: str | None = None) -> float:
    """The time (s) of systemd's entry for unit: its start job's end, or (job="starting") its
    'Starting' entry."""
    for e in entries:
        if e.get("UNIT") != unit:
            continue
        if job == "starting" and e.get("MESSAGE", "").startswith("Starting"):
            return int(e["__REALTIME_TIMESTAMP"]) / 1e6
        if job is None and e.get("JOB_TYPE") == "start" and e.get("JOB_RESULT") == "done":
            return int(e["__REALTIME_TIMESTAMP"]) / 1e6
    raise AssertionError(f"no {job or 'finished start'} entry for {unit} in the journal")


def assert_installed_as_shipped(boot: dict) -> None:
    """rpm -i with its scriptlets worked and the RPM enabled nothing by itself (99-default-disable);
    the image builder's `systemctl enable` did."""
    prov = boot["provision"]
    assert prov["rpm_exit"] == 0, prov["rpm_output"]
    assert set(prov["enabled_by_rpm"].values()) <= {"disabled", "static", "indirect"}, prov["enabled_by_rpm"]
    assert "kmodguard" in boot["packages"] and "kmg-debian-provides" in boot["packages"]


def assert_journal_clean(boot: dict) -> None:
    """kmodguard's journal entries: the text alone (no logging prefix), no traceback."""
    for e in boot["journal"]:
        msg = e["MESSAGE"]
        assert "Traceback" not in msg, msg
        assert not msg.startswith(("INFO:", "WARNING:", "ERROR:", "DEBUG:")), msg


# --- hotplug, auto; restart ----------------------------------------------------------------------

def test_hotplug_auto_the_daemon_starts_the_fix_unit_and_the_device_binds(scenario):
    (b,) = boots(scenario, "sd-auto")
    assert_installed_as_shipped(b)
    assert device(b, "intel-hda")["driver"] == "snd_hda_intel"
    assert b["module_transactions"] == 1, b["transactions_detail"]
    (t,) = b["transactions_detail"]
    assert any(p.startswith("kernel-modules-") and "core" not in p for p in t["installed"]), t
    # the daemon had systemd run kmodguard-fix.service (the fix record names the daemon's request)
    assert unit_runs(b, "kmodguard-fix.service"), b["unit_journal"]
    assert b["units"]["kmodguard-fix.service"]["Result"] == "success", b["units"]
    assert b["last_fix"]["requested_by"] == "auto", b["last_fix"]
    assert {"needs-driver", "fix-started", "fix-finished", "resolved", "started"} <= ids(b), b["message_ids"]
    needs = [e for e in b["journal"] if e.get("MESSAGE_ID") == MESSAGE_IDS["needs-driver"]]
    # DEVICE= is the syspath (the device id, its PCI address, is its last part)
    assert any(e.get("DEVICE", "").endswith("/" + device(b, "intel-hda")["address"])
               and e.get("PACKAGE") == "kernel-modules" for e in needs), needs
    assert_journal_clean(b)
    # kmodguard.service ran with its full hardening, as shipped
    h = b["hardening"]
    assert h["NoNewPrivileges"] == "yes" and h["ProtectSystem"] == "strict" and h["PrivateDevices"] == "yes", h
    assert h["MemoryDenyWriteExecute"] == "yes" and h["CapabilityBoundingSet"] == "", h
    assert b["units"]["kmodguard.service"]["ActiveState"] == "active", b["units"]
    assert not b["failed_units"], b["failed_units"]


def test_restart_of_the_daemon_mid_fix_keeps_the_transaction(scenario):
    (b,) = boots(scenario, "sd-auto")
    r = b["restart"]
    assert r["during_transaction"], "the probe never saw kmodguard-fix.service run dnf"
    assert r["restart_exit"] == 0
    assert r["daemon_before"]["MainPID"] != r["daemon_after"]["MainPID"], r
    # the same fix run went on through the restart, and finished well
    assert r["fix_after"]["InvocationID"] == r["fix_before"]["InvocationID"], r
    assert r["fix_after"]["ActiveState"] == "activating", r
    assert len(unit_runs(b, "kmodguard-fix.service")) == 1, b["unit_journal"]
    assert b["module_transactions"] == 1, b["transactions_detail"]
    assert device(b, "intel-hda")["driver"] == "snd_hda_intel"
    # the restarted daemon reported the fix its predecessor started
    new_pid = r["daemon_after"]["MainPID"]
    finished = [e for e in b["journal"] if e.get("MESSAGE_ID") == MESSAGE_IDS["fix-finished"]]
    assert any(e.get("_PID") == new_pid for e in finished), finished


# --- offer; authorization ----------------------------------------------------------------------------

def test_offer_journal_motd_and_status_summary(scenario):
    (b,) = boots(scenario, "sd-offer")
    assert_installed_as_shipped(b)
    # started without an index, the daemon said it cannot judge the cold-plugged controller
    assert {"unindexed", "started", "needs-driver"} <= ids(b), b["message_ids"]
    assert b["transactions_offered"] == 0, "mode offer installed something"
    hda, mega = device(b, "intel-hda"), device(b, "megasas")
    needs: dict[str, dict] = {}  # each device's first entry (the fixes that follow change verdicts)
    for e in b["journal"]:
        if e.get("MESSAGE_ID") == MESSAGE_IDS["needs-driver"]:
            needs.setdefault(e.get("DEVICE", "").rsplit("/", 1)[-1], e)
    for d, module in ((hda, "snd_hda_intel"), (mega, "megaraid_sas")):
        e = needs.get(d["address"])
        assert e, (d, list(needs))
        assert e.get("PACKAGE") == "kernel-modules" and e.get("MODULE") == module and e.get("MODALIAS"), e
    motd = b["motd_offered"] or ""
    assert hda["address"] in motd and "snd_hda_intel" in motd and "kmodguard fix" in motd, motd
    status = b["status_offered"]
    assert "Status:" in status and "need" in status.split("Status:", 1)[1].splitlines()[0], status


def test_authorization_with_the_real_polkitd(scenario):
    (b,) = boots(scenario, "sd-offer")
    a = b["authorization"]
    assert a["nobody_status"]["exit"] == 0, a["nobody_status"]
    assert a["nobody_fix"]["exit"] != 0, a["nobody_fix"]
    assert "NotAuthorized" in a["nobody_fix"]["stderr"] or "not allowed" in a["nobody_fix"]["stderr"], a["nobody_fix"]
    assert a["member_fix"]["exit"] == 0, a["member_fix"]
    assert a["member_fix_driver"] == "megaraid_sas", a
    assert a["root_fix"]["exit"] == 0, a["root_fix"]
    assert "daemon" in a["root_fix"]["stderr"], a["root_fix"]["stderr"]
    assert a["root_fix_driver"] == "snd_hda_intel", a
    # both fixes ran in kmodguard-fix.service, started by the daemon; one transaction
    assert len(unit_runs(b, "kmodguard-fix.service")) == 2, b["unit_journal"]
    assert b["module_transactions"] == 1, b["transactions_detail"]
    assert_journal_clean(b)
    refused = [e for e in b["journal"] if "refused" in e["MESSAGE"].lower()]
    assert len(refused) == 1, refused


# --- cloud-init ------------------------------------------------------------------------------------

def test_cloud_init_check_fixes_after_cloud_config_and_before_cloud_final(scenario):
    image, instance = boots(scenario, "cloud-check")
    assert_installed_as_shipped(image)
    assert image["module_transactions"] == 0
    assert instance["units"]["kmodguard.service"]["UnitFileState"] == "disabled", instance["units"]
    assert device(instance, "intel-hda")["driver"] == "snd_hda_intel"
    assert instance["module_transactions"] == 1, instance["transactions_detail"]
    (t,) = instance["transactions_detail"]
    entries = instance["unit_journal"]
    config_done = at(entries, "cloud-config.service")
    check_starting = at(entries, "kmodguard-check.service", "starting")
    check_done = at(entries, "kmodguard-check.service")
    final_starting = at(entries, "cloud-final.service", "starting")
    assert config_done <= check_starting < check_done <= final_starting, (config_done, check_starting, check_done,
                                                                          final_starting)
    assert check_starting <= t["begin"] <= t["end"] <= check_done, t
    assert "status: done" in (instance["cloud_init"] or ""), instance["cloud_init"]
    assert_journal_clean(instance)


def test_cloud_init_with_both_units_one_transaction_and_a_quiet_second_boot(scenario):
    image, instance, again = boots(scenario, "cloud-both")
    assert_installed_as_shipped(image)
    assert device(instance, "intel-hda")["driver"] == "snd_hda_intel"
    assert instance["module_transactions"] == 1, instance["transactions_detail"]
    assert unit_runs(instance, "kmodguard-check.service"), instance["unit_journal"]
    # the same instance once more: bound at boot by udev, nothing installed, no fix
    assert device(again, "intel-hda")["driver"] == "snd_hda_intel"
    assert again["module_transactions"] == 1, again["transactions_detail"]
    assert again["packages"] == instance["packages"]
    assert not unit_runs(again, "kmodguard-fix.service"), again["unit_journal"]
    for b in (instance, again):
        assert_journal_clean(b)


# --- kernel upgrade with a reboot ----------------------------------------------------------------

def assert_upgraded(scenario, name: str) -> tuple[dict, dict]:
    """(the upgrade boot, the boot into B), after the checks they share. The first boot (the
    base's): kmodguard installed from its RPM; the daemon's start-up scan fixed the cold-plugged
    controller, one transaction, requested by the daemon itself."""
    base, a, b = boots(scenario, name)
    assert_installed_as_shipped(base)
    assert device(base, "megasas")["driver"] == "megaraid_sas", base["devices"]
    assert {"started", "needs-driver", "fix-started", "fix-finished"} <= ids(base), base["message_ids"]
    assert base["module_transactions"] == 1 and base["last_fix"]["requested_by"] == "auto", base["last_fix"]
    assert_journal_clean(base)
    # the upgrade boot, still kernel A: the controller bound at boot, the upgrade ran, kernel-install too
    assert a["kernel"] == base["kernel"] and device(a, "megasas")["driver"] == "megaraid_sas"
    up = a["upgrade"]
    assert up["exit"] == 0, up["stderr"]
    kver_b = b["kernel"]
    assert kver_b != a["kernel"]
    assert f"kernel-core posttrans: kernel-install add {kver_b}" in (a["scriptlets"] or ""), a["scriptlets"]
    assert up["image_exists"], up
    assert_journal_clean(a)
    return a, b


def upgrade_transaction(a: dict) -> dict:
    return a["transactions_detail"][-1]


def test_dnf_upgrade_brings_the_modules_once_and_the_reboot_binds_at_boot(scenario):
    a, b = assert_upgraded(scenario, "upgrade")
    t = upgrade_transaction(a)
    modules_b = [p for p in t["installed"] if p.startswith("kernel-modules-") and not p.startswith("kernel-modules-core")]
    assert len(modules_b) == 1, t
    assert "megaraid_sas" in a["upgrade"]["image_modules"], "B's initramfs lacks the boot device's driver"
    # kernel B: udev binds the controller at boot; no fix, nothing installed
    assert device(b, "megasas")["driver"] == "megaraid_sas"
    assert not unit_runs(b, "kmodguard-fix.service"), b["unit_journal"]
    assert b["module_transactions"] == a["module_transactions"]


def test_kernel_core_install_gets_the_modules_from_the_dnf_plugin(scenario):
    a, b = assert_upgraded(scenario, "upgrade-install")
    t = upgrade_transaction(a)
    assert any(p.startswith("kernel-core-") for p in t["installed"]), t
    modules_b = [p for p in t["installed"] if p.startswith("kernel-modules-") and not p.startswith("kernel-modules-core")]
    assert len(modules_b) == 1, t  # added by kmodguard's dnf plugin to the same transaction
    assert "megaraid_sas" in a["upgrade"]["image_modules"]
    assert device(b, "megasas")["driver"] == "megaraid_sas"
    assert not unit_runs(b, "kmodguard-fix.service"), b["unit_journal"]
    assert b["module_transactions"] == a["module_transactions"]


def test_without_the_dnf_plugin_the_stranded_device_is_named_and_fixed_after_the_reboot(scenario):
    a, b = assert_upgraded(scenario, "no-plugin")
    up = a["upgrade"]
    t = upgrade_transaction(a)
    assert not [p for p in t["installed"] if p.startswith("kernel-modules-") and "core" not in p], t
    mega = device(a, "megasas")
    # the kernel-install plugin named the stranded device before the reboot: terminal, MOTD, journal
    assert mega["address"] in (up["motd_kernel"] or ""), up["motd_kernel"]
    assert "megaraid_sas" in up["stdout"] + up["stderr"], up["stdout"]
    assert "megaraid_sas" not in up["image_modules"]
    warned = [e for e in a["journal"] if int(e.get("PRIORITY", 6)) <= 4 and b["kernel"] in e["MESSAGE"]]
    assert warned, "no journal warning about kernel B"
    assert "initramfs-lacks-driver" in ids(a), a["message_ids"]
    # after the reboot into B, the daemon (mode auto) fixed it
    assert device(b, "megasas")["driver"] == "megaraid_sas"
    assert len(unit_runs(b, "kmodguard-fix.service")) == 1, b["unit_journal"]
    assert b["module_transactions"] == a["module_transactions"] + 1
