"""`kmodguard fix --backend apt` for real: this machine's apt-get and dpkg installing Ubuntu-style
linux-modules-extra-KVER from a signed local repository into a real minimal Debian root
(mmdebstrap), the device judged again afterwards; this machine's own apt and dpkg untouched.

As in test_fix_dnf.py, this kernel cannot load modules: a fix that installed ends in exit 6.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

import aptroot
import rpmbuild
import synthetic
from aptroot import EXTRA, KVER, MODULES

GPU = synthetic.ALIAS["gpu"]  # kmg_gpu: in linux-modules-extra-KVER
DEVICES = (f"P: /devices/pci0000:00/0000:00:05.0\nE: SUBSYSTEM=pci\nE: MODALIAS={GPU}\nE: PCI_SLOT_NAME=0000:00:05.0\n"
           f"A: modalias={GPU}\nA: driver_override=(null)\n\n")


@pytest.fixture(scope="session")
def apt_world(tmp_path_factory):
    base = tmp_path_factory.mktemp("apt")
    world = aptroot.make_world(base)
    yield world.debs, world.repo, world.root, base
    world.close()


@pytest.fixture
def machine(apt_world, kmodguard, tmp_path):
    debs, repo, base_root, _ = apt_world
    root = aptroot.copy_root(base_root, tmp_path / "root")
    aptroot.write_sources(root, repo)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "kmodguard.toml").write_text('[timeouts]\nsettle = 0.2\nlock_wait = 2\npackage_manager = 120\n')
    env = {**kmodguard.env, **aptroot.root_env(root, tmp_path), "KMODGUARD_CONFIG_DIR": str(etc)}
    kmg = dataclasses.replace(kmodguard, env=env).with_devices(DEVICES, tmp_path)
    kmg("index", "build", "--kver", KVER, "--package", EXTRA, "--version", aptroot.VERSION,
        "--from-dir", str(debs.extra_payload), check_code=0)
    return kmg, root


def fix(kmg, *args):
    return kmg("fix", "--yes", "--local", "--backend", "apt", "--json", "--kver", KVER, *args)


def test_fix_installs_into_the_root_with_its_empty_lists_refreshed(machine):
    kmg, root = machine
    assert not list((root / "var/lib/apt/lists").glob("*Packages"))  # a cloud image's empty lists
    # the root's own apt.conf.d is what apt reads (RootDir= would read this machine's)
    (root / "etc/apt/apt.conf.d/99kmg-test").write_text('Dir::Log::Terminal "kmg-term.log";\n')
    plan = kmg("fix", "--dry-run", "--backend", "apt", "--json", "--kver", KVER, check_code=3).json
    assert [p["request"] for p in plan["install"]] == [EXTRA]
    res = fix(kmg)
    assert res.returncode == 6, res.stdout + res.stderr  # installed; this kernel cannot load modules
    steps = {s["step"]: s for s in res.json["steps"]}
    assert steps["install"]["result"] == "done" and EXTRA in steps["install"]["detail"]
    assert steps["depmod"]["result"] == "done"
    # read from the root itself: dpkg's database, the files, depmod's index
    assert aptroot.dpkg_status(root, EXTRA) == "installed" and aptroot.dpkg_status(root, MODULES) == "installed"
    assert (root / "lib/modules" / KVER / "kernel/drivers/gpu/drm/kmg/kmg_gpu.ko").is_file()
    assert "kmg_gpu.ko" in (root / "lib/modules" / KVER / "modules.dep").read_text()
    assert list((root / "var/lib/apt/lists").glob("*Packages"))  # kmodguard ran apt-get update in the root
    assert "Log started" in (root / "var/log/apt/kmg-term.log").read_text()  # the root's apt.conf.d was read
    # the device judged again: its driver is installed now
    status = kmg("status", "--json", "--kver", KVER).json
    assert [d["verdict"] for d in status["devices"]] == ["loadable"]
    # this machine's own apt and dpkg never saw any of it
    host = subprocess.run(["dpkg-query", "-W", "--", EXTRA], capture_output=True, text=True)
    assert host.returncode != 0 and not Path("/lib/modules", KVER).exists()
    assert not list(Path("/var/lib/apt/lists").glob("*kmodguard*")) and "kmg_gpu" not in \
        Path("/var/lib/dpkg/status").read_text()


def test_index_fetch_downloads_with_apt_and_indexes_the_package(machine, tmp_path):
    kmg, root = machine
    env = {**kmg.env, "KMODGUARD_INDEX_DIR": str(tmp_path / "fetched")}
    kmg = dataclasses.replace(kmg, env=env)
    doc = kmg("index", "fetch", "--backend", "apt", "--kver", KVER, "--json", check_code=0).json
    assert [(p["package"], p["how"]) for p in doc["packages"]] == [(EXTRA, "downloaded")]
    assert aptroot.dpkg_status(root, EXTRA) == "unknown"  # downloaded, never installed: dpkg has no record
    assert not (root / "lib/modules" / KVER / "kernel/drivers/gpu").exists()
    explained = kmg("explain", "--kver", KVER, "--json", GPU).json
    assert explained["results"][0]["verdict"] == "missing"
    assert explained["results"][0]["candidates"][0]["package"] == EXTRA


@pytest.mark.parametrize("bad", ['/srv/a"b', "/srv/a;b", "relative/root", "/srv/a\nb"])
def test_a_root_apt_cannot_be_told_about_is_refused_not_quoted(bad):
    from kmodguard.backends.apt import AptBackend
    from kmodguard.errors import InvalidInput

    with pytest.raises(InvalidInput, match="cannot be handed to apt"):
        AptBackend(Path(bad)).query([EXTRA])


def test_a_refused_signature_with_old_lists_kept_is_signature_refused(machine, apt_world, tmp_path):
    """apt keeps the lists it trusted before and only warns: the package missing from them is not
    "unavailable" but unknown, because the repository's new Release was refused."""
    kmg, root = machine
    debs, repo, _, _ = apt_world
    mine = aptroot.make_repo(tmp_path / "repo", repo.key).publish([debs.modules])
    aptroot.write_sources(root, mine)
    aptroot.apt_get(root, "-q", "update")  # trusted lists without the package
    other = rpmbuild.make_test_key(tmp_path / "gnupg-other", uid="untrusted <untrusted@example.invalid>")
    try:
        mine.publish([debs.modules, debs.extra], sign_with=other)
        res = fix(kmg)
    finally:
        rpmbuild.stop_agent(other)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.json["error"]["name"] == "SignatureRefused" and mine.uri in res.json["error"]["message"]
    assert aptroot.dpkg_status(root, EXTRA) == "unknown"


# this machine's own apt, asked for real (no root of the harness)
def test_apt_backend_asks_apt_for_real():
    from kmodguard.backends.apt import AptBackend
    from kmodguard.errors import KmodguardError

    apt = AptBackend()
    absent_name = "linux-modules-extra-6.1.0-999-kmg"
    assert not apt.is_installed(absent_name)
    [absent] = apt.query([absent_name])
    assert not absent.available
    with pytest.raises(KmodguardError):  # a bare name that names no kernel is no request kmodguard makes
        apt.is_installed("dpkg")
    with pytest.raises(KmodguardError):
        apt.query(["two words"])
