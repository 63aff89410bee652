"""A Fedora-like cloud image for fix tests: the real dnf (4) installing signed kernel RPMs from a
createrepo_c repository into an installroot. Fixtures built on these live in conftest.py
(`repo`, `base_root`); tests copy `base_root` so that each starts from the same image.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import rpmbuild
from rpmbuild import KVER, KVER_NEXT, LOGGED


def make_repo(base: Path):
    """Signed kernel RPMs of two kernels, a /bin/sh package, and a release package (releasever 42):
    (repo dir, {kver: KernelRpms}, TestKey)."""
    repo_dir, rpms = rpmbuild.kernel_repo(base, (KVER, KVER_NEXT), scripts=LOGGED, signed=True, name="fixrepo")
    key = rpmbuild.test_key(base)
    rpmbuild.build_rpm(repo_dir, "kmg-release", "42", provides=("system-release(releasever) = 42",), sign=key)
    rpmbuild.createrepo(repo_dir)
    return repo_dir, rpms, key


def write_repo_config(root: Path, baseurl: str, key: Path, gpgcheck: bool = True) -> None:
    d = root / "etc" / "yum.repos.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kmg.repo").write_text(f"[kmg]\nname=kmg test repository\nbaseurl={baseurl}\nenabled=1\n"
                                f"gpgcheck={int(gpgcheck)}\ngpgkey=file://{key}\nmetadata_expire=0\n")


def dnf(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dnf", "-y", "--installroot", str(root), *args], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"}, timeout=300)


def make_image(root: Path, repo) -> Path:
    """kernel-core and kernel-modules-core of KVER installed (and depmod'ed), nothing else."""
    repo_dir, _, key = repo
    write_repo_config(root, f"file://{repo_dir}", key.public)
    res = dnf(root, "--releasever", "42", "install", "kmg-release", f"kernel-core-uname-r = {KVER}",
              f"kernel-modules-core-uname-r = {KVER}")
    assert res.returncode == 0, res.stdout + res.stderr
    subprocess.run(["depmod", "-b", str(root), KVER], check=True)
    return root


def copy_image(base_root: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", str(base_root), str(dest)], check=True)
    return dest


def image_env(root: Path, tmp: Path) -> dict:
    """kmodguard's paths pointed into the image (its package manager's --installroot)."""
    return {"KMODGUARD_ROOT": str(root), "KMODGUARD_MODULES_DIR": str(root / "lib/modules" / KVER),
            "KMODGUARD_MODPROBE_DIRS": str(root / "etc/modprobe.d"), "KMODGUARD_BOOT_DIR": str(root / "boot"),
            "KMODGUARD_DRACUT_CONF_DIR": str(root / "etc/dracut.conf.d"),
            "KMODGUARD_KMSG": str(tmp / "no-kmsg"), "KMODGUARD_CONTAINER": "none"}


def installed(root: Path) -> list[str]:
    out = subprocess.run(["rpm", "--root", str(root), "-qa", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}\n"],
                         capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


def history(root: Path) -> list[str]:
    """dnf's transaction history of the image, one line per transaction."""
    res = dnf(root, "-q", "history", "list")
    return [line for line in res.stdout.splitlines() if line.strip()[:1].isdigit()]
