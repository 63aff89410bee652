"""A Fedora-like machine after its first fix, for the tests of its later life (engine, integrations,
index fetch, check --apply-policy): a real dnf installroot of the Fedora-like kernel (dnfimage.py)
holding kernel-core, kernel-modules-core and kernel-modules of KVER; the repository also has
KVER_NEXT. Devices are umockdev records: a NIC bound to kmg_core_nic (in kernel-modules-core) and a
GPU bound to kmg_gpu (in kernel-modules). The fixtures are a pytest plugin (tests/conftest.py
names it), so every layer's tests can ask for `machine`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import synthetic
from dnfimage import copy_image, dnf, image_env
from records import pci
from rpmbuild import KVER, KVER_NEXT

REPO = Path(__file__).resolve().parents[2]

GPU, NIC = synthetic.ALIAS["gpu"], synthetic.ALIAS["installed"]
REQ_NEXT = f"kernel-modules-uname-r = {KVER_NEXT}"


BOUND = pci("0000:00:03.0", NIC, driver="kmg_core_nic") + pci("0000:00:05.0", GPU, driver="kmg_gpu")


@pytest.fixture(scope="session")
def modules_image(base_root, repo, tmp_path_factory):
    """The cloud image after kmodguard fixed its GPU: kernel-modules of KVER installed too."""
    root = copy_image(base_root, tmp_path_factory.mktemp("lifecycle") / "root")
    res = dnf(root, "install", f"kernel-modules-uname-r = {KVER}")
    assert res.returncode == 0, res.stdout
    subprocess.run(["depmod", "-b", str(root), KVER], check=True)
    return root


@pytest.fixture
def machine(modules_image, kmodguard, repo, tmp_path):
    root = copy_image(modules_image, tmp_path / "root")
    proc = tmp_path / "proc"  # a kernel that loads modules (this machine's does not)
    proc.mkdir()
    (proc / "modules").write_text("")
    (proc / "cmdline").write_text("root=/dev/vda1 ro\n")
    env = {**kmodguard.env, **image_env(root, tmp_path), "KMODGUARD_KVER": KVER,
           "KMODGUARD_MOTD_DIR": str(tmp_path / "motd.d"), "KMODGUARD_PROC": str(proc)}
    env.pop("KMODGUARD_MODULES_DIR")  # ROOT/lib/modules/KVER, for every kernel
    kmg = dataclasses.replace(kmodguard, env=env).with_devices(BOUND, tmp_path)
    _, rpms, _ = repo
    kmg("index", "build", "--from-rpm", str(rpms[KVER]["kernel-modules"]), str(rpms[KVER]["kernel-modules-extra"]),
        check_code=0)
    return kmg, root


def add_next_kernel(root: Path) -> None:
    """kernel-core and kernel-modules-core of the next kernel, as a `dnf upgrade` would install them."""
    res = dnf(root, "install", f"kernel-core-uname-r = {KVER_NEXT}", f"kernel-modules-core-uname-r = {KVER_NEXT}")
    assert res.returncode == 0, res.stdout
    subprocess.run(["depmod", "-b", str(root), KVER_NEXT], check=True)


EXTRA_DEVICE = pci("0000:00:07.0", synthetic.ALIAS["extra_xz"])  # its driver is in kernel-modules-extra


def config_dir(kmg, text: str) -> str:
    etc = Path(kmg.env["KMODGUARD_STATE_DIR"]).parent / "etc-fetch"
    etc.mkdir(exist_ok=True)
    (etc / "kmodguard.toml").write_text(text)
    return str(etc)


def kernel_install(kmg, root: Path, tmp_path: Path, kver: str, extra_env: dict | None = None,
                   initrd: Path | None = None):
    """Debian's real kernel-install, with only kmodguard's plugin and a boot directory of the test."""
    boot = tmp_path / "boot"
    boot.mkdir(exist_ok=True)
    image = root / "lib/modules" / kver / "vmlinuz"
    # installed as the package installs it (KERNEL_INSTALL_PLUGINS is a blank-separated list: the
    # checkout's path may hold a space)
    plugin = tmp_path / "install.d" / "90-kmodguard.install"
    plugin.parent.mkdir(exist_ok=True)
    shutil.copy2(REPO / "units/90-kmodguard.install", plugin)
    env = {**kmg.env, "KERNEL_INSTALL_PLUGINS": str(plugin), "BOOT_ROOT": str(boot),
           "KERNEL_INSTALL_MACHINE_ID": "0123456789abcdef0123456789abcdef",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(extra_env or {})}
    cmd = ["umockdev-run", "--device", str(kmg.umockdev), "--", "kernel-install", "add", kver, str(image),
           *([str(initrd)] if initrd else [])]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
