"""Driver packages that repositories announce in their metadata, matched through libkmod.

The real dnf (4) in an installroot against a local signed createrepo_c repository: a third-party
kmod package with `Provides: modalias(...)` that ships a module for the running kernel, and a
SUSE-style package with `Supplements: modalias(...)`. Verdicts are read through the CLI's JSON;
what a fix did, from the installroot's rpm database.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import rpmbuild
import synthetic
from dnfimage import copy_image, dnf, image_env, installed
from rpmbuild import KVER

THIRD = "pci:v0000EEEEd00000009sv00000000sd00000000bc02sc00i00"
SUPPLEMENTED = "pci:v0000EEEEd00000010sv00000000sd00000000bc03sc00i00"
LATER = "pci:v0000EEEEd00000011sv00000000sd00000000bc02sc00i00"
FLAVOURED = "pci:v0000EEEEd00000012sv00000000sd00000000bc03sc00i00"  # a KMP for SUSE's kernel-default only
GPU = synthetic.ALIAS["gpu"]  # kernel-modules' kmg_gpu: an indexed candidate comes first
POLICY = 'backend = "dnf"\n[timeouts]\nsettle = 0.2\nlock_wait = 2\npackage_manager = 120\n'


@pytest.fixture(scope="module")
def drivers_repo(repo, tmp_path_factory):
    _, _, key = repo
    top = tmp_path_factory.mktemp("drivers")
    mod = synthetic.Module("kmg_third", aliases=("pci:v0000EEEEd00000009sv*sd*bc*sc*i*",), subdir="extra/kmg")
    ko = synthetic.build_module(mod, top / "payload" / "lib" / "modules" / KVER, top / "src")
    out = top / "repo"
    rpmbuild.build_rpm(out, "kmod-kmgthird", "1.2", provides=("modalias(pci:v0000EEEEd00000009sv*sd*bc*sc*i*)",),
                       files={f"/lib/modules/{KVER}/extra/kmg/kmg_third.ko": ko.read_bytes()}, sign=key)
    rpmbuild.build_rpm(out, "kernel-firmware-kmg", "20261201",
                       supplements=("modalias(pci:v0000EEEEd00000010sv*sd*bc03sc*i*)",), sign=key)
    rpmbuild.build_rpm(out, "kmg-sup-kmp-default", "3.0",
                       supplements=("modalias(kernel-default:pci:v0000EEEEd00000012sv*sd*bc03sc*i*)",), sign=key)
    return rpmbuild.createrepo(out)


@pytest.fixture
def machine(base_root, kmodguard, repo, drivers_repo, tmp_path):
    _, rpms, key = repo
    root = copy_image(base_root, tmp_path / "root")
    (root / "etc/yum.repos.d/drivers.repo").write_text(
        f"[drivers]\nname=drivers\nbaseurl=file://{drivers_repo}\nenabled=1\ngpgcheck=1\n"
        f"gpgkey=file://{key.public}\nmetadata_expire=0\n")
    assert dnf(root, "makecache").returncode == 0
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "kmodguard.toml").write_text(POLICY)
    state = tmp_path / "state"
    state.mkdir()
    env = {**kmodguard.env, **image_env(root, tmp_path), "KMODGUARD_CONFIG_DIR": str(etc),
           "KMODGUARD_STATE_DIR": str(state)}
    kmg = dataclasses.replace(kmodguard, env=env)
    kmg("index", "build", "--from-rpm", str(rpms[KVER]["kernel-modules"]), check_code=0)
    return kmg, root


def explain(kmg, *aliases, code=3) -> list[dict]:
    return kmg("explain", "--json", "--kver", KVER, *aliases, check_code=code).json["results"]


def allow(kmg, *names):
    Path(kmg.env["KMODGUARD_CONFIG_DIR"], "kmodguard.toml").write_text(
        f"packages = {json.dumps(['kernel-modules', *names])}\n" + POLICY)


def test_a_modalias_provide_makes_the_device_missing_with_the_repository_package(machine):
    kmg, _ = machine
    third, sup, gpu = explain(kmg, THIRD, SUPPLEMENTED, GPU)
    assert third["verdict"] == "missing", third
    assert [(c["package"], c["module"], c["origin"], c["request"]) for c in third["candidates"]] == [
        ("kmod-kmgthird", None, "repository", "kmod-kmgthird = 1.2-1")]
    assert "provides modalias(pci:v0000EEEEd00000009sv*sd*bc*sc*i*)" in third["reason"]
    # a firmware package (firmware_packages admits kernel-firmware-*) serves a driver, it is not one
    assert sup["verdict"] == "unknown" and "kernel-firmware-kmg announces it" in sup["reason"], sup
    # libsolv's '(kernel-default and namespace:modalias(...))': not for this kernel (no -default flavour)
    (flavoured,) = explain(kmg, FLAVOURED, code=0)
    assert flavoured["verdict"] == "unknown"
    assert gpu["candidates"][0]["origin"] == "index"
    (none,) = explain(kmg, synthetic.ALIAS["none"], code=0)
    assert none["verdict"] == "unknown"  # nothing announces it


def test_a_repository_package_is_installed_only_when_allow_listed(machine, tmp_path):
    kmg, root = machine
    rec = (f"P: /devices/pci0000:00/0000:00:09.0\nE: SUBSYSTEM=pci\nE: MODALIAS={THIRD}\nE: PCI_SLOT_NAME=0000:00:09.0\n"
           f"A: modalias={THIRD}\nA: driver_override=(null)\n\n")
    dev = kmg.with_devices(rec, tmp_path)
    assert "kmod-kmgthird 1.2-1 (its repository announces it)" in dev("status", "--kver", KVER, check_code=3).stdout
    plan = dev("fix", "--dry-run", "--json", "--kver", KVER).json
    assert plan["install"] == [] and plan["devices"][0]["action"] == "refused"
    assert "allow-list" in plan["devices"][0]["reason"]
    allow(kmg, "kmod-kmgthird")
    plan = dev("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [(p["request"], p["kind"]) for p in plan["install"]] == [("kmod-kmgthird = 1.2-1", "modules")]
    before = installed(root)
    res = dev("fix", "--yes", "--json", "--kver", KVER)
    assert res.returncode == 6, res.stderr  # installed; this kernel cannot load modules
    assert sorted(set(installed(root)) - set(before)) == ["kmod-kmgthird-1.2-1"]
    # the module came from the installed tree after the install: the one the package shipped
    (outcome,) = res.json["outcomes"]
    assert "kmg_third could not be loaded" in outcome["reason"]
    (after,) = explain(kmg, THIRD)
    assert after["verdict"] == "loadable" and after["installed_modules"] == ["kmg_third"]


def test_new_repository_metadata_is_read_again(machine, drivers_repo, repo, tmp_path):
    kmg, root = machine
    (first,) = explain(kmg, LATER, code=0)
    assert first["verdict"] == "unknown"
    newer = tmp_path / "newer"
    shutil.copytree(drivers_repo, newer)
    rpmbuild.build_rpm(newer, "kmod-kmglater", "1.0", provides=("modalias(pci:v0000EEEEd00000011sv*sd*bc*sc*i*)",),
                       sign=repo[2])
    rpmbuild.createrepo(newer)
    (root / "etc/yum.repos.d/drivers.repo").write_text(
        (root / "etc/yum.repos.d/drivers.repo").read_text().replace(str(drivers_repo), str(newer)))
    (again,) = explain(kmg, LATER, code=0)
    assert again["verdict"] == "unknown"  # explain reads dnf's cache only: nothing fetched yet
    assert dnf(root, "makecache").returncode == 0
    (now,) = explain(kmg, LATER)
    assert now["verdict"] == "missing" and now["candidates"][0]["package"] == "kmod-kmglater"


def test_a_flavoured_supplement_counts_on_a_kernel_of_that_flavour(machine, tmp_path):
    kmg, _ = machine
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "modules").write_text("")  # a kernel that loads modules
    suse = "6.4.0-150600.23.25-default"
    env = {**kmg.env, "KMODGUARD_PROC": str(proc), "KMODGUARD_MODULES_DIR": str(tmp_path / "no-tree")}
    res = dataclasses.replace(kmg, env=env)("explain", "--json", "--kver", suse, FLAVOURED, check_code=3)
    (result,) = res.json["results"]
    assert result["verdict"] == "missing", result
    assert [(c["package"], c["request"]) for c in result["candidates"]] == [("kmg-sup-kmp-default",
                                                                             "kmg-sup-kmp-default = 3.0-1")]
