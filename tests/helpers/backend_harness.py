"""One harness per package manager for the backend contract (backend_contract.py): a fresh
root with the package manager's real database, a per-test signed repository holding the target
package, and the few things the contract does to them. Everything a test asserts is read from the
system (rpm database, dpkg status), never from what kmodguard says.

A new backend is added by writing its harness here and passing the contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import aptroot
import dnfimage
import packagekitd
import rpmbuild
import synthetic
import zypperroot

GPU = synthetic.ALIAS["gpu"]  # kmg_gpu: in the target package of every harness


def pci_device(modalias: str, addr: str = "0000:00:05.0") -> str:
    return (f"P: /devices/pci0000:00/{addr}\nE: SUBSYSTEM=pci\nE: MODALIAS={modalias}\nE: PCI_SLOT_NAME={addr}\n"
            f"A: modalias={modalias}\nA: driver_override=(null)\n\n")


@dataclasses.dataclass
class Machine:
    """A root, its repository, and kmodguard pointed at both."""

    kmg: object  # conftest.Kmodguard
    root: Path
    harness: "Harness"
    tmp: Path

    def fix(self, *args: str, timeout: float = 120):
        return self.kmg("fix", "--yes", "--local", "--backend", self.harness.backend, "--json",
                        "--kver", self.harness.kver, *args, timeout=timeout)

    def installed(self) -> list[str]:
        return self.harness.installed(self.root)

    def has_target(self) -> bool:
        return any(p.startswith(self.harness.package + "=") for p in self.installed())


class Harness:
    backend: str  # --backend NAME
    kver: str
    package: str  # the target package's name, as its database shows it
    request: str  # what kmodguard asks the package manager for
    unavailable_hint: str  # a phrase of the backend's own "what to do" when the package is gone
    lock_error: str  # a phrase of the Busy error's message
    replaces: tuple[str, ...] = ()  # packages the target replaces in the same transaction

    def machine(self, tmp: Path, kmodguard) -> Machine:
        """A fresh root; the repository holds the target and the root's metadata is current."""
        raise NotImplementedError

    def installed(self, root: Path) -> list[str]:
        raise NotImplementedError

    def publish(self, m: Machine, *, target: bool = True) -> None:
        """The repository again, with or without the target package."""
        raise NotImplementedError

    def refresh_metadata(self, m: Machine) -> None:
        """The root's package manager fetches the repository's metadata now (then it may go stale)."""
        raise NotImplementedError

    def refuse_signatures(self, m: Machine) -> None:
        """The repository as the package manager must refuse it (signed by an untrusted key, or unsigned)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def lock(self, m: Machine):
        """Hold the package manager's lock, as a running cloud-init or unattended upgrade would."""
        raise NotImplementedError
        yield

    def hang(self, m: Machine, url: str) -> None:
        """The repository moved to url, a server that accepts connections and never answers."""
        raise NotImplementedError


def _kmodguard(kmodguard, env: dict, tmp: Path, backend: str):
    etc = tmp / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "kmodguard.toml").write_text(f'backend = "{backend}"\n[timeouts]\nsettle = 0.2\nlock_wait = 2\n'
                                        f'package_manager = 120\n')
    env = {**kmodguard.env, **env, "KMODGUARD_CONFIG_DIR": str(etc)}
    return dataclasses.replace(kmodguard, env=env).with_devices(pci_device(GPU), tmp)


def _lockf(path: Path):
    f = open(path, "rb+")
    fcntl.lockf(f, fcntl.LOCK_EX)  # a POSIX record lock: what rpm and dpkg take
    return f


# --- apt -------------------------------------------------------------------------------------

class AptHarness(Harness):
    backend, kver, package, request = "apt", aptroot.KVER, aptroot.EXTRA, aptroot.EXTRA
    unavailable_hint = "apt-get install ./"
    lock_error = "the dpkg lock stayed held for 2 s"
    env: dict = {}  # kmodguard's environment beside the root's paths

    def __init__(self, debs: aptroot.Debs, key: rpmbuild.TestKey, other_key: rpmbuild.TestKey, base_root: Path):
        self.debs, self.key, self.other_key, self.base_root = debs, key, other_key, base_root

    def machine(self, tmp, kmodguard):
        root = aptroot.copy_root(self.base_root, tmp / "root")
        repo = aptroot.make_repo(tmp / "repo", self.key)
        env = {**aptroot.root_env(root, tmp), **self.env}
        m = Machine(_kmodguard(kmodguard, env, tmp, self.backend), root, self, tmp)
        m.repo = repo
        self.publish(m)
        aptroot.write_sources(root, repo)
        self.refresh_metadata(m)
        m.kmg("index", "build", "--kver", self.kver, "--package", self.package, "--version", aptroot.VERSION,
              "--from-dir", str(self.debs.extra_payload), check_code=0)
        return m

    def installed(self, root):
        return aptroot.dpkg_installed(root)

    def publish(self, m, *, target=True):
        m.repo.publish([self.debs.modules, *([self.debs.extra] if target else [])])

    def refresh_metadata(self, m):
        aptroot.apt_get(m.root, "-q", "update")

    def refuse_signatures(self, m):
        m.repo.publish([self.debs.modules, self.debs.extra], sign_with=self.other_key)
        for f in (m.root / "var/lib/apt/lists").glob("*_*"):  # as on a fresh image: nothing trusted yet
            f.unlink()

    @contextlib.contextmanager
    def lock(self, m):
        with _lockf(m.root / "var/lib/dpkg/lock-frontend"):
            yield

    def hang(self, m, url):
        (m.root / "etc/apt/sources.list").write_text(f"deb [signed-by={m.repo.key_file}] {url} ./\n")


# --- PackageKit --------------------------------------------------------------------------------

class PackageKitHarness(AptHarness):
    """The real packagekitd (apt backend) and polkitd (packagekitd.py) on the apt harness's root and
    repository: kmodguard talks D-Bus to packagekitd, which runs apt and dpkg on the root."""

    backend = "packagekit"
    unavailable_hint = "local package file"
    lock_error = "PackageKit waited 2 s for the package manager lock"

    def __init__(self, bus: packagekitd.SystemBus, *args):
        super().__init__(*args)
        self.bus, self.env = bus, bus.env

    def machine(self, tmp, kmodguard):
        m = super().machine(tmp, kmodguard)
        m.packagekitd = packagekitd.PackageKitd(self.bus, m.root).start()
        return m


# --- dnf 4 -----------------------------------------------------------------------------------

class DnfHarness(Harness):
    backend, kver, package = "dnf", rpmbuild.KVER, "kernel-modules"
    request = f"kernel-modules-uname-r = {rpmbuild.KVER}"
    unavailable_hint = "dnf install ./"
    lock_error = "stayed locked for 2 s"

    def __init__(self, repo, base_root: Path, unsigned: rpmbuild.KernelRpms):
        self.repo_dir, self.rpms, self.key = repo
        self.base_root, self.unsigned = base_root, unsigned

    def _write_config(self, m, baseurl: str) -> None:
        # metadata kept until refreshed (dnf's default expiry is 48 h): "stale" is then real
        d = m.root / "etc/yum.repos.d"
        d.mkdir(parents=True, exist_ok=True)
        (d / "kmg.repo").write_text(f"[kmg]\nname=kmg test repository\nbaseurl={baseurl}\nenabled=1\ngpgcheck=1\n"
                                    f"gpgkey=file://{self.key.public}\nmetadata_expire=-1\n")

    def machine(self, tmp, kmodguard):
        root = dnfimage.copy_image(self.base_root, tmp / "root")
        m = Machine(_kmodguard(kmodguard, dnfimage.image_env(root, tmp), tmp, "dnf"), root, self, tmp)
        m.repo = tmp / "repo"
        m.repo.mkdir()
        self.publish(m)
        self._write_config(m, f"file://{m.repo}")
        self.refresh_metadata(m)
        m.kmg("index", "build", "--from-rpm", str(self.rpms[self.kver]["kernel-modules"]), check_code=0)
        return m

    def installed(self, root):
        return rpm_installed(root)

    def _fill(self, repo: Path, files) -> None:
        for old in repo.glob("*.rpm"):
            old.unlink()
        for f in files:
            shutil.copyfile(f, repo / Path(f).name)
        shutil.rmtree(repo / "repodata", ignore_errors=True)
        rpmbuild.createrepo(repo)

    def publish(self, m, *, target=True):
        self._fill(m.repo, [f for f in self.repo_dir.glob("*.rpm")
                            if target or not Path(f).name.startswith(f"kernel-modules-{self.kver.split('-')[0]}-")])

    def refresh_metadata(self, m):
        res = dnfimage.dnf(m.root, "makecache")
        assert res.returncode == 0, res.stdout + res.stderr

    def refuse_signatures(self, m):
        self._fill(m.repo, [*self.unsigned.rpms.values(), *self.repo_dir.glob("kmg-*.rpm")])
        self.refresh_metadata(m)

    @contextlib.contextmanager
    def lock(self, m):
        lock = m.root / "root/.rpmdb/.rpm.lock" if (m.root / "root/.rpmdb").is_dir() else m.root / "var/lib/rpm/.rpm.lock"
        with _lockf(lock):
            yield

    def hang(self, m, url):
        self._write_config(m, url)
        shutil.rmtree(m.root / "var/cache/dnf", ignore_errors=True)


# --- zypper ----------------------------------------------------------------------------------

class ZypperHarness(Harness):
    backend, kver, package, request = "zypper", zypperroot.KVER, "kernel-default", zypperroot.REQUEST
    unavailable_hint = "zypper install ./"
    replaces = ("kernel-default-base",)  # of the same version: kernel-default is its superset
    lock_error = "stayed held for 2 s"

    def __init__(self, packages: zypperroot.SusePackages, key: rpmbuild.TestKey, other_key: rpmbuild.TestKey,
                 base_root: Path):
        self.pkgs, self.key, self.other_key, self.base_root = packages, key, other_key, base_root

    def machine(self, tmp, kmodguard):
        root = tmp / "root"
        subprocess.run(["cp", "-a", str(self.base_root), str(root)], check=True)
        m = Machine(_kmodguard(kmodguard, zypperroot.root_env(root, tmp), tmp, "zypper"), root, self, tmp)
        m.repo = tmp / "repo"
        self.publish(m)
        zypperroot.write_repo(root, f"file://{m.repo}", self.key)
        self.refresh_metadata(m)
        m.kmg("index", "build", "--kver", self.kver, "--package", "kernel-default", "--version", zypperroot.EVR,
              "--request", self.request, "--from-dir", str(self.pkgs.default_payload), check_code=0)
        return m

    def installed(self, root):
        return rpm_installed(root)

    def publish(self, m, *, target=True):
        rpms = [self.pkgs.base, *([self.pkgs.default, self.pkgs.extra] if target else [])]
        zypperroot.publish(m.repo, rpms, self.key)

    def refresh_metadata(self, m):
        zypperroot.zypper(m.root, "refresh")

    def refuse_signatures(self, m):
        zypperroot.publish(m.repo, [self.pkgs.base, self.pkgs.default], self.other_key)
        shutil.rmtree(m.root / "var/cache/zypp", ignore_errors=True)  # as on a fresh image

    @contextlib.contextmanager
    def lock(self, m):
        (m.root / "run").mkdir(exist_ok=True)
        with open(m.root / "run/zypp.pid", "w+") as f:  # what a running zypper holds: its pid, locked
            f.write(f"{os.getpid()}\n")
            f.flush()
            fcntl.lockf(f, fcntl.LOCK_EX)
            yield

    def hang(self, m, url):
        zypperroot.write_repo(m.root, url, self.key)
        shutil.rmtree(m.root / "var/cache/zypp", ignore_errors=True)


def rpm_installed(root: Path) -> list[str]:
    """NAME=VERSION-RELEASE of every package in the root's rpm database."""
    res = subprocess.run(["rpm", "--root", str(root), "-qa", "--qf", "%{NAME}=%{VERSION}-%{RELEASE}\n"],
                         capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"})
    return sorted(res.stdout.split())
