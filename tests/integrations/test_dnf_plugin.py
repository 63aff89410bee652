"""kmodguard's dnf plugin (packaging/dnf-plugin/) inside real dnf 4 on the Fedora-like machine
(fedora_machine.py): it adds the modules package a new kernel needs and warns before a driver in
use is removed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dnfimage import history, installed
from fedora_machine import NIC, REQ_NEXT
from records import pci
from rpmbuild import KVER_NEXT

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dnf_with_plugin(machine, tmp_path):
    """Real dnf (4) on the image with kmodguard's plugin, as the RPM installs it, seeing the devices."""
    kmg, root = machine
    confdir = tmp_path / "dnf-plugins.d"
    confdir.mkdir()
    (confdir / "kmodguard.conf").write_text((REPO / "packaging/dnf-plugin/kmodguard.conf").read_text())
    # the shim in a plugin directory of its own, as the RPM installs it (dnf splits a pluginpath
    # with a blank in it: the checkout's path may hold one)
    plugindir = tmp_path / "dnf-plugins"
    plugindir.mkdir()
    shutil.copy2(REPO / "packaging/dnf-plugin/kmodguard.py", plugindir / "kmodguard.py")
    env = {**kmg.env, "PYTHONPATH": str(REPO), "LC_ALL": "C"}

    def run(*args: str, devices: Path | None = None, without: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        cmd = ["umockdev-run", "--device", str(devices or kmg.umockdev), "--",
               "dnf", "-y", "--installroot", str(root), f"--setopt=pluginpath={plugindir}",
               f"--setopt=pluginconfpath={confdir}", *args]
        # one stream, in the order dnf wrote it (warnings go to stderr, the transaction to stdout)
        return subprocess.run(cmd, env={k: v for k, v in env.items() if k not in without}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)

    return run, kmg, root


def test_dnf_plugin_adds_the_modules_package_a_new_kernel_needs(dnf_with_plugin):
    run, kmg, root = dnf_with_plugin
    before = len(history(root))
    res = run("install", f"kernel-core-uname-r = {KVER_NEXT}")
    assert res.returncode == 0, res.stdout
    assert f"kmodguard: adding {REQ_NEXT}: it drives 0000:00:05.0" in res.stdout
    assert "kernel-modules-6.1.0-57.fc42" in installed(root)  # in the same transaction
    assert len(history(root)) == before + 1


def test_dnf_plugin_takes_the_root_from_dnf(dnf_with_plugin):
    """As installed, nothing sets KMODGUARD_ROOT: the plugin's root is dnf's installroot, which
    dnf hands over as a str (Debian's dnf 4 does); kmodguard's paths are Paths all the same."""
    run, kmg, root = dnf_with_plugin
    res = run("install", f"kernel-core-uname-r = {KVER_NEXT}", without=("KMODGUARD_ROOT",))
    assert res.returncode == 0, res.stdout
    assert "skipped its checks" not in res.stdout, res.stdout
    assert f"kmodguard: adding {REQ_NEXT}: it drives 0000:00:05.0" in res.stdout
    assert "kernel-modules-6.1.0-57.fc42" in installed(root)


def test_dnf_plugin_adds_nothing_when_no_device_needs_it(dnf_with_plugin, tmp_path):
    run, kmg, root = dnf_with_plugin
    only_nic = tmp_path / "nic.umockdev"
    only_nic.write_text(pci("0000:00:03.0", NIC, driver="kmg_core_nic"))
    res = run("install", f"kernel-core-uname-r = {KVER_NEXT}", devices=only_nic)
    assert res.returncode == 0, res.stdout
    assert "kmodguard: adding" not in res.stdout
    assert "kernel-modules-6.1.0-57.fc42" not in installed(root)
    assert "kernel-core-6.1.0-57.fc42" in installed(root)


def test_dnf_plugin_warns_before_removing_a_driver_in_use(dnf_with_plugin):
    run, kmg, root = dnf_with_plugin
    res = run("remove", "kernel-modules")
    out = res.stdout
    assert "kmodguard: removing kernel-modules takes the driver of 0000:00:05.0 (modules: kmg_gpu)" in out
    # the warning comes before the transaction runs
    assert out.index("kmodguard: removing") < out.index("Running transaction")
