"""SUSE's kernel package layout for Debian's real zypper (1.14) with --root: a createrepo_c
repository whose metadata (repomd.xml.asc) and packages are signed with a throwaway key, and a
root whose rpm database has kernel-default-base installed.

SUSE layout (synthetic modules, gcc-built): kernel-default-base holds the modules a VM needs;
kernel-default of the same version is a superset that replaces it (Obsoletes and Provides
kernel-default-base = VERSION-RELEASE; -base Conflicts with it); kernel-default-extra is an add-on
to kernel-default. kmodguard asks for `kernel-default = VERSION-RELEASE` (requests.NAME_VERSION).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import rpmbuild
import synthetic

VERSION, RELEASE = "6.4.0", "150600.23.7.1"
KVER = "6.4.0-150600.23.7-default"  # uname -r of that build
EVR = f"{VERSION}-{RELEASE}"
REQUEST = f"kernel-default = {EVR}"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300),
                         env={**os.environ, "LC_ALL": "C"}, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _module_files(mods, work: Path) -> dict[str, bytes]:
    top = work / "tree"
    out = {}
    for m in mods:
        path = synthetic.build_module(m, top / "lib/modules" / KVER, work / "src")
        out[f"/lib/modules/{KVER}/{m.subdir}/{m.filename}"] = path.read_bytes()
    return out


@dataclass
class SusePackages:
    base: Path  # kernel-default-base: installed
    default: Path  # kernel-default: the target
    extra: Path  # kernel-default-extra: an add-on to kernel-default
    unsigned_default: Path  # kernel-default as a repository must not be trusted with
    default_payload: Path  # kernel-default's files, for `kmodguard index build --from-dir`
    conflicting_default: Path  # kernel-default that conflicts with -base without replacing it


def build_packages(out: Path, key: rpmbuild.TestKey) -> SusePackages:
    work = out.parent / "suse-work"
    installed = _module_files(synthetic.INSTALLED, work / "base")
    superset = _module_files(synthetic.INSTALLED + synthetic.KERNEL_MODULES, work / "default")
    extra = _module_files(synthetic.KERNEL_MODULES_EXTRA, work / "extra")
    common = dict(arch="x86_64")
    base = rpmbuild.build_rpm(out / "signed", "kernel-default-base", VERSION, RELEASE, files=installed,
                              provides=(f"kernel-base = {EVR}",), conflicts=(f"kernel-default = {EVR}",), sign=key,
                              **common)
    # (SUSE's kernel-uname-r = KVER provide is left out: Debian's rpmbuild refuses its second '-')
    default_args = dict(files=superset, provides=(f"kernel-base = {EVR}", f"kernel-default-base = {EVR}"),
                        obsoletes=(f"kernel-default-base = {EVR}",), **common)
    default = rpmbuild.build_rpm(out / "signed", "kernel-default", VERSION, RELEASE, sign=key, **default_args)
    extra_rpm = rpmbuild.build_rpm(out / "signed", "kernel-default-extra", VERSION, RELEASE, files=extra,
                                   requires=(f"kernel-default = {EVR}",), sign=key, **common)
    unsigned = rpmbuild.build_rpm(out / "unsigned", "kernel-default", VERSION, RELEASE, **default_args)
    # the same package had it only conflicted with -base, without replacing it
    conflicting = rpmbuild.build_rpm(out / "conflicting", "kernel-default", VERSION, RELEASE, sign=key,
                                     **{**default_args, "obsoletes": (), "provides": (f"kernel-base = {EVR}",)})
    return SusePackages(base, default, extra_rpm, unsigned, work / "default/tree", conflicting)


def publish(repo: Path, rpms: list[Path], key: rpmbuild.TestKey, compress: str | None = None) -> None:
    """Exactly these packages; repomd.xml signed (zypper's repo_gpgcheck) with key."""
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for f in rpms:
        shutil.copyfile(f, repo / f.name)
    rpmbuild.createrepo(repo)
    if compress == "zstd":
        _as_zstd(repo)
    md = repo / "repodata/repomd.xml"
    _run(["gpg", "--batch", "--homedir", str(key.home), "--pinentry-mode", "loopback", "--passphrase", "",
          "--local-user", key.fingerprint, "--yes", "--detach-sign", "--armor", "-o", f"{md}.asc", str(md)])


def _as_zstd(repo: Path) -> None:
    """The metadata zstd-compressed, as Tumbleweed's (Debian's createrepo_c 0.17 has no zstd):
    each .xml.gz recompressed, repomd.xml's location, checksum and size rewritten."""
    import gzip
    import hashlib
    import re

    md = repo / "repodata/repomd.xml"
    text = md.read_text()
    for gz in sorted((repo / "repodata").glob("*.xml.gz")):
        data = subprocess.run(["zstd", "-q", "-c"], input=gzip.decompress(gz.read_bytes()), capture_output=True,
                              check=True).stdout
        old_sum, new_sum = hashlib.sha256(gz.read_bytes()).hexdigest(), hashlib.sha256(data).hexdigest()
        zst = gz.with_name(gz.name.removesuffix(".gz").replace(old_sum, new_sum) + ".zst")  # the name holds its sum
        zst.write_bytes(data)
        block = re.search(r"<data type=[^>]*>(?:(?!</data>).)*" + re.escape(gz.name) + r"(?:(?!</data>).)*</data>",
                          text, re.S)[0]
        new = block.replace(gz.name, zst.name).replace(old_sum, new_sum)
        new = re.sub(r"<size>\d+</size>", f"<size>{len(data)}</size>", new, count=1)
        text = text.replace(block, new)
        gz.unlink()
    md.write_text(text)


def write_repo(root: Path, baseurl: str, key: rpmbuild.TestKey) -> None:
    """The root's only repository: metadata and packages gpg-checked against the test key."""
    d = root / "etc/zypp/repos.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kmg.repo").write_text(f"[kmg]\nname=kmg test repository\nbaseurl={baseurl}\nenabled=1\nautorefresh=0\n"
                                f"type=rpm-md\ngpgcheck=1\nrepo_gpgcheck=1\npkg_gpgcheck=1\n"
                                f"gpgkey=file://{key.public}\n")


def zypper_bin() -> Path:
    """The directory holding Debian's real zypper binary. Debian 12's zypper cannot be installed
    beside dnf-plugins-core (which Breaks it over one manual page), and dnf download needs that;
    so tools/packages installs zypper's libraries (libzypp, zypper-common) and the tests take the
    zypper binary from its own package: `apt-get download zypper`, extracted into the test cache."""
    import fcntl

    import realtree

    if shutil.which("zypper"):
        return Path(shutil.which("zypper")).parent
    cache = realtree.cache_dir() / "zypper"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = sorted(cache.glob("zypper_*/usr/bin/zypper"))
        if done:
            return done[-1].parent
        tmp = cache / ".download"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        res = subprocess.run(["apt-get", "download", "zypper"], cwd=tmp, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "LC_ALL": "C"})
        debs = list(tmp.glob("zypper_*.deb"))
        assert res.returncode == 0 and len(debs) == 1, (
            f"apt-get download zypper failed ({res.returncode}): {res.stderr.strip()[-400:]}; run 'apt-get update' "
            f"or point KMODGUARD_TEST_CACHE at a cache that holds zypper")
        dest = cache / debs[0].stem
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")])
        os.rename(tmp / "x", dest)
        shutil.rmtree(tmp, ignore_errors=True)
        return dest / "usr/bin"


def path_env() -> dict:
    """PATH with the real zypper on it (for kmodguard and the helpers here)."""
    return {"PATH": f"{zypper_bin()}:{os.environ['PATH']}"}


def zypper(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(zypper_bin() / "zypper"), "--non-interactive", "--root", str(root), *args]
    return _run(cmd) if check else subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                                  env={**os.environ, "LC_ALL": "C"})


def make_base_root(root: Path, repo: Path, key: rpmbuild.TestKey) -> Path:
    """An rpm database with the test key and kernel-default-base installed (by zypper), depmod'ed."""
    root.mkdir(parents=True)
    _run(["rpm", "--root", str(root), "--initdb"])
    _run(["rpm", "--root", str(root), "--import", str(key.public)])  # as SUSE's image trusts its own key
    write_repo(root, f"file://{repo}", key)
    zypper(root, "refresh")
    zypper(root, "install", "--no-recommends", "--", f"kernel-default-base = {EVR}")
    synthetic.depmod(root, KVER)  # no built-in modules: the packages ship none
    return root


def root_env(root: Path, tmp: Path) -> dict:
    return {**path_env(), "KMODGUARD_ROOT": str(root), "KMODGUARD_MODULES_DIR": str(root / "lib/modules" / KVER),
            "KMODGUARD_MODPROBE_DIRS": str(root / "etc/modprobe.d"), "KMODGUARD_BOOT_DIR": str(root / "boot"),
            "KMODGUARD_DRACUT_CONF_DIR": str(root / "etc/dracut.conf.d"),
            "KMODGUARD_KMSG": str(tmp / "no-kmsg"), "KMODGUARD_CONTAINER": "none"}
