"""Firmware names are data (a module's modinfo): checked before a package manager hears them; and
what the kernel log says about firmware it could not load, after a fix loaded the module."""

import os
from pathlib import Path

import pytest

from kmodguard.backends.dnf import DnfBackend
from kmodguard.config import Config
from kmodguard.engine.firmware import resolve, smallest_cover
from kmodguard.engine.plan import DeviceAction
from kmodguard.engine.remediate import Remediation, firmware_failures
from kmodguard.errors import InvalidInput
from kmodguard.paths import Paths

HOSTILE = ["kmg/*.bin", "brcm/brcmfmac*-pcie.*.txt", "../../etc/shadow", "a,b.bin", "/abs.bin", "-x.bin",
           "a b.bin", "a\nb", "kmg/[ab].bin", "x" * 300, "kmg/\udcff.bin"]

# the firmware loader's messages, as /dev/kmsg gives them (one record a line)
KMSG = (
    "6,1201,5020000,-;pci 0000:00:05.0: [1002:73bf] type 00 class 0x030000\n"
    "3,1202,5100000,-;amdgpu 0000:00:05.0: Direct firmware load for amdgpu/navi21_sos.bin failed with error -2\n"
    "3,1203,5100010,-;amdgpu 0000:00:05.0: firmware: failed to load amdgpu/navi21_ta.bin (-2)\n"
    "3,1204,5100020,-;iwlwifi 0000:00:14.3: Direct firmware load for iwlwifi-so-a0-gf-a0-86.ucode failed with error -2\n"
    "3,1205,5100030,-;amdgpu 0000:00:05.0: Direct firmware load for amdgpu/navi21_sos.bin failed with error -2\n"
)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_pattern_or_path_trick_never_reaches_dnf(name):
    with pytest.raises(InvalidInput):
        DnfBackend("dnf", Path("/nonexistent")).firmware_argv(["kmg/ok.bin", name], cache_only=True)


def test_only_exact_names_are_asked_about():
    asked = []

    def lookup(names):
        asked.extend(names)
        raise AssertionError("not reached")

    need = resolve("brcmfmac", ("brcm/brcmfmac*-pcie.*.txt",), frozenset(), lookup, Config())
    assert asked == [] and "patterns" in need.note and need.packages == ()


def test_dnf_argv_asks_every_compression_with_end_of_values():
    argv = DnfBackend("dnf", Path("/r")).firmware_argv(["amdgpu/navi21_sos.bin"], cache_only=True)
    assert "-C" in argv and "--setopt=optional_metadata_types=filelists" in argv
    assert [a for a in argv if a.startswith("--whatprovides=")] == [
        "--whatprovides=/usr/lib/firmware/amdgpu/navi21_sos.bin", "--whatprovides=/usr/lib/firmware/amdgpu/navi21_sos.bin.xz",
        "--whatprovides=/usr/lib/firmware/amdgpu/navi21_sos.bin.zst"]
    assert "-C" not in DnfBackend("dnf", Path("/r")).firmware_argv(["a.bin"], cache_only=False)


def test_a_bare_name_passes_the_backend_only_when_the_firmware_allow_list_admits_it():
    allowed = DnfBackend("dnf", Path("/r"), firmware_packages=("amd-gpu-firmware", "kernel-firmware-*"))
    argv = allowed.install_argv(["amd-gpu-firmware", "kernel-firmware-amdgpu"], "kmodguard")
    assert argv[-2:] == ["amd-gpu-firmware", "kernel-firmware-amdgpu"]
    for name in ("bash", "kernel-firmware-", "amd-gpu-firmware-evil"):
        with pytest.raises(InvalidInput):
            allowed.install_argv([name], "kmodguard")


def test_smallest_cover_prefers_one_package_that_holds_everything():
    sets = {"linux-firmware": {"a"}, "amd-gpu-firmware": {"a", "b"}, "other": {"c"}}
    assert smallest_cover(sets) == ("amd-gpu-firmware", "other")
    assert smallest_cover({}) == ()


def test_firmware_the_kernel_could_not_load_is_named_per_device(tmp_path):
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(KMSG)
    assert firmware_failures(kmsg, ["amdgpu", "0000:00:05.0"]) == ("amdgpu/navi21_sos.bin", "amdgpu/navi21_ta.bin")
    assert firmware_failures(kmsg, ["e1000e"]) == ()
    assert firmware_failures(tmp_path / "absent", ["amdgpu"]) == ()


def test_a_device_left_unbound_for_lack_of_firmware_says_which_file(tmp_path):
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(KMSG)
    dev = tmp_path / "sys/devices/pci0000:00/0000:00:05.0"
    dev.mkdir(parents=True)
    paths = Paths(sysfs=tmp_path / "sys", kmsg=kmsg, state_dir=tmp_path / "state")
    config = Config()._replace(timeouts=Config().timeouts._replace(settle=0.1))
    action = DeviceAction("0000:00:05.0", str(dev), "pci", "pci:v00001002d000073BF", "missing", "install", "amdgpu",
                          "kernel-modules", "r")
    outcome = Remediation(paths, config, None, lambda m: None)._probe(action, {})
    assert outcome.outcome == "still-unbound"
    assert outcome.firmware_failed == ("amdgpu/navi21_sos.bin", "amdgpu/navi21_ta.bin")
    assert "could not load its firmware amdgpu/navi21_sos.bin, amdgpu/navi21_ta.bin" in outcome.reason


def test_a_backend_that_cannot_ask_says_how_to_find_the_package_by_hand():
    from kmodguard.backends import firmware_lookup
    from kmodguard.backends.apt import AptBackend

    apt = firmware_lookup(AptBackend(Path("/nonexistent")), ["amdgpu/navi21_sos.bin"], cache_only=True)
    assert apt.providers == {} and "apt-file search" in apt.note and "non-free-firmware" in apt.note
    other = firmware_lookup(type("Other", (), {"name": "pacman"})(), ["a.bin"], cache_only=True)
    assert other.providers == {} and "cannot yet ask pacman" in other.note and "/lib/firmware/NAME" in other.note


def test_a_package_manager_that_fails_is_asked_once_per_command(tmp_path, monkeypatch):
    # `explain -` over thousands of modaliases needs many modules' firmware: a failing (or
    # timing-out) package manager must not be run again for each of them
    from kmodguard.config import Config
    from kmodguard.engine import api
    from kmodguard.engine.environment import Environment
    from kmodguard.errors import KmodguardError
    from kmodguard.paths import Paths

    calls = []

    class Failing:
        name = "apt"

        def firmware_providers(self, names, *, cache_only):
            calls.append(names)
            raise KmodguardError("apt-get indextargets failed: E: broken lists")

    paths = Paths.from_environment({}, root=str(tmp_path), kver="6.1.0-1-amd64", modules_dir=str(tmp_path / "m"),
                                   index_dir=str(tmp_path / "i"), state_dir=str(tmp_path / "s"),
                                   config_dir=str(tmp_path / "c"))
    env = Environment(None, None, True, tmp_path / "m", False, "apt-get")
    engine = api.Engine(paths, Config(), env)
    monkeypatch.setattr(engine, "backend", lambda name=None: Failing())
    for names in (["a.bin"], ["b.bin"], ["c.bin"]):
        with pytest.raises(KmodguardError, match="broken lists"):
            engine.diagnoser.firmware_lookup(names)
    assert calls == [["a.bin"]]


def test_a_built_in_modules_firmware_is_read_from_modules_builtin_modinfo_and_bad_files_are_empty(tmp_path):
    from kmodguard.index.modinfo import builtin_firmware

    (tmp_path / "modules.builtin.modinfo").write_bytes(
        b"kmg_bfw.alias=pci:v0000BBBBd*\0kmg_bfw.firmware=kmg/a.bin\0kmg-dash.firmware=kmg/b.bin\0"
        b"kmg_bfw.firmware=kmg/c.bin\0kmg_bfw.firmware=kmg/a.bin\0nodot\0other.firmware=\0")
    assert builtin_firmware(tmp_path) == {"kmg_bfw": ("kmg/a.bin", "kmg/c.bin"), "kmg_dash": ("kmg/b.bin",)}
    assert builtin_firmware(tmp_path / "absent") == {}
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "modules.builtin.modinfo")  # never opened for reading: no hang
    assert builtin_firmware(fifo) == {}
    link = tmp_path / "link"
    link.mkdir()
    (link / "modules.builtin.modinfo").symlink_to(tmp_path / "modules.builtin.modinfo")
    assert builtin_firmware(link) == {}  # the last component is not followed
