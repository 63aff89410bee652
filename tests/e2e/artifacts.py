"""Build, once, everything the end-to-end guest needs from Debian's real kernel package, and cache it.

What is built (under ${KMODGUARD_TEST_CACHE:-/var/cache/kmodguard-tests}/e2e/build-KEY/):

  repo-trim/, repo-full/   createrepo_c repositories of signed, uncompressed-payload RPMs, split
                           the Fedora way (tests/data/fedora-split): kernel (meta), kernel-core,
                           kernel-modules-core, kernel-modules, kernel-modules-extra, plus
                           kmg-busybox-sh and kmg-e2e-release. repo-full has the whole kernel-modules
                           (2,002 modules); repo-trim has a TRIMMED kernel-modules (the scenarios'
                           drivers with their dependencies, plus every TRIM_EVERY-th other module),
                           which installs in seconds rather than minutes under TCG.
  payload/NAME/            the extracted payloads of kernel-modules-{trim,full} and -extra (hard links
                           into the cached tree), from which each run indexes with `kmodguard index build`
  layer/                   the guest's own files, laid over the host's root as the top overlay layer:
                           kernel-core + kernel-modules-core installed with the real rpm (signatures
                           checked against the imported test key; scriptlets replaced by depmod and a
                           dracut image, as an image builder does), an rpm database at DBPATH,
                           /etc/rpm/macros.kmodguard-e2e naming that DBPATH, a .repo file, dracut's
                           configuration and /boot/initramfs-KVER.img
  repo-upgrade/            repo-trim plus kernel B (the newer kernel the archive serves): its kernel,
                           kernel-core, kernel-modules-core and trimmed kernel-modules, for the
                           systemd guest's kernel upgrade scenarios
  initrd/KVER/             for each kernel, the modules the e2e boot initramfs loads (9p, overlay,
                           virtio-blk, ext4) in modprobe's order (modules.list)
  manifest.json            what was built; written last: a build directory without it is incomplete

The directory name carries a hash of the inputs (the tree, the split table, this file, tests/helpers/rpmbuild.py
and tests/helpers/realtree.py), so a second run reuses it and a change rebuilds it. Building happens in a
temporary directory renamed into place when complete, under a lock, so a killed run never leaves half
a cache and two sessions never build at once. Older builds are removed after a successful build.

The version trap: Debian's kernel release 6.1.0-56-amd64 holds two '-', which an RPM version cannot.
The packages therefore provide `kernel-modules-uname-r = 6.1.0-56.amd64` (rpm_uname(): the last '-'
becomes '.'; RPM Version 6.1.0, Release 56), while every path and scriptlet uses the real
6.1.0-56-amd64 (/lib/modules/6.1.0-56-amd64, `depmod -a 6.1.0-56-amd64`, `dracut -f --kver ...`).
tests/helpers/rpmbuild.py ties both to one string, so e2e_spec() wraps its spec_text() and rewrites the
paths (see there).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for p in (str(TESTS / "helpers"), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import realtree
import rpmbuild

BUILD_FORMAT = 2  # bump to force a rebuild when the layout changes in a way the hash does not see

# The drivers the scenarios (and tests/e2e/README.md's examples) need from kernel-modules; the
# trimmed package carries them, their dependencies, and every TRIM_EVERY-th other module.
SCENARIO_MODULES = ("snd_hda_intel", "megaraid_sas", "sym53c8xx", "mptsas", "tulip", "snd_ens1370",
                    "snd_intel8x0", "sdhci_pci", "lpc_ich")
TRIM_EVERY = 4
TRIM_MAX_BYTES = 100_000  # an "other" module is taken only if it brings at most this much with it
# what the boot initramfs loads: the 9p shares, the overlay, and the systemd guest's persistent disk
INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_blk", "ext4")
# accelerated variants for CPU features QEMU's TCG CPU lacks (SSE4.2, PCLMUL): insmod fails, the
# generic module serves
CPU_SPECIFIC = ("crc32c-intel.ko", "crc32-pclmul.ko", "crct10dif-pclmul.ko", "ghash-clmulni-intel.ko")

UNCOMPRESSED = "w.ufdio"  # rpm's _binary_payload for no compression: the fastest to build and install
DBPATH = "/usr/lib/sysimage/rpm"  # Fedora's; Debian's rpm defaults to ~/.rpmdb (see README)
GUEST_REPO = "/run/e2e/repo"  # where the guest mounts the repository share (read-only)
KEY_NAME = "RPM-GPG-KEY-kmodguard-test"
RELEASEVER = "42"  # dnf finds $releasever through kmg-e2e-release's system-release(releasever)
SCRIPTLET_LOG = "/var/log/kmg-scriptlets.log"  # every scriptlet appends a line (rpmbuild.Scripts.log)
SCRIPTS = rpmbuild.Scripts(log=SCRIPTLET_LOG)  # Fedora's scriptlets: real depmod, real dracut

# dracut in the guest (the packages' %posttrans and kmodguard) and for the first image on the host:
# dracut's "base" module only, no compression, not host-only, so that a rebuild under TCG takes
# tens of seconds, not minutes. Drivers come from add_drivers (kmodguard's drop-in).
DRACUT_CONF = """\
# kmodguard e2e: small, fast, real dracut images (the guest runs under TCG)
hostonly="no"
dracutmodules=" base "
compress="cat"
early_microcode="no"
"""


def boot_image(kver: str) -> str:
    """The guest's initramfs, named as the guest's dracut (Debian's 059) names its default output,
    /boot/initrd.img-KVER (Fedora's dracut: /boot/initramfs-KVER.img), so that the kernel-modules
    %posttrans `dracut -f --kver KVER` and kmodguard (initramfs.image_path() falls back to
    initrd.img-KVER when there is no initramfs-KVER.img) work on the same file."""
    return f"/boot/initrd.img-{kver}"


def log(msg: str) -> None:
    print(f"e2e-build: {msg}", file=sys.stderr, flush=True)


def rpm_uname(kver: str) -> str:
    """Debian's '6.1.0-56-amd64' -> '6.1.0-56.amd64': a legal RPM EVR (VERSION-RELEASE)."""
    head, sep, tail = kver.rpartition("-")
    if not sep or "-" not in head:
        raise ValueError(f"{kver!r} is not a Debian kernel release VERSION-ABI-FLAVOUR")
    return f"{head}.{tail}"


def cache_root() -> Path:
    return realtree.cache_dir() / "e2e"


@dataclass(frozen=True)
class Build:
    root: Path
    manifest: dict

    @property
    def kver(self) -> str:
        return self.manifest["kver"]

    @property
    def rpm_uname(self) -> str:
        return self.manifest["rpm_uname"]

    @property
    def layer(self) -> Path:
        return self.root / "layer"

    @property
    def vmlinuz(self) -> Path:
        return Path(self.manifest["vmlinuz"])

    @property
    def modules_dir(self) -> Path:
        """The guest's installed module tree (kernel-core + kernel-modules-core), depmod'ed."""
        return self.layer / "lib" / "modules" / self.kver

    def repo(self, full: bool) -> Path:
        return self.root / ("repo-full" if full else "repo-trim")

    def payload(self, name: str) -> Path:
        """kernel-modules-full, kernel-modules-trim or kernel-modules-extra."""
        return self.root / "payload" / name

    def request(self, package: str) -> str:
        return f"{package}-uname-r = {self.rpm_uname}"

    @property
    def upgrade_kver(self) -> str:
        """Kernel B: the newer kernel, in repo-upgrade only (the guest boots kernel A, self.kver)."""
        return self.manifest["upgrade"]["kver"]

    @property
    def upgrade_repo(self) -> Path:
        return self.root / "repo-upgrade"

    def vmlinuz_of(self, kver: str) -> Path:
        return Path(self.manifest["vmlinuz"] if kver == self.kver else self.manifest["upgrade"]["vmlinuz"])

    def initrd_modules(self, kver: str) -> Path:
        """initrd/KVER/: the boot initramfs's module files and modules.list (their load order)."""
        return self.root / "initrd" / kver


# --- the cache ---------------------------------------------------------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def boot_tree() -> realtree.Tree:
    """The kernel the guest boots: the older of the two the archive serves (realtree.ensure_kernels),
    so that the current one is a real upgrade with a higher version."""
    return realtree.ensure_kernels()[1]


def upgrade_tree() -> realtree.Tree:
    """Kernel B of the upgrade scenarios: the current one the archive serves."""
    return realtree.ensure_kernels()[0]


def cache_key(tree: realtree.Tree, upgrade: realtree.Tree) -> str:
    h = hashlib.sha256()
    parts = [f"format={BUILD_FORMAT}", f"arch={platform.machine()}"]
    for t in (tree, upgrade):
        parts += [f"kver={t.kver}", f"package={t.package}", f"version={t.version}"]
        for f in (t.mdir / "modules.order", t.root / "boot" / f"vmlinuz-{t.kver}"):
            st = f.stat()
            parts.append(f"{f.name}={st.st_size}:{st.st_mtime_ns}")
    for f in (Path(__file__), TESTS / "helpers" / "rpmbuild.py", TESTS / "helpers" / "realtree.py", realtree.SPLIT_TABLE):
        parts.append(f"{f.name}={_sha(f)}")
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(final: Path) -> Build | None:
    try:
        return Build(final, json.loads((final / "manifest.json").read_text()))
    except (OSError, ValueError):
        return None


def ensure_build() -> Build:
    """The cached build for the current inputs; built (a few minutes, once) when missing."""
    tree, upgrade = boot_tree(), upgrade_tree()
    root = cache_root()
    final = root / f"build-{cache_key(tree, upgrade)}"
    found = _load(final)
    if found:
        return found
    with _locked(root):
        found = _load(final)  # another session built it while we waited
        if found:
            return found
        for stale in root.glob(".tmp-build-*"):  # a killed run's leftovers (only touched under the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)  # no manifest: not ours to trust
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-build-", dir=root))
        try:
            t0 = time.monotonic()
            log(f"building the e2e kernel packages and guest layer for {tree.kver} in {final} (once)")
            _build(tree, upgrade, tmp, final)
            tmp.chmod(0o755)
            os.rename(tmp, final)
            log(f"built in {time.monotonic() - t0:.0f} s")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in root.glob("build-*"):  # keep only the current build
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    built = _load(final)
    assert built is not None
    return built


# --- building ------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "LC_ALL": "C", **kw.pop("env", {})}, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _link(src: Path, dest: Path) -> None:
    """A hard link into the cached tree (same file system: no copy), a copy otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _payload(root: Path, tree: realtree.Tree, rels: list[str]) -> Path:
    for rel in rels:
        _link(tree.mdir / rel, root / "lib" / "modules" / tree.kver / rel)
    (root / "lib" / "modules" / tree.kver).mkdir(parents=True, exist_ok=True)
    return root


def _full_depmod(tree: realtree.Tree, work: Path, rels: list[str]) -> Path:
    """depmod over the whole tree (a symlink farm): modules.dep for the trimming, aliases for the
    kernel-modules-extra blacklist."""
    mdir = realtree._farm(work / "full", tree.mdir, tree.kver, rels)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copyfile(tree.mdir / f, mdir / f)
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    realtree._wait(realtree._depmod(work / "full", tree.kver, empty), "the whole tree")
    return mdir


def _dependencies(mdir: Path) -> dict[str, list[str]]:
    deps = {}
    for line in (mdir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    return deps


def trim_selection(assigned: dict[str, str], deps: dict[str, list[str]],
                   size: Callable[[str], int]) -> tuple[list[str], list[str]]:
    """The trimmed kernel-modules: (module files, the scenario modules found). Every module of the
    package whose dependencies stay within kernel-modules + kernel-modules-core is a candidate;
    the scenario modules and every TRIM_EVERY-th other one are taken, with their dependencies
    (the others only when they bring at most TRIM_MAX_BYTES: the package stays small)."""
    modules = sorted(rel for rel, pkg in assigned.items() if pkg == realtree.MODULES)
    by_name = {realtree.module_name(rel): rel for rel in modules}
    missing = [m for m in SCENARIO_MODULES if m not in by_name]
    if missing:
        raise RuntimeError(f"the scenario modules {missing} are not in kernel-modules of this tree")

    def closure(rel: str, seen: set[str], limit: int | None = None) -> bool:
        """Add rel and its kernel-modules dependencies to seen; False (nothing added) if one lies
        elsewhere or they weigh more than limit."""
        todo, mine = [rel], set()
        while todo:
            r = todo.pop()
            if r in mine:
                continue
            pkg = assigned.get(r)
            if pkg == realtree.CORE:
                continue
            if pkg != realtree.MODULES:
                return False
            mine.add(r)
            todo.extend(deps.get(r, []))
        if limit is not None and sum(size(r) for r in mine - seen) > limit:
            return False
        seen |= mine
        return True

    chosen: set[str] = set()
    for name in SCENARIO_MODULES:
        if not closure(by_name[name], chosen):
            raise RuntimeError(f"{name} depends on a module outside kernel-modules(-core)")
    for i, rel in enumerate(modules):
        if i % TRIM_EVERY == 0:
            closure(rel, chosen, TRIM_MAX_BYTES)
    return sorted(chosen), list(SCENARIO_MODULES)


def _extra_blacklist(conf: Path, extra_rels: list[str], aliases: list[tuple[str, str]]) -> list[str]:
    """kernel-modules-extra's modprobe.d blacklist, as Fedora's mod-blacklist.sh writes it (the
    same rule as tests/helpers/realtree.build_world: every module with a net- alias, and floppy)."""
    files = {realtree.module_name(rel): rel for rel in extra_rels}
    names = {m for pattern, m in aliases if m in files and pattern.startswith("net-")}
    if "floppy" in files:
        names.add("floppy")
    conf.mkdir(parents=True, exist_ok=True)
    for m in sorted(names):
        base = os.path.basename(files[m]).split(".ko")[0]
        (conf / f"{base}-blacklist.conf").write_text(realtree.BLACKLIST_TEXT.format(name=base))
    return sorted(names)


def e2e_spec(kver: str, payloads: dict[str, Path], note: str) -> str:
    """rpmbuild.spec_text() for a Debian kernel release.

    spec_text() uses one kernel version string both in the *-uname-r provides and in the paths and
    scriptlets. Debian's release cannot be an RPM version, so the spec is made for rpm_uname(kver)
    and then every line except Provides:/Requires: gets the real release back (/lib/modules/KVER,
    `depmod -a KVER`, `dracut -f --kver KVER`, the kernel-install call). spec_text() finds the
    kmod(NAME.ko) provides and the %dir lines under /lib/modules/KVER by the version it is given,
    so those are made here again with the real release. (A `path_kver` parameter of spec_text
    would make this wrapper unnecessary.)"""
    uname = rpm_uname(kver)
    text = rpmbuild.spec_text(uname, payloads, SCRIPTS, summary_note=note)
    head, sep, _ = text.partition("\n%files\n")
    assert sep, "spec_text's layout changed: no %files section"
    out = []
    for line in head.splitlines():
        if line.startswith(("Provides:", "Requires:")):
            out.append(line)
            continue
        out.append(line.replace(uname, kver))
        if line.startswith("%package -n "):
            name = line.split()[-1]
            if payloads.get(name) is not None:
                out += [f"Provides: {p}" for p in rpmbuild.kmod_provides(payloads[name], kver)]
    out += ["%files", ""]
    wanted = ["kernel-core", *(n for n in rpmbuild.SUBPACKAGES[1:] if n in payloads)]
    for name in wanted:
        out.append(f"%files -n {name}")
        out += rpmbuild._files_section(payloads.get(name), kver, own_kver_dir=(name == "kernel-core"))
        out.append("")
    return "\n".join(out) + "\n"


def _rpmbuild(spec_text: str, name: str, outdir: Path, work: Path) -> dict[str, Path]:
    specdir = work / "specs"
    specdir.mkdir(parents=True, exist_ok=True)
    spec = specdir / f"{name}.spec"
    spec.write_text(spec_text)
    files = rpmbuild.rpmbuild(spec, outdir, UNCOMPRESSED, target=platform.machine())
    return {f.name.rsplit("-", 2)[0]: f for f in files}


def _rpm_base() -> list[str]:
    """Debian's rpm refuses -i without --force-debian (it would bypass dpkg); here that is the point."""
    help_text = subprocess.run(["rpm", "--help"], capture_output=True, text=True, check=False).stdout
    return ["rpm", "--force-debian"] if "--force-debian" in help_text else ["rpm"]


def _build_layer(layer: Path, kver: str, rpms: dict[str, Path], key: Path, work: Path) -> None:
    """The guest's own files (see the module docstring)."""
    layer.mkdir()
    # The layer is an overlay layer above the host's root: mirror its merged-/usr symlinks, or a
    # directory /lib here would hide the host's whole /lib.
    for top in ("lib", "lib64", "bin", "sbin"):
        host = Path("/") / top
        if host.is_symlink():
            os.symlink(os.readlink(host), layer / top)
    (layer / "usr" / "lib").mkdir(parents=True)
    macros = layer / "etc" / "rpm" / "macros.kmodguard-e2e"
    macros.parent.mkdir(parents=True)
    macros.write_text("# kmodguard e2e: the guest's rpm database lives where Fedora keeps it\n"
                      f"%_dbpath {DBPATH}\n")
    root = ["--root", str(layer), "--dbpath", DBPATH]
    _run(["rpmkeys", *root, "--import", str(key)])
    rpm = _rpm_base()
    # /bin/sh for the scriptlets' requirements, recorded only: the host's /bin/sh stays
    _run([*rpm, *root, "-i", "--justdb", "--noscripts", "--notriggers", str(rpms["kmg-busybox-sh"])])
    # the cloud image's kernel: real files, signatures checked; the scriptlets' work is done below
    _run([*rpm, *root, "-i", "--noscripts", "--notriggers", str(rpms["kernel-core"]),
          str(rpms["kernel-modules-core"]), str(rpms["kmg-e2e-release"])])
    verify = _run([*rpm, *root, "-qa", "--qf", "%{NAME} %{SIGPGP:pgpsig}\n"]).stdout
    if "kernel-modules-core" not in verify:
        raise RuntimeError(f"kernel-modules-core is not in the layer's rpm database:\n{verify}")
    _run(["depmod", "-b", str(layer), kver])
    repo_conf = layer / "etc" / "yum.repos.d" / "kmodguard-e2e.repo"
    repo_conf.parent.mkdir(parents=True)
    repo_conf.write_text(f"[kmodguard-e2e]\nname=kmodguard e2e: Fedora-split packages of Debian's kernel {kver}\n"
                         f"baseurl=file://{GUEST_REPO}\nenabled=1\ngpgcheck=1\nrepo_gpgcheck=0\n"
                         f"gpgkey=file://{GUEST_REPO}/{KEY_NAME}\nmetadata_expire=0\n")
    conf_d = layer / "etc" / "dracut.conf.d"
    conf_d.mkdir(parents=True)
    (conf_d / "50-kmodguard-e2e.conf").write_text(DRACUT_CONF)
    # The image the cloud image booted with: real dracut, the guest's configuration, its modules.
    boot = layer / "boot"
    boot.mkdir()
    tmp = work / "dracut-tmp"
    tmp.mkdir()
    _run(["dracut", "--quiet", "--conf", "/dev/null", "--confdir", str(conf_d), "--tmpdir", str(tmp),
          "--kver", kver, "-k", str(layer / "lib" / "modules" / kver), "--force",
          str(layer / boot_image(kver).lstrip("/"))], timeout=600)


def image_modules(image: Path) -> list[str]:
    """Module names inside an initramfs, from lsinitrd's listing."""
    out = _run(["lsinitrd", str(image)], timeout=300).stdout
    found = set()
    for line in out.splitlines():
        path = line.split(" -> ")[0].rstrip().split()[-1] if line.strip() else ""
        base = os.path.basename(path)
        for sfx in realtree.MODULE_SUFFIXES:
            if base.endswith(sfx):
                found.add(realtree.module_name(base))
    return sorted(found)


@dataclass
class _Kernel:
    """One kernel's pieces on the way to its RPMs."""
    tree: realtree.Tree
    by_pkg: dict[str, list[str]]
    full_mdir: Path  # depmod'ed symlink farm of the whole tree
    trim: list[str]
    core_payload: Path
    payloads: dict[str, Path]


def _prepare_kernel(tree: realtree.Tree, work: Path, pay: Path) -> _Kernel:
    """The Fedora split of one kernel (by path), its whole-tree depmod, the trimmed kernel-modules
    and the payload directories (hard links into the cached tree)."""
    kver = tree.kver
    assigned = realtree.assign(tree)
    by_pkg: dict[str, list[str]] = {}
    for rel, pkg in sorted(assigned.items()):
        by_pkg.setdefault(pkg, []).append(rel)
    full_mdir = _full_depmod(tree, work, sorted(assigned))
    trim, _ = trim_selection(assigned, _dependencies(full_mdir), lambda rel: (tree.mdir / rel).stat().st_size)
    core_payload = pay / "kernel-core"
    cdir = core_payload / "lib" / "modules" / kver
    cdir.mkdir(parents=True)
    _link(tree.root / "boot" / f"vmlinuz-{kver}", cdir / "vmlinuz")
    _link(tree.root / "boot" / f"System.map-{kver}", cdir / "System.map")
    _link(tree.root / "boot" / f"config-{kver}", cdir / "config")
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        _link(tree.mdir / f, cdir / f)
    payloads = {
        "kernel-modules-core": _payload(pay / "kernel-modules-core", tree, by_pkg[realtree.CORE]),
        "kernel-modules-full": _payload(pay / "kernel-modules-full", tree, by_pkg[realtree.MODULES]),
        "kernel-modules-trim": _payload(pay / "kernel-modules-trim", tree, trim),
        "kernel-modules-extra": _payload(pay / "kernel-modules-extra", tree, by_pkg[realtree.EXTRA]),
    }
    return _Kernel(tree, by_pkg, full_mdir, trim, core_payload, payloads)


def _initrd_modules(k: _Kernel, dest: Path) -> list[str]:
    """The boot initramfs's modules for kernel k, in the order modprobe would load them."""
    farm = k.full_mdir.parent.parent.parent  # ROOT of ROOT/lib/modules/KVER
    show = _run(["modprobe", "-d", str(farm), "-S", k.tree.kver, "--show-depends", "-a", *INITRD_MODULES]).stdout
    dest.mkdir(parents=True)
    names: list[str] = []
    for line in show.splitlines():
        parts = line.split()
        if parts[:1] == ["insmod"] and os.path.basename(parts[1]) not in (*names, *CPU_SPECIFIC):
            shutil.copyfile(parts[1], dest / os.path.basename(parts[1]))  # follows the farm's link
            names.append(os.path.basename(parts[1]))
    (dest / "modules.list").write_text("".join(f"{n}\n" for n in names))
    return names


def _fedora_ways(layer: Path) -> list[str]:
    """The waivers a Debian guest needs to run kmodguard's RPM as Fedora would (each named in
    tests/e2e/README.md): Debian's python3 and dnf look elsewhere, Debian has no default-disable
    preset, no dracut kernel-install plugin, and no en_US locale for cloud-init to set."""
    site = f"/usr/lib/python3.{sys.version_info.minor}/site-packages"
    files = {
        # Debian's python3 does not look in Fedora's site-packages, where the RPM puts kmodguard
        f"usr/lib/python3/dist-packages/kmg-e2e-fedora-sitelib.pth": f"{site}\n",
        # Fedora's 99-default-disable.preset: an RPM's %post `systemctl preset` enables nothing
        "usr/lib/systemd/system-preset/99-default-disable.preset": "disable *\n",
        # dracut's own kernel-install plugin, which Fedora's dracut ships and Debian's does not
        "usr/lib/kernel/install.d/50-dracut.install": DRACUT_INSTALL,
        # cloud-init's default locale (en_US.UTF-8) is not generated on the host
        "etc/cloud/cloud.cfg.d/90-kmg-e2e.cfg": "# kmodguard e2e: a locale the host has\nlocale: C.UTF-8\n",
    }
    # Debian's dnf loads plugins from its own directory only; the RPM's is Fedora's
    host_conf = Path("/etc/dnf/dnf.conf")
    conf = host_conf.read_text() if host_conf.is_file() else "[main]\n"
    files["etc/dnf/dnf.conf"] = (conf.rstrip("\n") + "\n# kmodguard e2e: Fedora's plugin directory too\n"
                                 f"pluginpath=/usr/lib/python3/dist-packages/dnf-plugins {site}/dnf-plugins\n")
    for rel, text in files.items():
        path = layer / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if rel.endswith(".install") else 0o644)
    return sorted("/" + rel for rel in files)


DRACUT_INSTALL = """#!/bin/sh
# kmodguard e2e: what Fedora's dracut kernel-install plugin (50-dracut.install) does, on Debian:
# the new kernel's initramfs, at the guest's image path (artifacts.boot_image)
[ "$1" = add ] || exit 0
exec dracut -f --kver "$2" "/boot/initrd.img-$2"
"""


def _build(tree: realtree.Tree, upgrade: realtree.Tree, out: Path, final: Path) -> None:
    timings: dict[str, float] = {}
    t = time.monotonic()
    kver = tree.kver
    work = out / ".work"
    work.mkdir()
    pay = out / "payload"
    a = _prepare_kernel(tree, work / "a", pay)
    b = _prepare_kernel(upgrade, work / "b", work / "payload-b")
    by_pkg, core_payload, payloads = a.by_pkg, a.core_payload, a.payloads
    initrd = {k.tree.kver: _initrd_modules(k, out / "initrd" / k.tree.kver) for k in (a, b)}
    blacklisted = _extra_blacklist(payloads["kernel-modules-extra"] / "etc" / "modprobe.d", by_pkg[realtree.EXTRA],
                                   realtree.read_aliases(a.full_mdir))
    timings["payloads_s"] = time.monotonic() - t

    t = time.monotonic()
    gnupg = work / "gnupg"
    key = rpmbuild.make_test_key(gnupg)
    try:
        rpms_dir = work / "rpms"
        full_spec = e2e_spec(kver, {"kernel-core": core_payload,
                                    "kernel-modules-core": payloads["kernel-modules-core"],
                                    "kernel-modules": payloads["kernel-modules-full"],
                                    "kernel-modules-extra": payloads["kernel-modules-extra"]}, "kmodguard e2e")
        trim_spec = e2e_spec(kver, {"kernel-core": core_payload, "kernel-modules": payloads["kernel-modules-trim"]},
                             "kmodguard e2e, trimmed kernel-modules")
        b_spec = e2e_spec(upgrade.kver, {"kernel-core": b.core_payload,
                                         "kernel-modules-core": b.payloads["kernel-modules-core"],
                                         "kernel-modules": b.payloads["kernel-modules-trim"]},
                          "kmodguard e2e, kernel B of the upgrade, trimmed kernel-modules")
        with ThreadPoolExecutor(max_workers=2) as pool:  # rpmbuilds on two cores
            full_job = pool.submit(_rpmbuild, full_spec, "kernel-e2e-full", rpms_dir / "full", work)
            trim_job = pool.submit(_rpmbuild, trim_spec, "kernel-e2e-trim", rpms_dir / "trim", work)
            b_job = pool.submit(_rpmbuild, b_spec, "kernel-e2e-b", rpms_dir / "b", work)
            misc = work / "misc" / "rpms"
            shell = rpmbuild.shell_rpm(misc)
            release = rpmbuild.build_rpm(misc, "kmg-e2e-release", RELEASEVER, "1",
                                         provides=(f"system-release(releasever) = {RELEASEVER}",))
            full, trimmed, b_rpms = full_job.result(), trim_job.result(), b_job.result()
        timings["rpmbuild_s"] = time.monotonic() - t
        t = time.monotonic()
        common = {n: full[n] for n in ("kernel", "kernel-core", "kernel-modules-core", "kernel-modules-extra")}
        common["kmg-busybox-sh"], common["kmg-e2e-release"] = shell, release
        upgrade_rpms = [b_rpms[n] for n in ("kernel", "kernel-core", "kernel-modules-core", "kernel-modules")]
        rpmbuild.sign_rpms([*common.values(), full["kernel-modules"], trimmed["kernel-modules"], *upgrade_rpms], key)
        timings["sign_s"] = time.monotonic() - t
    finally:
        rpmbuild.stop_agent(key)
    public = out / KEY_NAME
    shutil.copyfile(key.public, public)
    fingerprint = key.fingerprint

    t = time.monotonic()
    repos = {"repo-full": [*common.values(), full["kernel-modules"]],
             "repo-trim": [*common.values(), trimmed["kernel-modules"]],
             "repo-upgrade": [*common.values(), trimmed["kernel-modules"], *upgrade_rpms]}
    for name, files in repos.items():
        repo = out / name
        repo.mkdir()
        for f in files:
            os.link(f, repo / f.name)
        shutil.copyfile(public, repo / KEY_NAME)
        rpmbuild.createrepo(repo)
    timings["createrepo_s"] = time.monotonic() - t

    t = time.monotonic()
    _build_layer(out / "layer", kver, common, public, work)
    waivers = _fedora_ways(out / "layer")
    timings["layer_s"] = time.monotonic() - t
    image = out / "layer" / boot_image(kver).lstrip("/")
    initial_modules = image_modules(image)

    shutil.rmtree(work)
    shutil.rmtree(core_payload.parent / "kernel-modules-core")  # it lives in the layer now
    shutil.rmtree(core_payload)
    manifest = {
        "format": BUILD_FORMAT,
        "kver": kver,
        "rpm_uname": rpm_uname(kver),
        "tree": str(tree.root),
        "vmlinuz": str(tree.root / "boot" / f"vmlinuz-{kver}"),
        "tree_version": tree.version,
        "upgrade": {"kver": upgrade.kver, "rpm_uname": rpm_uname(upgrade.kver), "tree": str(upgrade.root),
                    "vmlinuz": str(upgrade.root / "boot" / f"vmlinuz-{upgrade.kver}"),
                    "tree_version": upgrade.version, "rpms": sorted(f.name for f in upgrade_rpms),
                    "kernel-modules-trim": len(b.trim)},
        "initrd_modules": initrd,
        "waivers": waivers,
        "dbpath": DBPATH,
        "key_fingerprint": fingerprint,
        "modules": {"kernel-modules-core": len(by_pkg[realtree.CORE]),
                    "kernel-modules-full": len(by_pkg[realtree.MODULES]),
                    "kernel-modules-trim": len(a.trim),
                    "kernel-modules-extra": len(by_pkg[realtree.EXTRA])},
        "trim": {"every": TRIM_EVERY, "max_bytes": TRIM_MAX_BYTES},
        "scenario_modules": list(SCENARIO_MODULES),
        "extra_blacklist": blacklisted,
        "rpms": {name: sorted(p.name for p in (out / name).glob("*.rpm")) for name in repos},
        "rpm_sizes": {f"{name}/{f.name}": f.stat().st_size for name in ("repo-full", "repo-trim")
                      for f in sorted((out / name).glob("*.rpm"))},
        "initial_initramfs": {"path": boot_image(kver), "size": image.stat().st_size, "modules": initial_modules},
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "path": str(final),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":  # build (or find) the cache and print its manifest
    print(json.dumps(ensure_build().manifest, indent=1))
