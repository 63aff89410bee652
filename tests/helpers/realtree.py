"""Debian's real kernel packages, chosen at run time from what the archive serves, cached between
runs, and a Fedora-style split world built from them.

Used by tests/index/test_realtree.py, tests/e2e and bench/run.py. Two layers:

* `ensure_tree()` gives the extracted package of the kernel `linux-image-amd64` depends on today
  (the "current" kernel); `ensure_kernels()` gives that one and the newest older ABI the archive
  still serves (the "older" kernel: the e2e guest boots it, then upgrades to the current one).
  Nothing is pinned: Debian replaces its kernel ABI every few weeks. Each is cached by its exact
  package version in ${KMODGUARD_TEST_CACHE:-/var/cache/kmodguard-tests}: a missing tree is
  extracted from a cached .deb, or downloaded with `apt-get download` and extracted with
  `dpkg -x`. Downloads and extractions go to temporary names first and are renamed into place when
  complete, so a killed run never leaves a half tree behind. When apt cannot say what it serves
  (no package lists: an offline machine), the newest cached trees are used. When nothing can be
  had, RealTreeUnavailable says why and which command to run: tests fail on it, they never skip.

* `build_world(tree, base)` makes, under `base`, hard links to the cached modules (no copies):
    installed/   kernel-modules-core as an installed tree (depmod'ed, with the package's real
                 modules.builtin and modules.builtin.modinfo): what a cloud image carries
    payload/kernel-modules/, payload/kernel-modules-extra/
                 extracted-package payloads; extra also carries the blacklist files Fedora's
                 mod-blacklist.sh writes (floppy, and every module with a `net-` alias)
    oracle/      kernel-modules + kernel-modules-extra, depmod'ed: what modprobe answers from
    index/       both payloads indexed by `kmodguard index build --from-dir` (the real CLI)

The split (`assign`) is Fedora's, applied by path: tests/data/fedora-split was made from one
build (6.1.0-56); any other 6.1 build maps each module by its path under /lib/modules/KVER, and a
path the table does not know goes to kernel-modules, as Fedora's rules put unlisted drivers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
SPLIT_TABLE = DATA / "fedora-split" / "split-debian-6.1.0-56-amd64.tsv"
TABLE_KVER = "6.1.0-56-amd64"  # the build the split table was made from

META_PACKAGE = "linux-image-amd64"  # Debian's metapackage: depends on the current kernel ABI
# the generic amd64 flavour only: -cloud-amd64 lacks 9p and many test devices' drivers, -rt is not it
KERNEL_PACKAGE = re.compile(r"linux-image-((\d+\.\d+\.\d+)-(\d+)-amd64)")
NO_KERNEL_HINT = ("run 'apt-get update' (Debian 12's archive, bookworm and bookworm-security, must be in the "
                  "apt sources and reachable), or point KMODGUARD_TEST_CACHE at a cache that holds the trees")

CORE, MODULES, EXTRA, INTERNAL = ("kernel-modules-core", "kernel-modules", "kernel-modules-extra",
                                  "kernel-modules-internal")
INDEXED = (MODULES, EXTRA)  # the packages a cloud image does not carry, indexed by kmodguard
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
MODALIAS = re.compile(r"[a-z0-9_]+:[!-~]*")  # what `kmodguard explain` accepts: bus ':' printable ASCII

# Fedora's mod-blacklist.sh writes this text into /etc/modprobe.d/NAME-blacklist.conf
BLACKLIST_TEXT = """\
# This kernel module can be automatically loaded by non-root users. To
# enhance system security, the module is blacklisted by default to ensure
# system administrators make the module available for use as needed.
# See https://access.redhat.com/articles/3760101 for more details.
#
# Remove the blacklist by adding a comment # at the start of the line.
blacklist {name}
"""


class RealTreeUnavailable(RuntimeError):
    """Debian's kernel package can neither be found in the cache nor downloaded."""


def _log(msg: str) -> None:
    print(f"realtree: {msg}", file=sys.stderr, flush=True)


def _tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if not found:
        raise RealTreeUnavailable(f"'{name}' is not installed (tools/setup --test installs it)")
    return found


# --- which kernels the archive serves ------------------------------------------------------

@dataclass(frozen=True, order=True)
class KernelPackage:
    """One of Debian's kernel packages: linux-image-KVER at its exact package version."""

    abi: int  # 57 of 6.1.0-57-amd64 (first: packages sort by it)
    kver: str  # 6.1.0-57-amd64, the kernel release (uname -r)
    version: str  # 6.1.192-3, the Debian package version

    @property
    def name(self) -> str:
        return f"linux-image-{self.kver}"

    @property
    def series(self) -> str:
        return KERNEL_PACKAGE.fullmatch(self.name).group(2)


def _apt_cache(*args: str) -> str:
    apt_cache = shutil.which("apt-cache")
    if not apt_cache:
        raise RealTreeUnavailable("apt-cache is not installed: cannot ask which kernel packages the archive serves")
    proc = _run([apt_cache, *args], timeout=300)
    if proc.returncode != 0:
        raise RealTreeUnavailable(f"apt-cache {' '.join(args)} failed (exit {proc.returncode}): "
                                  f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc.stdout


def _candidates(names: list[str]) -> dict[str, str]:
    """{package: its candidate version} of those apt would install now (pins respected)."""
    out, name = {}, None
    for line in _apt_cache("policy", *names).splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            name = line[:-1]
        elif line.strip().startswith("Candidate:") and name:
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                out[name] = version
    return out


def served_kernels() -> tuple[KernelPackage, KernelPackage | None]:
    """(current, older): the kernel linux-image-amd64 depends on now, and the newest older ABI of
    the same series the archive still serves (None when it serves only one)."""
    depends = re.findall(r"Depends:\s*(linux-image-\S+)", _apt_cache("depends", META_PACKAGE))
    current_name = next((n for n in depends if KERNEL_PACKAGE.fullmatch(n)), None)
    if current_name is None:
        raise RealTreeUnavailable(f"'apt-cache depends {META_PACKAGE}' names no linux-image-*-amd64 package; "
                                  f"{NO_KERNEL_HINT}")
    names = sorted({n for n in _apt_cache("pkgnames", "linux-image-").split() if KERNEL_PACKAGE.fullmatch(n)}
                   | {current_name})
    served = _candidates(names)
    if current_name not in served:
        raise RealTreeUnavailable(f"{current_name} (what {META_PACKAGE} depends on) has no candidate version in "
                                  f"apt's lists; {NO_KERNEL_HINT}")

    def package(name: str) -> KernelPackage:
        m = KERNEL_PACKAGE.fullmatch(name)
        return KernelPackage(int(m.group(3)), m.group(1), served[name])

    current = package(current_name)
    older = sorted((package(n) for n in served if n != current_name and KERNEL_PACKAGE.fullmatch(n)
                    and package(n).series == current.series and package(n).abi < current.abi), reverse=True)
    return current, (older[0] if older else None)


# --- the cached packages -------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("KMODGUARD_TEST_CACHE") or "/var/cache/kmodguard-tests").absolute()


@dataclass(frozen=True)
class Tree:
    root: Path  # the extracted package
    kver: str
    package: str  # linux-image-KVER
    version: str  # the Debian package version

    @property
    def mdir(self) -> Path:
        return modules_dir(self.root, self.kver)

    @property
    def is_table_build(self) -> bool:
        """The build tests/data/fedora-split was made from (its split is then exact)."""
        return self.kver == TABLE_KVER


def modules_dir(root: Path, kver: str) -> Path:
    for sub in ("lib/modules", "usr/lib/modules"):
        if (root / sub / kver).is_dir():
            return root / sub / kver
    return root / "lib/modules" / kver


def _tree_dir(cache: Path, kernel: KernelPackage) -> Path:
    return cache / f"tree-{kernel.kver}_{kernel.version}"


def _complete(root: Path, kver: str) -> bool:
    """Trees are renamed into place only when fully extracted; modules.order is the proof."""
    return (modules_dir(root, kver) / "modules.order").is_file()


def _cached_trees(cache: Path) -> list[Tree]:
    """Complete trees in the cache, newest ABI first."""
    found = []
    for root in cache.glob("tree-*_*"):
        kver, _, version = root.name.removeprefix("tree-").partition("_")
        m = KERNEL_PACKAGE.fullmatch(f"linux-image-{kver}")
        if m and _complete(root, kver):
            found.append((int(m.group(3)), Tree(root, kver, f"linux-image-{kver}", version)))
    return [t for _, t in sorted(found, key=lambda x: x[0], reverse=True)]


@contextlib.contextmanager
def _locked(cache: Path):
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RealTreeUnavailable(
            f"cannot use the test cache {cache}: {exc.strerror}; set KMODGUARD_TEST_CACHE to a writable "
            f"directory (it needs about 2 GB)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one session downloads; the others wait, then reuse
        yield
    finally:
        os.close(fd)


def _clean_stale(cache: Path) -> None:
    """Leftovers of a killed run (only ever touched under the lock)."""
    for p in (*cache.glob(".dl-*"), *cache.glob(".tree-*")):
        shutil.rmtree(p, ignore_errors=True)


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})


def _deb(cache: Path, kernel: KernelPackage) -> Path:
    """Debian's file name for the package: linux-image-KVER_VERSION_amd64.deb (':' of an epoch as %3a)."""
    return cache / f"{kernel.name}_{kernel.version.replace(':', '%3a')}_amd64.deb"


def _download(cache: Path, kernel: KernelPackage) -> Path:
    """apt-get download of the exact version into a temporary directory, renamed into the cache."""
    apt_get = shutil.which("apt-get")
    if not apt_get:
        raise RealTreeUnavailable("apt-get is not installed: cannot download Debian's kernel package")
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache))
    try:
        _log(f"downloading {kernel.name} {kernel.version} into {cache} (about 70 MB, once)")
        try:
            proc = _run([apt_get, "download", f"{kernel.name}={kernel.version}"], cwd=tmp)
        except subprocess.TimeoutExpired:
            raise RealTreeUnavailable(f"apt-get download {kernel.name} took longer than 30 minutes") from None
        debs = list(tmp.glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            raise RealTreeUnavailable(f"apt-get download {kernel.name}={kernel.version} failed (exit "
                                      f"{proc.returncode}): {(proc.stderr or proc.stdout).strip()[-600:]}; "
                                      f"{NO_KERNEL_HINT}")
        final = _deb(cache, kernel)
        os.rename(debs[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(cache: Path, deb: Path, kernel: KernelPackage) -> Tree:
    """dpkg -x into a temporary directory, then rename it into place: never a half tree."""
    dpkg = _tool("dpkg")
    tmp = Path(tempfile.mkdtemp(prefix=".tree-", dir=cache))
    try:
        _log(f"extracting {deb.name}")
        proc = _run([dpkg, "-x", str(deb), str(tmp)])
        if proc.returncode != 0 or not _complete(tmp, kernel.kver):
            raise RealTreeUnavailable(f"dpkg -x {deb} failed or holds no modules for {kernel.kver}: "
                                      f"{proc.stderr.strip()[-600:]}")
        tmp.chmod(0o755)  # mkdtemp made it 0700; the tree is read by unprivileged test processes too
        final = _tree_dir(cache, kernel)
        if final.exists():  # a broken leftover of someone else's making (ours are renamed whole)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Tree(final, kernel.kver, kernel.name, kernel.version)


def _obtain(cache: Path, kernel: KernelPackage) -> Tree:
    """The tree of one package version: cached, or from a cached .deb, or downloaded."""
    root = _tree_dir(cache, kernel)
    if _complete(root, kernel.kver):
        return Tree(root, kernel.kver, kernel.name, kernel.version)
    deb = _deb(cache, kernel)
    if deb.is_file():
        try:
            return _extract(cache, deb, kernel)
        except RealTreeUnavailable as exc:
            _log(f"{exc}; removing {deb.name} and downloading it again")
            deb.unlink(missing_ok=True)
    return _extract(cache, _download(cache, kernel), kernel)


def _prune(cache: Path, keep: list[Tree]) -> None:
    """Trees and .debs of kernels the archive no longer serves as current or older (under the lock)."""
    wanted = {t.root.name for t in keep} | {f"{t.package}_{t.version.replace(':', '%3a')}_amd64.deb" for t in keep}
    for p in (*cache.glob("tree-*"), *cache.glob("linux-image-*.deb"), cache / "tree"):
        if p.name not in wanted and p.exists():
            _log(f"removing {p.name}: no longer a kernel the tests use")
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


_RESOLVED: list[Tree] | None = None  # (current, older) of this process: the archive is asked once


def ensure_kernels() -> tuple[Tree, Tree]:
    """(current, older) real kernel trees, from the cache or downloaded once. Raises
    RealTreeUnavailable with the command to run when the archive serves no usable pair."""
    global _RESOLVED
    if _RESOLVED is not None:
        return _RESOLVED[0], _RESOLVED[1]
    cache = cache_dir()
    with _locked(cache):
        _clean_stale(cache)
        try:
            current, older = served_kernels()
        except RealTreeUnavailable as exc:
            cached = _cached_trees(cache)
            if len(cached) < 2:
                raise RealTreeUnavailable(f"{exc}\nand the cache {cache} holds {len(cached)} usable kernel "
                                          "tree(s), not the two the tests need") from None
            _log(f"{exc}; using the newest cached trees {cached[0].package} and {cached[1].package}")
            _RESOLVED = cached[:2]
            return _RESOLVED[0], _RESOLVED[1]
        if older is None:
            raise RealTreeUnavailable(f"the archive serves only one {current.series} kernel ABI ({current.name}); "
                                      "the upgrade scenarios need an older one too: " + NO_KERNEL_HINT)
        trees = [_obtain(cache, current), _obtain(cache, older)]
        _prune(cache, trees)
    _RESOLVED = trees
    return trees[0], trees[1]


def ensure_tree() -> Tree:
    """The current kernel's tree (what linux-image-amd64 depends on today)."""
    return ensure_kernels()[0]


# --- the split ---------------------------------------------------------------------------

def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for sfx in MODULE_SUFFIXES:
        if base.endswith(sfx):
            base = base[: -len(sfx)]
            break
    return base.replace("-", "_")


def split_table(path: Path = SPLIT_TABLE) -> dict[str, str]:
    """path of a module (relative to /lib/modules/KVER, as .ko) -> Fedora package."""
    table = {}
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert header[:4] == ["path", "module", "size_bytes", "package"], header
        for line in f:
            cols = line.rstrip("\n").split("\t")
            table[cols[0]] = cols[3]
    return table


def _module_files(mdir: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(mdir):
        dirnames.sort()
        for f in sorted(filenames):
            if f.endswith(MODULE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(dirpath, f), mdir))
    return found


def _as_ko(rel: str) -> str:
    for sfx in MODULE_SUFFIXES[1:]:
        if rel.endswith(sfx):
            return rel[: -len(sfx)] + ".ko"
    return rel


def assign(tree: Tree) -> dict[str, str]:
    """Each module file of the tree -> its package, by path; a path the table does not know goes to
    kernel-modules (Fedora's rules put every driver they do not list there)."""
    table = split_table()
    out = {rel: table.get(_as_ko(rel), MODULES) for rel in _module_files(tree.mdir)}
    if tree.is_table_build:
        absent = sorted(set(table) - {_as_ko(rel) for rel in out})
        if absent:
            raise RealTreeUnavailable(
                f"the cached tree {tree.root} lacks {len(absent)} modules of {tree.package} "
                f"(first: {absent[0]}): it is damaged; remove it and run again")
    return out


def unknown_paths(tree: Tree) -> list[str]:
    """The module files of the tree that the split table does not name (they went to kernel-modules)."""
    table = split_table()
    return [rel for rel in _module_files(tree.mdir) if _as_ko(rel) not in table]


# --- concretising aliases (test input, not matching) --------------------------------------

def concretise(pattern: str, star: str = "0") -> str:
    """One concrete string that the fnmatch pattern matches: '*' -> star, '?' -> '0', [set] -> a member."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append(star)
        elif c == "?":
            out.append("0")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(pattern[i])
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] in "!^"
            if negate:
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:  # no closing bracket: fnmatch takes '[' literally
                out.append(c)
            else:
                body = pattern[i + 1 + negate: j]
                members = []
                k = 0
                while k < len(body):
                    if k + 2 < len(body) and body[k + 1] == "-":
                        members.extend(chr(x) for x in range(ord(body[k]), ord(body[k + 2]) + 1))
                        k += 3
                    else:
                        members.append(body[k])
                        k += 1
                if negate:
                    members = [ch for ch in "0123456789ABCDEFabcdefXYZ_" if ch not in members]
                out.append(members[0])
                i = j
        else:
            out.append(c)
        i += 1
    return "".join(out)


def read_aliases(mdir: Path) -> list[tuple[str, str]]:
    """(pattern, module) from depmod's modules.alias text."""
    out = []
    for line in (mdir / "modules.alias").read_text("utf-8", "surrogateescape").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            out.append((parts[1], parts[2]))
    return out


# --- the world ---------------------------------------------------------------------------

@dataclass
class World:
    tree: Tree
    base: Path
    empty: Path  # an empty directory: depmod -C, modprobe -C, modprobe.d, firmware
    installed_root: Path  # ROOT of the installed tree (modprobe -d)
    oracle_root: Path  # ROOT of kernel-modules + kernel-modules-extra (modprobe -d)
    payloads: dict[str, Path]  # package -> payload root (what `index build --from-dir` reads)
    index: Path
    package_of: dict[str, str]  # module name -> package
    extra_blacklist: frozenset[str]  # module names kernel-modules-extra blacklists
    aliases: list[tuple[str, str]]  # (pattern, module) of every core, modules and extra module
    index_summaries: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def kver(self) -> str:
        return self.tree.kver

    @property
    def installed(self) -> Path:
        return self.installed_root / "lib" / "modules" / self.kver

    @property
    def oracle(self) -> Path:
        return self.oracle_root / "lib" / "modules" / self.kver

    def env(self, isolated: bool = True) -> dict:
        """The environment for the kmodguard CLI on this world. isolated: a fake /proc and /sys
        (no kernel command line blacklist, no loaded modules) for answers that depend on nothing
        but the trees; False keeps the machine's own (`status` enumerates real devices)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KMODGUARD_")}
        env.update({
            "KMODGUARD_MODULES_DIR": str(self.installed),
            "KMODGUARD_INDEX_DIR": str(self.index),
            "KMODGUARD_STATE_DIR": str(self.base / "state"),
            "KMODGUARD_RUNTIME_DIR": str(self.base / "run"),
            "KMODGUARD_CONFIG_DIR": str(self.base / "etc"),
            "KMODGUARD_MODPROBE_DIRS": str(self.empty),
            "KMODGUARD_FIRMWARE_DIRS": str(self.empty),
            "PYTHONPATH": str(REPO),
            "LC_ALL": "C",
        })
        if isolated:
            env["KMODGUARD_PROC"] = str(self.base / "proc")
            env["KMODGUARD_SYSFS"] = str(self.base / "sys")
        return env

    def modprobe(self, root: Path, alias: str) -> list[str]:
        return modprobe_resolve(root, self.kver, alias, self.empty)


def modprobe_resolve(root: Path, kver: str, alias: str, confdir: Path) -> list[str]:
    """The oracle: `modprobe -C EMPTY -d ROOT -S KVER -R ALIAS`; [] when nothing matches."""
    proc = subprocess.run([_tool("modprobe"), "-C", str(confdir), "-d", str(root), "-S", kver, "-R", alias],
                          capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode == 0:
        return list(dict.fromkeys(proc.stdout.split()))
    if proc.returncode == 1 and "not found" in proc.stderr:
        return []
    raise RuntimeError(f"modprobe -R {alias!r} in {root}: exit {proc.returncode}: {proc.stderr.strip()}")


def kmodguard_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kmodguard", *args]


def run_kmodguard(env: dict, *args: str, input: bytes | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(kmodguard_cmd(*args), input=input, capture_output=True, env=env, timeout=timeout)


def _farm(root: Path, mdir: Path, kver: str, rels: list[str]) -> Path:
    """ROOT/lib/modules/KVER with a hard link per module file (a copy across filesystems): kmodguard
    refuses a package's module that is a symbolic link, and the cached tree is never written."""
    dest = root / "lib" / "modules" / kver
    made = set()
    for rel in rels:
        parent = os.path.dirname(rel)
        if parent not in made:
            (dest / parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        try:
            os.link(mdir / rel, dest / rel)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM):
                raise
            shutil.copy2(mdir / rel, dest / rel)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _write_order(src: Path, dest: Path, rels: list[str]) -> None:
    """The package's modules.order restricted to the modules present (depmod wants one)."""
    keep = set(rels)
    lines = src.read_text().splitlines() if src.is_file() else []
    kept = [ln for ln in lines if ln in keep]
    (dest / "modules.order").write_text("".join(f"{ln}\n" for ln in kept))


def _depmod(root: Path, kver: str, confdir: Path) -> subprocess.Popen:
    return subprocess.Popen([_tool("depmod"), "-C", str(confdir), "-b", str(root), kver],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C"})


def _wait(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"depmod on {what} failed: {err.decode(errors='replace')}")


def build_world(tree: Tree, base: Path) -> World:
    """The Fedora-split world of a real tree under base (see the module docstring)."""
    t0 = time.perf_counter()
    timings = {}
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    kver, mdir = tree.kver, tree.mdir
    empty = base / "empty"
    empty.mkdir()
    # a fake /proc with an ordinary command line (and module support), an empty /sys
    (base / "proc").mkdir()
    (base / "proc" / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet\n")
    (base / "proc" / "modules").write_text("")
    (base / "sys" / "module").mkdir(parents=True)

    assigned = assign(tree)
    by_pkg: dict[str, list[str]] = {}
    for rel, pkg in assigned.items():
        by_pkg.setdefault(pkg, []).append(rel)
    package_of = {module_name(rel): pkg for rel, pkg in assigned.items()}

    installed_root, oracle_root = base / "installed", base / "oracle"
    inst = _farm(installed_root, mdir, kver, by_pkg.get(CORE, []))
    for f in ("modules.builtin", "modules.builtin.modinfo"):
        shutil.copyfile(mdir / f, inst / f)
    _write_order(mdir / "modules.order", inst, by_pkg.get(CORE, []))
    oracle_rels = by_pkg.get(MODULES, []) + by_pkg.get(EXTRA, [])
    orc = _farm(oracle_root, mdir, kver, oracle_rels)
    _write_order(mdir / "modules.order", orc, oracle_rels)
    for f in ("modules.builtin", "modules.builtin.modinfo"):
        (orc / f).touch()
    payloads = {}
    for pkg in INDEXED:
        payloads[pkg] = base / "payload" / pkg
        _farm(payloads[pkg], mdir, kver, by_pkg.get(pkg, []))
    timings["symlinks_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    jobs = [(_depmod(installed_root, kver, empty), "the installed tree"),
            (_depmod(oracle_root, kver, empty), "the oracle tree")]
    for proc, what in jobs:
        _wait(proc, what)
    timings["depmod_s"] = time.perf_counter() - t
    aliases = read_aliases(inst) + read_aliases(orc)

    # kernel-modules-extra's own blacklist, as Fedora's mod-blacklist.sh writes it
    extra_files = {module_name(rel): rel for rel in by_pkg.get(EXTRA, [])}
    net = {m for pattern, m in aliases if m in extra_files and pattern.startswith("net-")}
    if "floppy" in extra_files:
        net.add("floppy")
    conf = payloads[EXTRA] / "etc" / "modprobe.d"
    conf.mkdir(parents=True)
    for m in sorted(net):
        file_base = os.path.basename(extra_files[m]).split(".ko")[0]  # the file name, dashes kept
        (conf / f"{file_base}-blacklist.conf").write_text(BLACKLIST_TEXT.format(name=file_base))

    world = World(tree=tree, base=base, empty=empty, installed_root=installed_root, oracle_root=oracle_root,
                  payloads=payloads, index=base / "index", package_of=package_of,
                  extra_blacklist=frozenset(net), aliases=aliases, timings=timings)
    t = time.perf_counter()
    for pkg in INDEXED:
        world.index_summaries[pkg] = index_package(world, pkg)
    timings["index_build_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return world


def index_package(world: World, pkg: str, index_dir: Path | None = None) -> dict:
    """`kmodguard index build --from-dir` for one payload, through the CLI; returns its summary."""
    import json

    env = world.env()
    if index_dir is not None:
        env["KMODGUARD_INDEX_DIR"] = str(index_dir)
    proc = run_kmodguard(env, "index", "build", "--json", "--kver", world.kver, "--package", pkg,
                         "--version", world.kver, "--request", f"{pkg}-uname-r = {world.kver}",
                         "--from-dir", str(world.payloads[pkg]))
    if proc.returncode != 0:
        raise RuntimeError(f"kmodguard index build {pkg} failed (exit {proc.returncode}): "
                           f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}")
    return json.loads(proc.stdout)["built"][0]


# --- modaliases --------------------------------------------------------------------------

def modalias_population(world: World, packages=(CORE, MODULES)) -> tuple[dict[str, str], dict[str, int]]:
    """Concrete modaliases made from every alias pattern of the modules of `packages`.

    Returns ({modalias: the module whose pattern made it}, counts). Patterns that are not
    modaliases (fs-ext4, crypto-aes, net-pf-10, char-major-...) are counted and left out:
    `kmodguard explain` refuses them by contract.
    """
    out: dict[str, str] = {}
    counts = {"patterns": 0, "not_modalias": 0, "duplicates": 0}
    for pattern, module in world.aliases:
        if world.package_of.get(module) not in packages:
            continue
        counts["patterns"] += 1
        concrete = concretise(pattern)
        if not MODALIAS.fullmatch(concrete) or len(concrete) > 4096:
            counts["not_modalias"] += 1
            continue
        if concrete in out:
            counts["duplicates"] += 1
            continue
        out[concrete] = module
    counts["modaliases"] = len(out)
    return out, counts


def oracle_pool(fn, items, workers: int = 3) -> list:
    """fn over items in a small thread pool (each call is a modprobe process), results in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))
