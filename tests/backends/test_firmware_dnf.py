"""Firmware a module needs, resolved through dnf's own metadata, installed in the module's transaction.

The real dnf (4) in an installroot against local createrepo_c repositories: the Fedora-like
kernel RPMs (kmg_gpu's modinfo names kmg/gpu_present.bin and kmg/gpu_absent.bin), and a
firmware repository: kmg-gpu-firmware holds both files xz-compressed as Fedora ships them,
linux-firmware only one of them, kmg-evil-firmware both but is not allow-listed. What is
asserted is read from the system: the installroot's rpm database, dnf history, dnf's cache.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

import rpmbuild
import synthetic
from dnfimage import copy_image, dnf, history, image_env, installed
from rpmbuild import KVER

GPU = synthetic.ALIAS["gpu"]
REQ = f"kernel-modules-uname-r = {KVER}"
FW = "/usr/lib/firmware/kmg/"
POLICY = ('backend = "dnf"\nfirmware_packages = ["kmg-gpu-firmware", "linux-firmware"]\n'
          "[timeouts]\nsettle = 0.2\nlock_wait = 2\npackage_manager = 120\n")


@pytest.fixture(scope="module")
def firmware_repo(repo, tmp_path_factory):
    _, _, key = repo
    top = tmp_path_factory.mktemp("fwrepo") / "fw"
    rpmbuild.build_rpm(top, "kmg-gpu-firmware", "20261201", files={
        FW + "gpu_present.bin.xz": b"fw-a", FW + "gpu_absent.bin.xz": b"fw-b"}, sign=key)
    rpmbuild.build_rpm(top, "linux-firmware", "20261201", files={FW + "gpu_present.bin": b"fw-a"}, sign=key)
    rpmbuild.build_rpm(top, "kmg-evil-firmware", "1.0", files={
        FW + "gpu_present.bin": b"x", FW + "gpu_absent.bin.zst": b"y"}, sign=key)
    return rpmbuild.createrepo(top)


@pytest.fixture
def machine(base_root, kmodguard, repo, firmware_repo, tmp_path):
    """A fresh image with both repositories configured, kernel-modules indexed, one GPU device."""
    _, rpms, key = repo
    root = copy_image(base_root, tmp_path / "root")
    (root / "etc/yum.repos.d/fw.repo").write_text(
        f"[fw]\nname=firmware\nbaseurl=file://{firmware_repo}\nenabled=1\ngpgcheck=1\ngpgkey=file://{key.public}\n"
        "metadata_expire=0\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "kmodguard.toml").write_text(POLICY)
    env = {**kmodguard.env, **image_env(root, tmp_path), "KMODGUARD_CONFIG_DIR": str(etc),
           "KMODGUARD_FIRMWARE_DIRS": f"{root}/usr/lib/firmware"}
    record = (f"P: /devices/pci0000:00/0000:00:05.0\nE: SUBSYSTEM=pci\nE: MODALIAS={GPU}\n"
              f"E: PCI_SLOT_NAME=0000:00:05.0\nA: modalias={GPU}\nA: driver_override=(null)\n\n")
    kmg = dataclasses.replace(kmodguard, env=env).with_devices(record, tmp_path)
    kmg("index", "build", "--from-rpm", str(rpms[KVER]["kernel-modules"]), check_code=0)
    return kmg, root


def gpu_status(kmg, code=3) -> dict:
    (dev,) = kmg("status", "--json", "--kver", KVER, check_code=code).json["devices"]
    return dev


def test_status_answers_from_the_cache_only_and_says_what_it_lacks(machine):
    kmg, root = machine
    dev = gpu_status(kmg)  # the image's dnf cache knows the kernel repository, not the firmware one
    assert dev["verdict"] == "missing"
    need = dev["candidates"][0]["firmware"]
    assert need["packages"] == [] and "ignored the repositories fw" in need["note"] and "makecache" in need["note"]
    assert not list((root / "var/cache/dnf").glob("fw-*"))  # status fetched nothing
    assert dnf(root, "makecache").returncode == 0  # what the note says to do
    dev = gpu_status(kmg)
    need = dev["candidates"][0]["firmware"]
    assert [p["package"] for p in need["packages"]] == ["kmg-gpu-firmware"]  # one package covers both files
    assert (need["files_named"], need["files_covered"]) == (2, 2)
    assert need["not_allowed"] == ["kmg-evil-firmware"]
    assert "kmg_gpu needs firmware from kmg-gpu-firmware (not installed)" in dev["reason"]
    human = kmg("status", "--kver", KVER, check_code=3).stdout
    assert "kmg_gpu needs firmware from kmg-gpu-firmware (not installed)" in human
    assert f"install '{REQ}' kmg-gpu-firmware" in human  # the module package and its firmware, one command


def test_a_cache_without_file_lists_is_named(machine):
    kmg, root = machine
    assert dnf(root, "makecache").returncode == 0
    for f in (root / "var/cache/dnf").glob("fw-*/repodata/*filelists*"):
        f.unlink()  # what dnf >= 4.18 leaves when file lists are not asked for
    for f in (root / "var/cache/dnf").glob("fw*.solvx"):
        f.unlink()
    need = gpu_status(kmg)["candidates"][0]["firmware"]
    assert need["packages"] == []
    assert "fw holds no file lists" in need["note"] and "optional_metadata_types=filelists" in need["note"]


def test_fix_installs_module_and_firmware_packages_in_one_transaction(machine):
    kmg, root = machine
    plan = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [(p["request"], p["kind"], p["for"]) for p in plan["install"]] == [
        (REQ, "modules", ["kmg_gpu"]), ("kmg-gpu-firmware", "firmware", ["kmg_gpu"])]
    assert "kmg-gpu-firmware for its firmware" in plan["devices"][0]["reason"]
    before = history(root)
    res = kmg("fix", "--yes", "--json", "--kver", KVER)
    assert res.returncode == 6, res.stderr  # installed, but this kernel cannot load modules
    now = installed(root)
    assert "kernel-modules-6.1.0-56.fc42" in now and "kmg-gpu-firmware-20261201-1" in now
    assert not any(p.startswith(("linux-firmware", "kmg-evil-firmware")) for p in now)
    assert len(history(root)) == len(before) + 1  # one transaction...
    info = dnf(root, "-q", "history", "info", "last").stdout
    assert "kernel-modules-6.1.0-56.fc42" in info and "kmg-gpu-firmware-20261201-1" in info  # ...holding both
    assert (root / "usr/lib/firmware/kmg/gpu_absent.bin.xz").is_file()
    dev = gpu_status(kmg)  # the module is installed and its firmware is on disk
    assert dev["verdict"] == "loadable" and "firmware" not in dev


def test_installed_module_without_its_firmware_is_loadable_and_fix_installs_the_firmware(machine):
    kmg, root = machine
    assert dnf(root, "install", REQ).returncode == 0  # the module's package, not its firmware
    subprocess.run(["depmod", "-b", str(root), KVER], check=True)
    dev = gpu_status(kmg)
    assert dev["verdict"] == "loadable"
    assert [p["package"] for p in dev["firmware"]["packages"]] == ["kmg-gpu-firmware"]
    assert "kmg_gpu needs firmware from kmg-gpu-firmware (not installed)" in dev["reason"]
    plan = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [(p["request"], p["kind"], p["for"]) for p in plan["install"]] == [
        ("kmg-gpu-firmware", "firmware", ["kmg_gpu"])]
    assert plan["load"] == ["kmg_gpu"] and plan["devices"][0]["action"] == "install"
    before = installed(root)
    assert kmg("fix", "--yes", "--json", "--kver", KVER).returncode == 6  # cannot load modules here
    assert sorted(set(installed(root)) - set(before)) == ["kmg-gpu-firmware-20261201-1"]
    assert "firmware" not in gpu_status(kmg)


def test_the_allow_list_decides_which_package_is_offered(machine):
    kmg, root = machine
    Path(kmg.env["KMODGUARD_CONFIG_DIR"], "kmodguard.toml").write_text(
        POLICY.replace('["kmg-gpu-firmware", "linux-firmware"]', '["linux-*"]'))
    plan = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [p["request"] for p in plan["install"]] == [REQ, "linux-firmware"]  # the only allowed one
    Path(kmg.env["KMODGUARD_CONFIG_DIR"], "kmodguard.toml").write_text(
        POLICY.replace('["kmg-gpu-firmware", "linux-firmware"]', '["other-firmware"]'))
    plan = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [p["request"] for p in plan["install"]] == [REQ]
    dev = gpu_status(kmg)
    assert "not in firmware_packages" in dev["reason"]


BUILTIN = "pci:v0000BBBBd00000007sv00000000sd00000000bc03sc00i00"


def test_a_built_in_driver_without_its_firmware_gets_its_firmware_package_and_a_re_probe(machine, tmp_path):
    """kmg_bfw is built into the kernel (modules.builtin.modinfo names kmg/gpu_absent.bin): only
    the firmware package can help, and nothing is loaded."""
    kmg, root = machine
    synthetic.depmod(root, KVER, builtin={"kmg_bfw": ("pci:v0000BBBBd00000007sv*sd*bc*sc*i*",)},
                     builtin_firmware={"kmg_bfw": ("kmg/gpu_absent.bin",)})
    assert dnf(root, "makecache").returncode == 0
    record = (f"P: /devices/pci0000:00/0000:00:07.0\nE: SUBSYSTEM=pci\nE: MODALIAS={BUILTIN}\n"
              f"E: PCI_SLOT_NAME=0000:00:07.0\nA: modalias={BUILTIN}\nA: driver_override=(null)\n\n")
    (tmp_path / "builtin").mkdir()
    dev_kmg = kmg.with_devices(record, tmp_path / "builtin")
    (dev,) = dev_kmg("status", "--json", "--kver", KVER, check_code=3).json["devices"]
    assert dev["verdict"] == "loadable" and dev["builtin"] is True, dev
    assert [p["package"] for p in dev["firmware"]["packages"]] == ["kmg-gpu-firmware"]
    assert dev["firmware"]["module"] == "kmg_bfw" and dev["firmware"]["files_named"] == 1
    assert "built-in driver kmg_bfw matches but did not bind it: kmg_bfw needs firmware from kmg-gpu-firmware" \
        in dev["reason"]
    plan = dev_kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [(p["request"], p["kind"], p["for"]) for p in plan["install"]] == [
        ("kmg-gpu-firmware", "firmware", ["kmg_bfw"])]
    assert plan["load"] == [] and plan["devices"][0]["action"] == "install"
    before = installed(root)
    res = dev_kmg("fix", "--yes", "--json", "--kver", KVER)
    assert res.returncode == 6, res.stdout + res.stderr  # installed and re-probed; nothing binds a fake device
    assert sorted(set(installed(root)) - set(before)) == ["kmg-gpu-firmware-20261201-1"]
    assert (root / "usr/lib/firmware/kmg/gpu_absent.bin.xz").is_file()
    steps = {s["step"]: s["result"] for s in res.json["steps"]}
    assert steps["load"] == "skipped" and steps["depmod"] == "skipped", steps  # a built-in driver loads nothing
    assert res.json["outcomes"][0]["outcome"] == "still-unbound", res.json["outcomes"]
    assert res.json["outcomes"][0]["reason"].startswith("kmg_bfw is built in but did not bind")
    (dev,) = dev_kmg("status", "--json", "--kver", KVER, check_code=3).json["devices"]
    assert "firmware" not in dev and "see 'dmesg'" in dev["reason"]  # its firmware is on disk now
