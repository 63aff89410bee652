"""Firmware and driver announcements through apt's own indices, in a real minimal Debian root (aptroot.py) against a
signed local apt repository that publishes a Contents-amd64 (what apt-file's Contents-deb target
fetches at apt-get update; apt-file itself is not installed here, and kmodguard reads the same
indices with apt-get indextargets and apt-helper cat-file).

firmware-kmg holds kmg_gpu's two firmware files under /lib/firmware (Debian 12's place),
kmg-evil-firmware one of them but is not allow-listed. What is asserted is read from the root:
dpkg's database and apt's history log (ROOT/var/log/apt/history.log). kmg-third-modules announces
its module in Debian's `Modaliases:` field (as dh_modaliases writes it), which apt's package lists
carry.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import aptroot
import rpmbuild
import synthetic
from backend_harness import pci_device

KVER, EXTRA, VERSION = aptroot.KVER, aptroot.EXTRA, aptroot.VERSION
GPU = synthetic.ALIAS["gpu"]  # kmg_gpu in linux-modules-extra: it names kmg/gpu_present.bin and kmg/gpu_absent.bin
THIRD = "pci:v0000EEEEd00000009sv00000000sd00000000bc02sc00i00"
OTHER = "usb:v1234p5678d0001dc00dsc00dp00ic03isc00ip00in00"
OF = "of:NkmgT(null)Cacme,kmg-chip"
MODALIASES = ("Modaliases: kmg_third(pci:v0000EEEEd00000009sv*sd*bc*sc*i*, usb:v1234p5678d*dc*dsc*dp*ic*isc*ip*in*), "
              "kmg_third_of(of:N*T*Cacme,kmg-chip)\n")
POLICY = ('backend = "apt"\nfirmware_packages = ["firmware-kmg"]\n'
          "[timeouts]\nsettle = 0.2\nlock_wait = 2\npackage_manager = 120\n")


@pytest.fixture(scope="module")
def debian(tmp_path_factory):
    base = tmp_path_factory.mktemp("firmware-apt")
    key = rpmbuild.make_test_key(base / "gnupg")
    debs = aptroot.make_debs(base)
    fw = [aptroot.build_plain_deb(base / "debs", base / "debs-work", "firmware-kmg", "20261201-1", {
              "/lib/firmware/kmg/gpu_present.bin": b"fw-a", "/lib/firmware/kmg/gpu_absent.bin": b"fw-b"}),
          aptroot.build_plain_deb(base / "debs", base / "debs-work", "kmg-evil-firmware", "1.0",
                                  {"/usr/lib/firmware/kmg/gpu_present.bin": b"x"})]
    mod = synthetic.Module("kmg_third", aliases=("pci:v0000EEEEd00000009sv*sd*bc*sc*i*",), subdir="updates/dkms")
    ko = synthetic.build_module(mod, base / "third" / "lib/modules" / KVER, base / "third-src")
    fw.append(aptroot.build_plain_deb(base / "debs", base / "debs-work", "kmg-third-modules", "1.2-1",
                                      {f"/lib/modules/{KVER}/updates/dkms/kmg_third.ko": ko.read_bytes()}, MODALIASES))
    yield debs, fw, key, aptroot.make_base_root(base / "root", debs)
    rpmbuild.stop_agent(key)


@pytest.fixture
def machine(debian, kmodguard, tmp_path):
    debs, fw, key, base_root = debian
    root = aptroot.copy_root(base_root, tmp_path / "root")
    repo = aptroot.make_repo(tmp_path / "repo", key)
    repo.publish([debs.modules, debs.extra, *fw], contents=True)
    aptroot.write_sources(root, repo)
    (root / "etc/apt/apt.conf.d/50apt-file.conf").write_text(aptroot.CONTENTS_TARGET)
    aptroot.apt_get(root, "-q", "update")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "kmodguard.toml").write_text(POLICY)
    env = {**kmodguard.env, **aptroot.root_env(root, tmp_path), "KMODGUARD_CONFIG_DIR": str(etc),
           "KMODGUARD_FIRMWARE_DIRS": f"{root}/lib/firmware:{root}/usr/lib/firmware"}
    kmg = dataclasses.replace(kmodguard, env=env).with_devices(pci_device(GPU), tmp_path)
    kmg("index", "build", "--kver", KVER, "--package", EXTRA, "--version", VERSION,
        "--from-dir", str(debs.extra_payload), check_code=0)
    return kmg, root


def gpu_status(kmg, code=3) -> dict:
    (dev,) = kmg("status", "--json", "--kver", KVER, check_code=code).json["devices"]
    return dev


def test_status_names_the_firmware_package_from_apts_contents_indices(machine):
    kmg, root = machine
    lists = sorted(p.name for p in (root / "var/lib/apt/lists").glob("*Contents*"))
    assert lists, "apt-get update fetched no Contents index"
    dev = gpu_status(kmg)
    assert dev["verdict"] == "missing"
    need = dev["candidates"][0]["firmware"]
    assert need["packages"] == [{"package": "firmware-kmg", "version": "20261201-1"}], need
    assert (need["files_named"], need["files_covered"]) == (2, 2)
    assert need["not_allowed"] == ["kmg-evil-firmware"]
    # the root is Debian and its only source has no non-free-firmware component: the note says so
    assert "non-free-firmware" in need["note"] and "apt-get update" in need["note"]
    assert "kmg_gpu needs firmware from firmware-kmg (not installed)" in kmg("status", "--kver", KVER,
                                                                             check_code=3).stdout


def test_without_contents_indices_the_answer_says_how_to_find_it_by_hand(machine):
    kmg, root = machine
    (root / "etc/apt/apt.conf.d/50apt-file.conf").unlink()
    for f in (root / "var/lib/apt/lists").glob("*Contents*"):
        f.unlink()
    need = gpu_status(kmg)["candidates"][0]["firmware"]
    assert need["packages"] == []
    assert "no Contents indices" in need["note"] and "apt-file search" in need["note"]


def test_fix_installs_the_modules_and_the_firmware_package_in_one_apt_get_run(machine):
    kmg, root = machine
    plan = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [(p["request"], p["kind"]) for p in plan["install"]] == [(EXTRA, "modules"), ("firmware-kmg", "firmware")]
    log = root / "var/log/apt/history.log"
    before = log.read_text().count("Start-Date:") if log.exists() else 0
    res = kmg("fix", "--yes", "--local", "--json", "--kver", KVER)
    assert res.returncode == 6, res.stdout + res.stderr  # installed; this kernel cannot load modules
    now = aptroot.dpkg_installed(root)
    assert f"{EXTRA}={VERSION}" in now and "firmware-kmg=20261201-1" in now
    assert not any(p.startswith("kmg-evil-firmware=") for p in now)
    entries = log.read_text().split("Start-Date:")
    assert len(entries) - 1 == before + 1  # one apt-get run...
    install = next(line for line in entries[-1].splitlines() if line.startswith("Install:"))
    assert EXTRA in install and "firmware-kmg" in install  # ...that installed both
    assert (root / "lib/firmware/kmg/gpu_absent.bin").is_file()
    dev = gpu_status(kmg)
    assert dev["verdict"] == "loadable" and "firmware" not in dev, dev


def test_a_modaliases_field_makes_the_device_missing_and_fix_installs_it_when_allowed(machine, tmp_path):
    kmg, root = machine
    res = kmg("explain", "--json", "--kver", KVER, THIRD, OTHER, OF, check_code=3).json["results"]
    for r in res:
        assert r["verdict"] == "missing", r
        assert [(c["package"], c["origin"], c["request"]) for c in r["candidates"]] == [
            ("kmg-third-modules", "repository", "kmg-third-modules = 1.2-1")]
    assert "provides modalias(of:N*T*Cacme,kmg-chip)" in res[2]["reason"]  # the ',' inside an alias kept
    (none,) = kmg("explain", "--json", "--kver", KVER, synthetic.ALIAS["none"], check_code=0).json["results"]
    assert none["verdict"] == "unknown"
    dev = kmg.with_devices(pci_device(THIRD, "0000:00:09.0"), tmp_path)
    plan = dev("fix", "--dry-run", "--json", "--kver", KVER).json
    assert plan["install"] == [] and plan["devices"][0]["action"] == "refused"  # not in packages
    Path(kmg.env["KMODGUARD_CONFIG_DIR"], "kmodguard.toml").write_text(
        'packages = ["linux-modules-extra", "kmg-third-modules"]\n' + POLICY)
    plan = dev("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [(p["request"], p["kind"]) for p in plan["install"]] == [("kmg-third-modules = 1.2-1", "modules")]
    before = aptroot.dpkg_installed(root)
    res = dev("fix", "--yes", "--local", "--json", "--kver", KVER)
    assert res.returncode == 6, res.stdout + res.stderr  # installed; this kernel cannot load modules
    assert sorted(set(aptroot.dpkg_installed(root)) - set(before)) == ["kmg-third-modules=1.2-1"]
    # apt was asked for that exact version: apt's NAME=VERSION, after '--'
    assert "Commandline: apt-get -y -q --no-install-recommends -o DPkg::Lock::Timeout=2 install -- " \
           "kmg-third-modules=1.2-1" in (root / "var/log/apt/history.log").read_text()
    (after,) = kmg("explain", "--json", "--kver", KVER, THIRD).json["results"]
    assert after["verdict"] == "loadable" and after["installed_modules"] == ["kmg_third"]


def test_apt_asks_its_firmware_packages_versions_once_a_backend(monkeypatch, tmp_path):
    """`explain -` asks for the firmware of hundreds of modules, one at a time: apt-cache policy
    (a load of apt's whole cache) runs once, for every package the Contents name, not once a module."""
    from kmodguard.backends.apt import AptBackend

    backend = AptBackend(root=tmp_path)
    table = {"lib/firmware/kmg/a.bin": {"firmware-kmg"}, "usr/lib/firmware/kmg/b.bin.xz": {"firmware-other"},
             "lib/firmware/other/c.bin": {"firmware-third"}}
    monkeypatch.setattr(backend, "_firmware_table", lambda timeout: (table, {"main", "non-free-firmware"}, True))
    asked = []

    def policy(packages, timeout):
        asked.append(list(packages))
        return {p: "" if p == "firmware-other" else "1.0" for p in packages}

    monkeypatch.setattr(backend, "_candidate_versions", policy)
    a = backend.firmware_providers(["kmg/a.bin"], cache_only=True)
    b = backend.firmware_providers(["kmg/b.bin", "kmg/none.bin"], cache_only=True)
    none = backend.firmware_providers(["kmg/none.bin"], cache_only=True)
    assert asked == [["firmware-kmg", "firmware-other", "firmware-third"]]
    assert (a.providers, a.versions) == ({"kmg/a.bin": ("firmware-kmg",)}, {"firmware-kmg": "1.0"})
    assert (b.providers, b.versions) == ({"kmg/b.bin": ("firmware-other",)}, {"firmware-other": ""})
    assert (none.providers, none.versions) == ({}, {})
