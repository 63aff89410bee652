"""Debian's real kernel package, cached between runs, and a Fedora-style split world built from it.

Used by tests/test_realtree.py and by bench/run.py. Two layers:

* `ensure_tree()` gives the extracted package linux-image-6.1.0-56-amd64 (the build that
  data/fedora-split/ was made for), cached in ${KMODGUARD_TEST_CACHE:-/var/cache/kmodguard-tests}.
  A missing tree is extracted from a cached .deb, or downloaded with `apt-get download` and
  extracted with `dpkg -x`. Downloads and extractions go to temporary names first and are
  renamed into place when complete, so a killed run never leaves a half tree behind. When that
  exact package has left the archive, the newest linux-image-6.1.0-*-amd64 (the one
  `apt-cache depends linux-image-amd64` names) is used instead and modules are mapped to
  packages by path (a module the table does not know goes to kernel-modules). When nothing can
  be had, RealTreeUnavailable says why: tests fail on it, they never skip.

* `build_world(tree, base)` makes, under `base`, symlinks to the cached modules (no copies):
    installed/   kernel-modules-core as an installed tree (depmod'ed, with the package's real
                 modules.builtin and modules.builtin.modinfo): what a cloud image carries
    payload/kernel-modules/, payload/kernel-modules-extra/
                 extracted-package payloads; extra also carries the blacklist files Fedora's
                 mod-blacklist.sh writes (floppy, and every module with a `net-` alias)
    oracle/      kernel-modules + kernel-modules-extra, depmod'ed: what modprobe answers from
    index/       both payloads indexed by `kmodguard index build --from-dir` (the real CLI)
"""

from __future__ import annotations

import contextlib
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

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SPLIT_TABLE = DATA / "fedora-split" / "split-debian-6.1.0-56-amd64.tsv"

PACKAGE = "linux-image-6.1.0-56-amd64"  # the build the split table was made for
KVER = "6.1.0-56-amd64"
FALLBACK_KVER = re.compile(r"6\.1\.0-\d+-amd64")
META_PACKAGE = "linux-image-amd64"

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


# --- the cached package ------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("KMODGUARD_TEST_CACHE") or "/var/cache/kmodguard-tests").absolute()


@dataclass(frozen=True)
class Tree:
    root: Path  # the extracted package
    kver: str
    package: str
    exact: bool  # the build the split table was made for (else: mapped by path)

    @property
    def mdir(self) -> Path:
        return modules_dir(self.root, self.kver)


def modules_dir(root: Path, kver: str) -> Path:
    for sub in ("lib/modules", "usr/lib/modules"):
        if (root / sub / kver).is_dir():
            return root / sub / kver
    return root / "lib/modules" / kver


def _tree_dir(cache: Path, kver: str) -> Path:
    # "tree" holds the exact build (the name older caches already use); fallbacks get their own
    return cache / ("tree" if kver == KVER else f"tree-{kver}")


def _complete(root: Path, kver: str) -> bool:
    """Trees are renamed into place only when fully extracted; modules.order is the proof."""
    return (modules_dir(root, kver) / "modules.order").is_file()


def _tree(cache: Path, kver: str) -> Tree | None:
    root = _tree_dir(cache, kver)
    return Tree(root, kver, f"linux-image-{kver}", kver == KVER) if _complete(root, kver) else None


@contextlib.contextmanager
def _locked(cache: Path):
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RealTreeUnavailable(
            f"cannot use the test cache {cache}: {exc.strerror}; set KMODGUARD_TEST_CACHE to a writable "
            f"directory (it needs about 500 MB)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one session downloads; the others wait, then reuse
        yield
    finally:
        os.close(fd)


def _clean_stale(cache: Path) -> None:
    """Leftovers of a killed run (only ever touched under the lock)."""
    for p in cache.glob(".dl-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in cache.glob(".tree-*"):
        shutil.rmtree(p, ignore_errors=True)


def _cached_debs(cache: Path, package: str) -> list[Path]:
    return sorted(cache.glob(f"{package}_*_amd64.deb"), key=lambda p: p.stat().st_mtime, reverse=True)


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})


def _download(cache: Path, package: str) -> Path:
    """apt-get download into a temporary directory, then rename the finished .deb into the cache."""
    apt_get = shutil.which("apt-get")
    if not apt_get:
        raise RealTreeUnavailable("apt-get is not installed: cannot download Debian's kernel package")
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache))
    try:
        _log(f"downloading {package} into {cache} (about 70 MB, once)")
        try:
            proc = _run([apt_get, "download", package], cwd=tmp)
        except subprocess.TimeoutExpired:
            raise RealTreeUnavailable(f"apt-get download {package} took longer than 30 minutes") from None
        debs = list(tmp.glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            raise RealTreeUnavailable(f"apt-get download {package} failed (exit {proc.returncode}): "
                                      f"{(proc.stderr or proc.stdout).strip()[-600:]}")
        final = cache / debs[0].name
        os.rename(debs[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(cache: Path, deb: Path, kver: str) -> Tree:
    """dpkg -x into a temporary directory, then rename it into place: never a half tree."""
    dpkg = _tool("dpkg")
    tmp = Path(tempfile.mkdtemp(prefix=".tree-", dir=cache))
    try:
        _log(f"extracting {deb.name}")
        proc = _run([dpkg, "-x", str(deb), str(tmp)])
        if proc.returncode != 0 or not _complete(tmp, kver):
            raise RealTreeUnavailable(f"dpkg -x {deb} failed or holds no modules for {kver}: "
                                      f"{proc.stderr.strip()[-600:]}")
        tmp.chmod(0o755)  # mkdtemp made it 0700; the tree is read by unprivileged test processes too
        final = _tree_dir(cache, kver)
        if final.exists():  # a broken leftover of someone else's making (ours are renamed whole)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Tree(final, kver, f"linux-image-{kver}", kver == KVER)


def _obtain(cache: Path, package: str, kver: str) -> Tree:
    """The tree of one package: cached, or from a cached .deb, or downloaded."""
    tree = _tree(cache, kver)
    if tree:
        return tree
    for deb in _cached_debs(cache, package):
        try:
            return _extract(cache, deb, kver)
        except RealTreeUnavailable as exc:
            _log(f"{exc}; removing {deb.name} and downloading it again")
            deb.unlink(missing_ok=True)
    return _extract(cache, _download(cache, package), kver)


def _newest_fallback() -> str:
    """The linux-image-6.1.0-NN-amd64 that linux-image-amd64 depends on now."""
    apt_cache = shutil.which("apt-cache")
    if not apt_cache:
        raise RealTreeUnavailable("apt-cache is not installed: cannot find a replacement kernel package")
    proc = _run([apt_cache, "depends", META_PACKAGE], timeout=120)
    names = re.findall(r"Depends:\s*(linux-image-(\S+))", proc.stdout)
    for name, kver in names:
        if FALLBACK_KVER.fullmatch(kver):
            return name
    raise RealTreeUnavailable(f"'apt-cache depends {META_PACKAGE}' names no linux-image-6.1.0-*-amd64 "
                              f"(exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-300:]}); "
                              f"this needs Debian 12's (bookworm) archive in the apt sources")


def ensure_tree() -> Tree:
    """The real kernel tree, from the cache or downloaded once. Raises RealTreeUnavailable."""
    cache = cache_dir()
    tree = _tree(cache, KVER)
    if tree:  # the usual case: no lock, no network, and a read-only cache is fine
        return tree
    problems = []
    with _locked(cache):
        _clean_stale(cache)
        try:
            return _obtain(cache, PACKAGE, KVER)
        except RealTreeUnavailable as exc:
            problems.append(str(exc))
        _log(f"{PACKAGE} is not available ({problems[-1]}); trying the newest 6.1 kernel package")
        try:
            name = _newest_fallback()
            return _obtain(cache, name, name.removeprefix("linux-image-"))
        except RealTreeUnavailable as exc:
            problems.append(str(exc))
        for root in sorted(cache.glob("tree-6.1.0-*-amd64"), reverse=True):  # an earlier fallback
            kver = root.name.removeprefix("tree-")
            if FALLBACK_KVER.fullmatch(kver) and _complete(root, kver):
                _log(f"using the cached {root.name}")
                return Tree(root, kver, f"linux-image-{kver}", False)
    raise RealTreeUnavailable(
        f"Debian's kernel package {PACKAGE} is neither cached in {cache} nor downloadable:\n  - "
        + "\n  - ".join(problems)
        + "\nOn Debian 12: run 'apt-get update' (network access to deb.debian.org needed), or put "
          f"{PACKAGE}_*_amd64.deb into {cache} (or set KMODGUARD_TEST_CACHE).")


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


def assign(tree: Tree) -> dict[str, str]:
    """Each module file of the tree -> its package, by path; unknown paths go to kernel-modules."""
    table = split_table()
    out = {}
    for rel in _module_files(tree.mdir):
        as_ko = rel
        for sfx in MODULE_SUFFIXES[1:]:
            if as_ko.endswith(sfx):
                as_ko = as_ko[: -len(sfx)] + ".ko"
        out[rel] = table.get(as_ko, MODULES)
    if tree.exact:
        absent = sorted(set(table) - set(out))
        if absent:
            raise RealTreeUnavailable(
                f"the cached tree {tree.root} lacks {len(absent)} modules of {PACKAGE} "
                f"(first: {absent[0]}): it is damaged; remove it and run again")
    return out


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
    """ROOT/lib/modules/KVER with a symlink per module file (the cached tree is never written)."""
    dest = root / "lib" / "modules" / kver
    made = set()
    for rel in rels:
        parent = os.path.dirname(rel)
        if parent not in made:
            (dest / parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        os.symlink(mdir / rel, dest / rel)
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
