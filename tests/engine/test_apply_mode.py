"""`kmodguard check --apply-policy` (what kmodguard-check.service runs after cloud-init): the mode
applied by the engine's fix workflow (engine/fixing.py): offer announces with the daemon's
MESSAGE_ID and installs nothing; auto fixes the devices on auto_buses, in real dnf 4 on the
Fedora-like machine (fedora_machine.py).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from dnfimage import history, installed
from fedora_machine import BOUND, EXTRA_DEVICE, GPU, config_dir


def test_check_in_offer_mode_announces_and_installs_nothing(machine, tmp_path):
    kmg, root = machine
    kmg = kmg.with_devices(BOUND + EXTRA_DEVICE, tmp_path)
    before = installed(root)
    res = kmg("check", "--apply-policy", check_code=3)
    assert "1 device(s) need a driver" in res.stdout and "done: offer: 1 device(s) announced" in res.stdout
    motd = (tmp_path / "motd.d" / "kmodguard").read_text()
    assert "0000:00:07.0: kmg_extra_xz in kernel-modules-extra 6.1.0-56.fc42 (not installed)" in motd
    assert installed(root) == before
    assert "kmodguard check: every device" in kmg.with_devices(BOUND, tmp_path)("check", check_code=0).stdout


def test_check_apply_policy_journal_entry_has_the_daemons_message_id_and_fields(machine, tmp_path):
    """kmodguard-check.service's announcement is the daemon's: the README's MESSAGE_ID with DEVICE=,
    MODALIAS=, PACKAGE=, MODULE= (a journal catcher stands for journald)."""
    from journal import JOURNAL_CATCHER

    kmg, _ = machine
    kmg = kmg.with_devices(BOUND + EXTRA_DEVICE, tmp_path)
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", JOURNAL_CATCHER,
           "umockdev-run", "--device", str(kmg.umockdev), "--", sys.executable, "-m", "kmodguard",
           "check", "--apply-policy"]
    # JOURNAL_STREAM: as systemd sets it for kmodguard-check.service, whose log then goes to the journal
    out = subprocess.run(cmd, capture_output=True, text=True, env={**kmg.env, "JOURNAL_STREAM": "8:1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    caught = json.loads(out.stdout.strip().splitlines()[-1])
    assert caught["rc"] == 3
    (entry,) = [e for e in caught["entries"] if e.get("MESSAGE_ID") == "c167d616d03446fb8fe127f7a6b46fa6"]
    assert entry["DEVICE"].endswith("/0000:00:07.0") and entry["MODALIAS"], entry
    assert entry["PACKAGE"] == "kernel-modules-extra" and entry["MODULE"] == "kmg_extra_xz", entry


def test_check_in_auto_mode_fixes_the_devices_on_auto_buses(machine, tmp_path):
    kmg, root = machine
    etc = Path(config_dir(kmg, 'mode = "auto"\nbackend = "dnf"\n[timeouts]\nsettle = 0.2\nlock_wait = 5\n'))
    kmg = dataclasses.replace(kmg, env={**kmg.env, "KMODGUARD_CONFIG_DIR": str(etc)}).with_devices(
        BOUND + EXTRA_DEVICE, tmp_path)
    before = len(history(root))
    doc = kmg("check", "--apply-policy", "--json", timeout=300).json
    assert doc["applied"]["action"] == "fix" and doc["applied"]["exit_code"] == 6  # installed; cannot load here
    assert "kernel-modules-extra-6.1.0-56.fc42" in installed(root) and len(history(root)) == before + 1
    record = json.loads((Path(kmg.env["KMODGUARD_STATE_DIR"]) / "last-fix.json").read_text())
    assert record["devices"] == ["0000:00:07.0"]
    # a USB device is not on auto_buses: announced, never installed for
    usb = ("P: /devices/pci0000:00/0000:00:14.0/usb1/1-1\nE: SUBSYSTEM=usb\nE: MODALIAS=" + GPU + "\nA: modalias="
           + GPU + "\n\n")
    doc = kmg.with_devices(BOUND + usb, tmp_path)("check", "--apply-policy", "--json", check_code=3).json
    assert doc["applied"]["action"] == "offer" and "none that mode auto may fix" in doc["applied"]["detail"]
