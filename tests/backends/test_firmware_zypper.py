"""Firmware and driver announcements through Debian's real zypper 1.14 (libzypp 17.25) with --root,
against a gpg-checked rpm-md repository in SUSE's layout (zypperroot.py).

What zypper knows of a package's files is primary.xml's short list (/etc and bin directories, and
file paths a package names as a Provides): libzypp never reads filelists.xml. So
kernel-firmware-kmg provides its two files by path (zypper then sees them), kernel-firmware-hidden
only ships its file (zypper cannot see it: the SUSE case for most firmware), kmg-evil-firmware
provides one but is not allow-listed. Announcements are SUSE's Supplements: modalias(...)
(flavoured, and %XX-encoded) and a third-party Provides: modalias(...). What is asserted is read
from the root: its rpm database and zypper's history log (ROOT/var/log/zypp/history).
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

import rpmbuild
import synthetic
import zypperroot
from backend_harness import pci_device, rpm_installed

KVER, EVR, REQUEST = zypperroot.KVER, zypperroot.EVR, zypperroot.REQUEST
GPU = synthetic.ALIAS["gpu"]  # kmg_gpu in kernel-default: it names kmg/gpu_present.bin and kmg/gpu_absent.bin
FW = "/lib/firmware/kmg/"
THIRD = "pci:v0000EEEEd00000009sv00000000sd00000000bc02sc00i00"
FLAVOURED = "pci:v0000EEEEd00000012sv00000000sd00000000bc03sc00i00"
ENCODED = "of:NkmgT(null)Cacme,kmg-chip"  # supplemented as modalias(kernel-default:of:N*T*Cacme%2Ckmg-chip)
SUPPLEMENTED = "pci:v0000EEEEd00000013sv00000000sd00000000bc03sc00i00"  # only a firmware package announces it
POLICY = ('backend = "zypper"\nfirmware_packages = ["kernel-firmware-kmg", "kernel-firmware-hidden", '
          '"kernel-firmware-kmgsup"]\n'
          "[timeouts]\nsettle = 0.2\nlock_wait = 2\npackage_manager = 120\n")


@pytest.fixture(scope="module")
def suse(tmp_path_factory):
    base = tmp_path_factory.mktemp("firmware-zypper")
    key = rpmbuild.make_test_key(base / "gnupg")
    pkgs = zypperroot.build_packages(base / "rpms", key)
    out = base / "rpms" / "signed"
    extra = [
        rpmbuild.build_rpm(out, "kernel-firmware-kmg", "20261201", files={
            FW + "gpu_present.bin.xz": b"fw-a", FW + "gpu_absent.bin.xz": b"fw-b"},
            provides=(FW + "gpu_present.bin.xz", FW + "gpu_absent.bin.xz"), sign=key),
        rpmbuild.build_rpm(out, "kernel-firmware-hidden", "20261201", files={FW + "gpu_absent.bin": b"fw-b"},
                           sign=key),
        rpmbuild.build_rpm(out, "kmg-evil-firmware", "1.0", files={"/usr/lib/firmware/kmg/gpu_present.bin.zst": b"x"},
                           provides=("/usr/lib/firmware/kmg/gpu_present.bin.zst",), sign=key),
        rpmbuild.build_rpm(out, "kmg-sup-kmp-default", "3.0", sign=key, supplements=(
            "modalias(kernel-default:pci:v0000EEEEd00000012sv*sd*bc03sc*i*)",
            "modalias(kernel-default:of:N*T*Cacme%%2Ckmg-chip)")),  # '%%': rpmbuild's spec escape of '%'
        rpmbuild.build_rpm(out, "kmod-kmgthird", "1.2", provides=("modalias(pci:v0000EEEEd00000009sv*sd*bc*sc*i*)",),
                           sign=key),
    ]
    repo = base / "repo"
    zypperroot.publish(repo, [pkgs.base, pkgs.default, pkgs.extra, *extra], key)
    root = zypperroot.make_base_root(base / "root", repo, key)
    # the same, but no package names a firmware file in primary.xml
    bare = base / "bare"
    zypperroot.publish(bare, [pkgs.base, pkgs.default, pkgs.extra, extra[1]], key)
    # SUSE's way: the firmware file only in filelists.xml, the package supplementing the devices of
    # the driver that loads it; metadata zstd-compressed, as Tumbleweed's is
    sup = base / "supplemented"
    kmgsup = rpmbuild.build_rpm(out, "kernel-firmware-kmgsup", "20261202", files={FW + "gpu_absent.bin.xz": b"fw-b"},
                                supplements=("modalias(pci:v0000BBBBd00000001sv*sd*bc03sc*i*)",
                                             "modalias(pci:v0000EEEEd00000013sv*sd*bc03sc*i*)"), sign=key)
    zypperroot.publish(sup, [pkgs.base, pkgs.default, pkgs.extra, kmgsup], key, compress="zstd")
    yield pkgs, root, {"bare": bare, "supplemented": sup}, key
    rpmbuild.stop_agent(key)


@pytest.fixture
def machine(suse, kmodguard, tmp_path):
    pkgs, base_root, _, _ = suse
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(base_root), str(root)], check=True)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "kmodguard.toml").write_text(POLICY)
    state = tmp_path / "state"
    state.mkdir()
    env = {**kmodguard.env, **zypperroot.root_env(root, tmp_path), "KMODGUARD_CONFIG_DIR": str(etc),
           "KMODGUARD_STATE_DIR": str(state),
           "KMODGUARD_FIRMWARE_DIRS": f"{root}/lib/firmware:{root}/usr/lib/firmware"}
    kmg = dataclasses.replace(kmodguard, env=env).with_devices(pci_device(GPU), tmp_path)
    kmg("index", "build", "--kver", KVER, "--package", "kernel-default", "--version", EVR, "--request", REQUEST,
        "--from-dir", str(pkgs.default_payload), check_code=0)
    return kmg, root


def history(root: Path) -> list[list[str]]:
    """zypper's history log of the root, one record a line (# comments left out)."""
    path = root / "var/log/zypp/history"
    return [line.split("|") for line in path.read_text().splitlines() if line and not line.startswith("#")]


def gpu_status(kmg, code=3) -> dict:
    (dev,) = kmg("status", "--json", "--kver", KVER, check_code=code).json["devices"]
    return dev


def test_status_names_the_firmware_package_zypper_knows(machine):
    kmg, root = machine
    repomd = root / "var/cache/zypp/raw/kmg/repodata/repomd.xml"
    mtime = repomd.stat().st_mtime_ns
    dev = gpu_status(kmg)
    assert dev["verdict"] == "missing"
    need = dev["candidates"][0]["firmware"]
    assert [p["package"] for p in need["packages"]] == ["kernel-firmware-kmg"], need
    assert need["packages"][0]["version"] == "20261201-1"
    assert (need["files_named"], need["files_covered"]) == (2, 2)
    assert need["not_allowed"] == ["kmg-evil-firmware"]  # it provides one, but is not allow-listed
    assert need["note"] is None
    assert repomd.stat().st_mtime_ns == mtime  # status ran zypper --no-refresh: nothing fetched
    human = kmg("status", "--kver", KVER, check_code=3).stdout
    assert "kmg_gpu needs firmware from kernel-firmware-kmg (not installed)" in human


def test_a_firmware_file_only_in_filelists_is_invisible_to_zypper_and_the_note_says_so(machine, suse):
    kmg, root = machine
    _, _, repos, key = suse
    zypperroot.write_repo(root, f"file://{repos['bare']}", key)
    zypperroot.zypper(root, "refresh")
    need = gpu_status(kmg)["candidates"][0]["firmware"]
    # kernel-firmware-hidden holds kmg/gpu_absent.bin, but only filelists.xml says so
    assert need["packages"] == [] and "kernel-firmware-hidden" not in need["not_allowed"]
    assert "primary.xml, never filelists.xml" in need["note"] and "kernel-firmware" in need["note"]


def test_fix_installs_kernel_default_and_its_firmware_in_one_zypper_transaction(machine):
    kmg, root = machine
    plan = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [(p["request"], p["kind"]) for p in plan["install"]] == [
        (REQUEST, "modules"), ("kernel-firmware-kmg", "firmware")]
    commands_before = [r for r in history(root) if r[1] == "command"]
    res = kmg("fix", "--yes", "--local", "--json", "--kver", KVER)
    assert res.returncode == 6, res.stdout + res.stderr  # installed; this kernel cannot load modules
    now = rpm_installed(root)
    assert f"kernel-default={EVR}" in now and "kernel-firmware-kmg=20261201-1" in now
    assert not any(p.startswith(("kmg-evil-firmware=", "kernel-firmware-hidden=", "kernel-default-base="))
                   for p in now)
    records = history(root)
    commands = [i for i, r in enumerate(records) if r[1] == "command"]
    assert len(commands) == len(commands_before) + 1  # one zypper run...
    last = records[commands[-1]:]
    assert "'--' 'kernel-default = " + EVR + "' 'kernel-firmware-kmg'" in last[0][3]
    installs = sorted(r[2] for r in last if r[1] == "install")
    assert installs == ["kernel-default", "kernel-firmware-kmg"]  # ...that installed both
    assert (root / "lib/firmware/kmg/gpu_absent.bin.xz").is_file()
    dev = gpu_status(kmg, code=3)  # a fresh judgement: the module is there, its firmware too
    assert dev["verdict"] == "loadable" and "firmware" not in dev, dev


def test_repository_announcements_from_zyppers_cached_metadata(machine):
    kmg, _ = machine
    res = kmg("explain", "--json", "--kver", KVER, THIRD, FLAVOURED, ENCODED, check_code=3).json["results"]
    third, flavoured, encoded = res
    assert third["verdict"] == "missing", third
    assert [(c["package"], c["origin"], c["request"]) for c in third["candidates"]] == [
        ("kmod-kmgthird", "repository", "kmod-kmgthird = 1.2-1")]
    assert "provides modalias(pci:v0000EEEEd00000009sv*sd*bc*sc*i*)" in third["reason"]
    # SUSE's modalias(kernel-default:...): this kernel is a -default one
    assert flavoured["verdict"] == "missing" and flavoured["candidates"][0]["request"] == "kmg-sup-kmp-default = 3.0-1"
    assert "supplements modalias(pci:v0000EEEEd00000012sv*sd*bc03sc*i*)" in flavoured["reason"]
    # %2C decoded to ',' before libkmod matched it
    assert encoded["verdict"] == "missing", encoded
    assert "supplements modalias(of:N*T*Cacme,kmg-chip)" in encoded["reason"]
    (none,) = kmg("explain", "--json", "--kver", KVER, synthetic.ALIAS["none"], check_code=0).json["results"]
    assert none["verdict"] == "unknown"


def test_a_firmware_package_that_supplements_the_device_fills_the_need_zypper_cannot_see(machine, suse):
    """kernel-firmware-kmgsup ships kmg/gpu_absent.bin (filelists.xml only, which libzypp never
    reads) and supplements kmg_gpu's devices; its repository's metadata is zstd-compressed."""
    kmg, root = machine
    _, _, repos, key = suse
    zypperroot.write_repo(root, f"file://{repos['supplemented']}", key)
    zypperroot.zypper(root, "refresh")
    assert list((root / "var/cache/zypp/raw/kmg/repodata").glob("*primary.xml.zst"))
    dev = gpu_status(kmg)
    need = dev["candidates"][0]["firmware"]
    assert [(p["package"], p["version"]) for p in need["packages"]] == [("kernel-firmware-kmgsup", "20261202-1")]
    assert "supplements this device (modalias(pci:v0000BBBBd00000001sv*sd*bc03sc*i*))" in need["note"], need
    assert "kmg_gpu needs firmware from kernel-firmware-kmgsup (not installed)" in dev["reason"]
    # a firmware package is not a driver: a device only it announces stays without one
    (alone,) = kmg("explain", "--json", "--kver", KVER, SUPPLEMENTED, check_code=0).json["results"]
    assert alone["verdict"] == "unknown" and "kernel-firmware-kmgsup announces it" in alone["reason"], alone
    before = [r for r in history(root) if r[1] == "command"]
    res = kmg("fix", "--yes", "--local", "--json", "--kver", KVER)
    assert res.returncode == 6, res.stdout + res.stderr  # installed; this kernel cannot load modules
    records = history(root)
    commands = [i for i, r in enumerate(records) if r[1] == "command"]
    assert len(commands) == len(before) + 1
    assert sorted(r[2] for r in records[commands[-1]:] if r[1] == "install") == [
        "kernel-default", "kernel-firmware-kmgsup"]  # one zypper run installed both
    assert (root / "lib/firmware/kmg/gpu_absent.bin.xz").is_file()
