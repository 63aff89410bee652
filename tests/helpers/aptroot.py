"""A real minimal Debian root (mmdebstrap --variant=apt) and a signed local apt repository of
Ubuntu-style kernel module packages built with dpkg-deb from synthetic (gcc-built) modules:
linux-modules-KVER installed in the root, linux-modules-extra-KVER only in the repository.

The root's tarball is cached in the test cache (realtree.cache_dir(), KMODGUARD_TEST_CACHE);
extracted once a session; tests copy that (copy_root). Nothing here touches this machine's apt.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import realtree
import rpmbuild
import synthetic

KVER = "6.8.0-45-generic"  # Ubuntu's shape: the kernel release is in the package names
VERSION = "6.8.0-45.45"
MODULES = f"linux-modules-{KVER}"
EXTRA = f"linux-modules-extra-{KVER}"
TARBALL_MAX_AGE = 30 * 86400  # then mmdebstrap again: bookworm's point releases move on
# docs, manuals and locales are half of the root and nothing here reads them
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 600),
                         env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive", **kw.pop("env", {})},
                         **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


# --- the root --------------------------------------------------------------------------------

def root_tarball() -> Path:
    """bookworm, --variant=apt, from this machine's apt sources; cached (about 20 s once)."""
    if not shutil.which("mmdebstrap"):
        raise AssertionError("mmdebstrap is not installed: tools/setup --test installs it (tools/packages)")
    cache = realtree.cache_dir() / "debian-root"
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / "bookworm-apt.tar"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one session builds, the others wait and reuse
        if tarball.exists() and time.time() - tarball.stat().st_mtime < TARBALL_MAX_AGE:
            return tarball
        partial = cache / ".bookworm-apt.tar"
        _run(["mmdebstrap", "--quiet", "--variant=apt", *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDES),
              "bookworm", str(partial)], timeout=900)
        os.rename(partial, tarball)
    return tarball


def extract_root(dest: Path) -> Path:
    dest.mkdir(parents=True)
    _run(["tar", "-C", str(dest), "-xf", str(root_tarball())])
    # the root's own lists start empty, as a cloud image's do; its sources are set by the tests
    for f in (dest / "etc/apt/sources.list.d").iterdir():
        f.unlink()
    (dest / "etc/apt/sources.list").write_text("")
    return dest


def copy_root(base: Path, dest: Path) -> Path:
    _run(["cp", "-a", str(base), str(dest)])
    return dest


def write_sources(root: Path, repo: "AptRepo", key: Path | None = None, options: str = "") -> None:
    """The root's only source: the local repository, trusted through signed-by= its key."""
    signed_by = f"signed-by={key or repo.key_file}"
    (root / "etc/apt/sources.list").write_text(f"deb [{signed_by}{' ' + options if options else ''}] "
                                               f"{repo.uri} ./\n")


def dpkg_status(root: Path, package: str) -> str:
    """What the root's dpkg database says (installed, not-installed, ...)."""
    res = subprocess.run(["dpkg-query", "--root", str(root), "-W", "-f", "${db:Status-Status}", "--", package],
                         capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else "unknown"


def dpkg_installed(root: Path) -> list[str]:
    res = _run(["dpkg-query", "--root", str(root), "-W", "-f", "${db:Status-Status} ${Package}=${Version}\n"])
    return sorted(line.split()[1] for line in res.stdout.splitlines() if line.startswith("installed "))


def apt_get(root: Path, *args: str) -> subprocess.CompletedProcess:
    """This machine's apt-get on the root, the way kmodguard runs it (an APT_CONFIG naming the root)."""
    conf = root.parent / f".{root.name}-apt.conf"
    conf.write_text(f'Dir "{root}/";\nDPkg::Options:: "--root={root}/";\n')
    return _run(["apt-get", *args], env={"APT_CONFIG": str(conf)})


# --- the packages ------------------------------------------------------------------------------

def build_deb(out: Path, work: Path, name: str, modules, kver: str = KVER, version: str = VERSION,
              depends: str = "") -> Path:
    """An Ubuntu-style modules package: the modules under /lib/modules/KVER, no maintainer scripts
    (Ubuntu's linux-modules-extra runs depmod from the kernel's postinst, not its own)."""
    top = work / name
    for m in modules:
        synthetic.build_module(m, top / "lib/modules" / kver, work / "src")
    (top / "DEBIAN").mkdir(parents=True)
    (top / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: kmodguard tests <kmg@example.invalid>\n"
        f"Section: kernel\nPriority: optional\n{'Depends: ' + depends + chr(10) if depends else ''}"
        f"Description: synthetic kernel modules for {kver}\n")
    out.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(top), str(out)])
    return out / f"{name}_{version}_amd64.deb"


@dataclass
class AptRepo:
    """A flat repository (`deb [signed-by=KEY] copy:DIR ./`) signed with a throwaway key."""

    dir: Path
    key: rpmbuild.TestKey
    key_file: Path  # the binary public key, for signed-by=

    @property
    def uri(self) -> str:
        return f"copy:{self.dir}"  # file: would link the root's lists to the repository's: never stale

    def publish(self, debs: list[Path], sign_with: rpmbuild.TestKey | None = None,
                contents: bool = False, signed: bool = True) -> "AptRepo":
        """Exactly these packages, Packages/Release regenerated and signed (InRelease, Release.gpg;
        signed=False: neither, an unsigned repository); contents: a Contents-amd64 too (what
        apt-file's Contents-deb target fetches)."""
        for old in self.dir.glob("*"):
            old.unlink()
        for deb in debs:
            shutil.copyfile(deb, self.dir / deb.name)
        (self.dir / "Packages").write_text(_run(["apt-ftparchive", "packages", "."], cwd=self.dir).stdout)
        if contents:
            (self.dir / "Contents-amd64").write_text(_run(["apt-ftparchive", "contents", "."], cwd=self.dir).stdout)
        release = _run(["apt-ftparchive", "-o", "APT::FTPArchive::Release::Origin=kmodguard-tests",
                        "release", "."], cwd=self.dir).stdout
        (self.dir / "Release").write_text(release)
        if not signed:
            return self
        key = sign_with or self.key
        gpg = ["gpg", "--batch", "--homedir", str(key.home), "--pinentry-mode", "loopback", "--passphrase", "",
               "--local-user", key.fingerprint, "--yes"]
        _run([*gpg, "--clearsign", "-o", str(self.dir / "InRelease"), str(self.dir / "Release")])
        _run([*gpg, "--detach-sign", "--armor", "-o", str(self.dir / "Release.gpg"), str(self.dir / "Release")])
        return self


def make_repo(dir: Path, key: rpmbuild.TestKey) -> AptRepo:
    dir.mkdir(parents=True)
    key_file = dir.parent / f"{dir.name}-key.gpg"
    key_file.write_bytes(subprocess.run(["gpg", "--batch", "--homedir", str(key.home), "--export", key.fingerprint],
                                        capture_output=True, check=True).stdout)
    return AptRepo(dir, key, key_file)


@dataclass
class Debs:
    modules: Path  # linux-modules-KVER: in the root
    extra: Path  # linux-modules-extra-KVER: in the repository only
    extra_payload: Path  # its files, for `kmodguard index build --from-dir`


def make_debs(base: Path) -> Debs:
    work = base / "debs-work"
    modules = build_deb(base / "debs", work, MODULES, synthetic.INSTALLED)
    extra = build_deb(base / "debs", work, EXTRA, synthetic.KERNEL_MODULES, depends=f"{MODULES} (= {VERSION})")
    return Debs(modules, extra, work / EXTRA)


@dataclass
class World:
    """The packages, a throwaway key, the signed repository holding both, and a root with
    linux-modules-KVER installed (its sources not yet written)."""

    debs: Debs
    key: rpmbuild.TestKey
    repo: AptRepo
    root: Path

    def close(self) -> None:
        rpmbuild.stop_agent(self.key)


def make_world(base: Path) -> World:
    debs = make_debs(base)
    key = rpmbuild.make_test_key(base / "gnupg")
    repo = make_repo(base / "repo", key).publish([debs.modules, debs.extra])
    return World(debs, key, repo, make_base_root(base / "root", debs))


def make_base_root(dest: Path, debs: Debs) -> Path:
    """The Debian root with linux-modules-KVER installed (dpkg --root) and depmod'ed."""
    root = extract_root(dest)
    _run(["dpkg", "--root", str(root), "-i", str(debs.modules)])
    synthetic.depmod(root, KVER)  # no built-in modules: the packages ship none
    return root


def root_env(root: Path, tmp: Path) -> dict:
    """kmodguard's paths pointed into the root (KMODGUARD_ROOT: apt's and dpkg's root)."""
    return {"KMODGUARD_ROOT": str(root), "KMODGUARD_MODULES_DIR": str(root / "lib/modules" / KVER),
            "KMODGUARD_MODPROBE_DIRS": str(root / "etc/modprobe.d"), "KMODGUARD_BOOT_DIR": str(root / "boot"),
            "KMODGUARD_DRACUT_CONF_DIR": str(root / "etc/dracut.conf.d"),
            "KMODGUARD_KMSG": str(tmp / "no-kmsg"), "KMODGUARD_CONTAINER": "none"}


# apt-file's Contents-deb target (its /etc/apt/apt.conf.d/50apt-file.conf, the part a flat repository uses)
CONTENTS_TARGET = """Acquire::IndexTargets {
    deb::Contents-deb {
        MetaKey "$(COMPONENT)/Contents-$(ARCHITECTURE)";
        ShortDescription "Contents-$(ARCHITECTURE)";
        Description "$(RELEASE)/$(COMPONENT) $(ARCHITECTURE) Contents (deb)";
        flatMetaKey "Contents-$(ARCHITECTURE)";
        flatDescription "$(RELEASE) Contents (deb)";
        KeepCompressed "true";
    };
};
"""


def build_plain_deb(out: Path, work: Path, name: str, version: str, files: dict[str, bytes], control: str = "") -> Path:
    """A package of plain files (firmware, a DKMS source) with extra control fields."""
    top = work / f"{name}-{version}"
    shutil.rmtree(top, ignore_errors=True)
    for path, data in files.items():
        dest = top / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    (top / "DEBIAN").mkdir(parents=True)
    (top / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: kmodguard tests <kmg@example.invalid>\n"
        f"Section: kernel\nPriority: optional\n{control}Description: {name} (kmodguard test)\n")
    out.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(top), str(out)])
    return out / f"{name}_{version}_all.deb"
