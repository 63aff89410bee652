"""`kmodguard footprint`: what each installed modules package costs (read from rpm) and which
devices use it, on the Fedora-like machine (fedora_machine.py).
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from fedora_machine import NIC
from records import pci


def test_footprint_tells_what_each_modules_package_costs_and_who_uses_it(machine):
    kmg, root = machine
    doc = kmg("footprint", "--json", check_code=0).json
    rows = {p["package"]: p for p in doc["packages"]}
    assert set(rows) == {"kernel-modules-core-6.1.0-56.fc42", "kernel-modules-6.1.0-56.fc42"}
    mods, core = rows["kernel-modules-6.1.0-56.fc42"], rows["kernel-modules-core-6.1.0-56.fc42"]
    assert mods["modules"] == 7 and mods["modules_in_use"] == ["kmg_gpu"] and mods["devices"] == ["0000:00:05.0"]
    assert core["devices"] == ["0000:00:03.0"] and not core["removable"] and not mods["removable"]
    rpm_size = subprocess.run(["rpm", "--root", str(root), "-q", "--qf", "%{LONGSIZE}", "kernel-modules"],
                              capture_output=True, text=True).stdout
    assert mods["installed_bytes"] == int(rpm_size) and mods["package_bytes"] > 0
    human = kmg("footprint", check_code=0).stdout
    assert "kernel-modules-6.1.0-56.fc42" in human and "needed by 0000:00:05.0" in human
    # with the GPU gone, kernel-modules is dead weight, and footprint says what removing it saves
    nic = dataclasses.replace(kmg).with_devices(pci("0000:00:03.0", NIC, driver="kmg_core_nic"), Path(kmg.umockdev).parent)
    rows = {p["package"]: p for p in nic("footprint", "--json", check_code=0).json["packages"]}
    assert rows["kernel-modules-6.1.0-56.fc42"]["removable"]
    assert rows["kernel-modules-6.1.0-56.fc42"]["removal_saves_bytes"] == int(rpm_size)
