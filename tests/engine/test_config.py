"""Policy files: defaults, drop-ins, and a clear message for every bad value."""

from pathlib import Path

import pytest

from kmodguard import config
from kmodguard.errors import InvalidInput


def test_defaults(tmp_path):
    c = config.load(tmp_path)
    assert c.mode == "offer"
    assert c.auto_buses == ("pci", "virtio", "vmbus")
    assert c.initramfs == "auto"
    assert "kernel-modules" in c.packages and "kernel-modules-extra" in c.packages
    assert c.sources == ()


def test_drop_ins_override_in_name_order_and_merge_tables(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "kmodguard.toml").write_text('mode = "auto"\n[timeouts]\nlock_wait = 10\n')
    (tmp_path / "conf.d" / "10-a.toml").write_text('mode = "off"\n[timeouts]\nsettle = 5\n')
    (tmp_path / "conf.d" / "20-b.toml").write_text('initramfs = "never"\n')
    c = config.load(tmp_path)
    assert (c.mode, c.initramfs) == ("off", "never")
    assert (c.timeouts.lock_wait, c.timeouts.settle) == (10.0, 5.0)
    assert len(c.sources) == 3


def test_allow_list_matches_names_and_ubuntu_kver_suffix():
    c = config.Config()
    assert c.package_allowed("kernel-modules")
    assert c.package_allowed("linux-modules-extra-6.8.0-31-generic")
    assert not c.package_allowed("linux-modules-extra-evil")
    assert not c.package_allowed("kernel-modules-core-but-not")
    assert not c.package_allowed("bash")


@pytest.mark.parametrize("text, message", [
    ('mode = "yolo"', "mode must be one of off, offer, auto"),
    ("mode = 3", "mode must be one of"),
    ('auto_buses = "pci"', "auto_buses must be a list"),
    ('packages = ["", "x"]', "packages must be a list of non-empty strings"),
    ('initramfs = "sometimes"', "initramfs must be one of auto, always, never"),
    ("[timeouts]\nlock_wait = -1", "timeouts.lock_wait must be a number of seconds"),
    ("[timeouts]\nlock_wait = true", "timeouts.lock_wait must be a number"),
    ("[timeouts]\nforever = 1", "unknown key timeouts.forever"),
    ("[ignore]\nsubsystems = [1]", "ignore.subsystems must be a list"),
    ("colour = 1", "unknown key 'colour'"),
    ("mode = ", "is not valid TOML"),
])
def test_bad_values_name_file_key_and_allowed_values(tmp_path, text, message):
    (tmp_path / "kmodguard.toml").write_text(text)
    with pytest.raises(InvalidInput) as exc:
        config.load(tmp_path)
    assert message in exc.value.message
    assert str(tmp_path / "kmodguard.toml") in exc.value.message


def test_cli_reports_bad_config_without_traceback(kmodguard, world):
    etc = kmodguard.env["KMODGUARD_CONFIG_DIR"]
    import os
    os.makedirs(etc, exist_ok=True)
    with open(os.path.join(etc, "kmodguard.toml"), "w") as f:
        f.write('mode = "yolo"\n')
    res = kmodguard("status", "--json", "--kver", world.kver)
    assert res.returncode == 2
    assert "mode must be one of" in res.json["error"]["message"]
    assert res.json["error"]["name"] == "InvalidInput"


@pytest.mark.parametrize("value, says", [
    ('["PCI"]', "'PCI' is not a bus kmodguard knows (did you mean 'pci'?)"),
    ('["pci", "pcie-ish"]', "'pcie-ish' is not a bus kmodguard knows"),
])
def test_auto_buses_names_buses_as_sysfs_spells_them(kmodguard, value, says):
    """"PCI" matched no device, silently: `config check` refuses it and lists the known buses."""
    etc = Path(kmodguard.env["KMODGUARD_CONFIG_DIR"])
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "kmodguard.toml").write_text(f"auto_buses = {value}\n")
    res = kmodguard("config", "check")
    assert res.returncode != 0, res.stdout
    assert says in res.stderr and "known buses: " in res.stderr and "virtio" in res.stderr, res.stderr
    (etc / "kmodguard.toml").write_text('auto_buses = ["pci", "usb", "virtio"]\n')
    assert kmodguard("config", "check").returncode == 0


def test_firmware_packages_default_and_patterns(tmp_path):
    c = config.load(tmp_path)
    for name in ("linux-firmware", "amd-gpu-firmware", "nvidia-gpu-firmware", "iwl7260-firmware",
                 "kernel-firmware-amdgpu", "firmware-misc-nonfree"):
        assert c.firmware_allowed(name), name
    for name in ("bash", "kernel-firmware-", "firmware-", "iwl-firmware", "kernel-modules", "Linux-Firmware"):
        assert not c.firmware_allowed(name), name
    (tmp_path / "kmodguard.toml").write_text('firmware_packages = ["kmg-*-firmware"]\n')
    c = config.load(tmp_path)
    assert c.firmware_allowed("kmg-gpu-firmware") and not c.firmware_allowed("linux-firmware")


@pytest.mark.parametrize("value", ['["a*b*"]', '["*"]', '["Bad"]', '["-x"]', '"linux-firmware"', '[""]'])
def test_a_bad_firmware_packages_entry_is_refused(tmp_path, value):
    (tmp_path / "kmodguard.toml").write_text(f"firmware_packages = {value}\n")
    with pytest.raises(InvalidInput) as exc:
        config.load(tmp_path)
    assert "firmware_packages" in exc.value.message
