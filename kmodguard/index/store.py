"""On-disk package index: INDEX_ROOT/KVER/PACKAGE -> .PACKAGE.<token>/ (a symlink swapped atomically).

A package directory is a kmod-format module directory that libkmod opens as it is:
  modules.alias.bin          depmod's alias index of the package's modules (the real one)
  modules.dep.bin, modules.symbols.bin, modules.builtin.bin, modules.builtin.alias.bin
                             empty kmod indexes: a package index answers aliases only
  modprobe.d/                the modprobe.d files the package ships (its own blacklists)
  modules.json.xz            per module: path, size, aliases, firmware, depends
  firmware.json.xz           per module that names firmware, the files it names: what judging reads
                             of the module table, a hundredth of its size (an index built before
                             it has none: the table answers)
  index.json                 format, version, package, request, blacklist, checksums (written last);
                             a derived index (derive.derive) also says which kernel it was derived
                             from ("derived_from") and may restrict the alias tables to the modules
                             the new package is known to hold ("only_modules")
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from functools import cached_property
from pathlib import Path
from typing import Callable, NamedTuple

from .. import requests
from ..errors import IndexCorrupt, InvalidInput, KmodguardError
from ..fsutil import MiB, fsync_dir, make_dir, read_capped, read_capped_stat, sha256_capped

FORMAT = "kmodguard-index"
VERSION = 2  # 2: index.json carries its own digest, and "files" covers modprobe.d/*
KMOD_FILES = ("modules.alias.bin", "modules.dep.bin", "modules.symbols.bin", "modules.builtin.bin",
              "modules.builtin.alias.bin")
MODULES_FILE = "modules.json.xz"
FIRMWARE_FILE = "firmware.json.xz"
META_FILE = "index.json"


# Size caps on what an index may hold (a real one: index.json a few KiB, modules.alias.bin under
# 1 MiB, modules.json.xz under 1 MiB for Fedora's kernel-modules).
META_CAP = 4 * MiB
KMOD_FILE_CAP = 256 * MiB
MODULES_CAP = 64 * MiB  # compressed
MODULES_JSON_CAP = 512 * MiB  # decompressed
MODPROBE_DIR = "modprobe.d"
MODPROBE_CAP = MiB  # one modprobe.d file
MODPROBE_FILES = 256
DIGEST_KEY = "meta_sha256"  # sha256 of index.json's own canonical form without this key
REBUILD = "rebuild it with 'kmodguard index build' (or 'kmodguard index fetch')"


def _sha256(path: Path, cap: int = KMOD_FILE_CAP) -> str:
    """A file of the index: a regular file, never a link (an index holds no links but its own
    name), at most cap bytes."""
    return _sha256_stat(path, cap)[0]


def _sha256_stat(path: Path, cap: int) -> tuple[str, os.stat_result]:
    return sha256_capped(path, cap, follow=False, error_class=IndexCorrupt, hint=REBUILD)


def meta_digest(meta: dict) -> str:
    """The digest index.json carries of itself: every key but the digest, in canonical JSON."""
    import hashlib

    body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def modprobe_files(directory: Path) -> list[str]:
    """The names in an index's modprobe.d/, which must hold only regular files (checked by lstat:
    libkmod reads every *.conf there, and follows links)."""
    import stat

    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        raise IndexCorrupt(f"{directory} is not a directory", hint=REBUILD)
    names = sorted(os.listdir(directory))
    if len(names) > MODPROBE_FILES:
        raise IndexCorrupt(f"{directory} holds {len(names)} files, more than {MODPROBE_FILES}", hint=REBUILD)
    for name in names:
        if not stat.S_ISREG(os.lstat(directory / name).st_mode):
            raise IndexCorrupt(f"{directory / name} is not a regular file", hint=REBUILD)
    return names


def checksums(directory: Path) -> dict[str, str]:
    """What index.json's "files" holds for a finished index directory: every file libkmod or
    kmodguard reads from it, modprobe.d/* included."""
    optional = [FIRMWARE_FILE] if os.path.lexists(directory / FIRMWARE_FILE) else []
    files = {f: _sha256(directory / f) for f in (*KMOD_FILES, MODULES_FILE, *optional)}
    for name in modprobe_files(directory / MODPROBE_DIR):
        files[f"{MODPROBE_DIR}/{name}"] = _sha256(directory / MODPROBE_DIR / name, MODPROBE_CAP)
    return files


def write_meta(directory: Path, meta: dict) -> None:
    """index.json, with its own digest, written last (it is what makes a directory an index)."""
    meta = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    meta["files"] = checksums(directory)
    meta[DIGEST_KEY] = meta_digest(meta)
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, allow_nan=False) + "\n")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(data: bytes, what: str):
    """JSON from a file kmodguard does not control: no NaN/Infinity, no nesting deep enough to
    exhaust the interpreter's stack (reported, not a RecursionError)."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None


def valid_name(kind: str, value: str) -> str:
    """Package names and kernel versions become directory names: keep them boring."""
    ok = value and len(value) <= 200 and value[0] not in ".-" and all(c.isalnum() or c in "._+-~^" for c in value)
    if not ok:
        raise InvalidInput(f"{kind} {value!r} is not acceptable (letters, digits and . _ + - ~ ^ only)")
    return value


def _typed(value, kind):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"a value of the wrong type ({type(value).__name__})")
    return value


_GENERATION = re.compile(r"\.(?P<name>[^/]+)\.[0-9a-f]{12}")


def _generation(link: Path) -> Path:
    """The directory a package link names: .NAME.TOKEN beside it (what publish makes), a real
    directory. A link elsewhere, to another package's generation, or a chain of links is refused."""
    import stat

    if not link.is_symlink():
        raise IndexCorrupt(f"index {link} is not a link kmodguard made", hint=f"move {link} away and build again")
    target = os.readlink(link)
    m = _GENERATION.fullmatch(target)
    if m is None or m.group("name") != link.name:
        raise IndexCorrupt(f"index {link} points at {target[:120]!r}, not at a generation of package {link.name}",
                           hint=f"remove {link} and build again")
    gen = link.parent / target
    if not stat.S_ISDIR(os.lstat(gen).st_mode):
        raise IndexCorrupt(f"index {link}: {target} is not a directory", hint=f"remove {link} and build again")
    return gen


class ModuleRecord(NamedTuple):
    name: str
    path: str
    size: int
    aliases: tuple[str, ...]
    firmware: tuple[str, ...]
    depends: tuple[str, ...]


class PackageIndex:
    """One indexed package for one kernel, opened read-only and verified.

    verified: what earlier runs found each file's sha256 to be, while the file stays the same
    (engine/file_facts.FileFacts: known/identity/put); None checks every file's bytes."""

    def __init__(self, path: Path, kver: str, verified=None):
        self.link = path
        self.kver = kver
        self._verified = verified
        try:
            self._open(Path(path), kver)
        except IndexCorrupt:
            raise
        except (OSError, RecursionError, ValueError, TypeError, KmodguardError) as exc:
            # whatever else a hostile or damaged directory does: this index is unusable, nothing more
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise IndexCorrupt(f"index {path} is unusable: {detail}", hint=f"{REBUILD}, or remove {path}") from None

    def _open(self, path: Path, kver: str) -> None:
        self.path = _generation(path)
        meta_path = self.path / META_FILE
        try:
            raw, meta_stat = read_capped_stat(meta_path, META_CAP, follow=False, error_class=IndexCorrupt,
                                              hint=f"{REBUILD}, or remove {path}")
        except IndexCorrupt as exc:
            if not os.path.lexists(meta_path):
                raise IndexCorrupt(f"index {path} is incomplete: {META_FILE} is missing",
                                   hint=f"{REBUILD}, or remove {path}") from None
            raise IndexCorrupt(f"index {path} is unusable: {exc.message}", hint=exc.hint) from None
        try:
            meta = parse_json(raw, META_FILE)
        except (UnicodeDecodeError, ValueError) as exc:
            raise IndexCorrupt(f"index {path} is corrupt: {META_FILE} is not readable JSON ({exc})",
                               hint=f"{REBUILD}, or remove {path}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise IndexCorrupt(f"{meta_path} is not a kmodguard index",
                               hint=f"remove {path} if it is not yours")
        if meta.get("version") != VERSION:
            raise IndexCorrupt(f"index {path} has format version {str(meta.get('version'))[:20]}; this kmodguard reads "
                               f"{VERSION}", hint=f"{REBUILD}: indexes of format 1 have no checksum of their own "
                               "and must be built again")
        if not self._known(meta_path, meta_stat, meta.get(DIGEST_KEY)):
            if meta.get(DIGEST_KEY) != meta_digest(meta):
                raise IndexCorrupt(f"index {path} is corrupt: {META_FILE} does not match its own digest "
                                   "(edited or damaged)", hint=REBUILD)
            self._learn(meta_path, meta_stat, meta[DIGEST_KEY])
        try:
            pkg = meta["package"]
            self.name = valid_name("package name", _typed(pkg["name"], str))
            self.version = _typed(pkg["version"], str)
            self.request = _typed(pkg["request"], str)
            self.rebuilds_initramfs = _typed(pkg.get("rebuilds_initramfs", False), bool)
            self.blacklist = frozenset(_typed(m, str) for m in _typed(meta["blacklist"]["modules"], list))
            self.module_count = _typed(meta["modules"], int)
            self.built = float(_typed(meta["built"], (int, float)))
            if not (math.isfinite(self.built) and 0 <= self.built < 1e11) or self.module_count < 0:
                raise ValueError("built or modules")
            self.checksums = {_typed(k, str): _typed(v, str) for k, v in _typed(meta["files"], dict).items()}
            self.source = meta.get("source")
            self.derived_from = meta.get("derived_from")
            only = meta.get("only_modules")
            self.only_modules = None if only is None else frozenset(_typed(m, str) for m in _typed(only, list))
            indexed_kver = _typed(meta["kernel"], str)
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise IndexCorrupt(f"index {path} is corrupt: {META_FILE} lacks or mangles {exc}",
                               hint=REBUILD) from None
        if self.name != path.name:
            raise IndexCorrupt(f"index {path} holds package {self.name!r}, not {path.name!r}",
                               hint=f"remove {path}: a package's index is filed under its own name")
        if indexed_kver != kver:
            raise IndexCorrupt(f"index {path} is for kernel {indexed_kver}, not {kver}",
                               hint=f"remove {path}; it was filed under the wrong kernel")
        try:  # the request kmodguard builds for this package and kernel, or the index is refused
            requests.for_package(self.name, kver, self.version, self.request)
        except InvalidInput as exc:
            raise IndexCorrupt(f"index {path} is refused: {exc.message}", hint=REBUILD) from None
        self.conf_files = [f"{MODPROBE_DIR}/{n}" for n in modprobe_files(self.path / MODPROBE_DIR)]
        optional = [FIRMWARE_FILE] if FIRMWARE_FILE in self.checksums or os.path.lexists(
            self.path / FIRMWARE_FILE) else []  # an index built before it holds none
        expected = {*KMOD_FILES, MODULES_FILE, *self.conf_files, *optional}
        for fname in self.checksums:
            if fname not in expected:
                if fname.startswith(f"{MODPROBE_DIR}/"):
                    raise IndexCorrupt(f"index {path} is incomplete: {fname} is missing", hint=REBUILD)
                raise IndexCorrupt(f"index {path} names an unexpected file {fname[:80]!r}", hint=REBUILD)
        for fname in sorted(expected):
            if fname not in self.checksums:
                raise IndexCorrupt(f"index {path} holds {fname}, which {META_FILE} does not cover "
                                   "(added after the index was built)", hint=REBUILD)
        for fname, digest in self.checksums.items():
            cap = MODPROBE_CAP if fname.startswith(f"{MODPROBE_DIR}/") else KMOD_FILE_CAP
            fpath = self.path / fname
            if self._known(fpath, None, digest):
                continue
            try:
                actual, st = _sha256_stat(fpath, cap)
            except IndexCorrupt as exc:
                raise IndexCorrupt(f"index {path} is unusable: {exc.message}", hint=REBUILD) from None
            if actual != digest:
                raise IndexCorrupt(f"index {path} is corrupt: {fname} does not match its checksum",
                                   hint=REBUILD)
            self._learn(fpath, st, digest)
        self.meta = meta

    def _known(self, path: Path, st: os.stat_result | None, digest) -> bool:
        """An earlier run checked this very file (the same identity; a regular file, not a link)
        and found this digest. st: the fstat of the file as read; None: lstat it now."""
        return self._verified is not None and isinstance(digest, str) and self._verified.known(path, st) == digest

    def _learn(self, path: Path, st: os.stat_result, digest: str) -> None:
        if self._verified is not None:
            self._verified.put(path, st, digest)

    @cached_property
    def context(self):
        """libkmod on this package's alias index, reading only the package's own modprobe.d."""
        from ..kmod import Context  # not at import: `index build` starts depmod before it needs libkmod

        # the checksummed files one by one, not the directory: a file added since is never read
        ctx = Context(self.path, [str(self.path / f) for f in self.conf_files])
        ctx.load_resources()
        return ctx

    def lookup(self, modalias: str) -> tuple[str, ...]:
        found = self.context.lookup_tuple(modalias)
        return found if self.only_modules is None else tuple(m for m in found if m in self.only_modules)

    def firmware_of(self, module: str) -> tuple[str, ...]:
        """The firmware files the package's module names (from firmware.json.xz; from the module
        table for an index built before it)."""
        if FIRMWARE_FILE in self.checksums:
            return self._firmware.get(module, ())
        record = self.modules.get(module)
        return record.firmware if record else ()

    @cached_property
    def _firmware(self) -> dict[str, tuple[str, ...]]:
        raw = self._table(FIRMWARE_FILE)
        try:
            return {_typed(m, str): tuple(_typed(f, str) for f in _typed(names, list))
                    for m, names in _typed(raw, dict).items()}
        except (TypeError, AttributeError) as exc:
            raise IndexCorrupt(f"index {self.link} is corrupt: {FIRMWARE_FILE}: {exc}", hint=REBUILD) from None

    @cached_property
    def modules(self) -> dict[str, ModuleRecord]:
        raw = self._table(MODULES_FILE)
        try:
            return {n: ModuleRecord(n, m["path"], int(m["size"]), tuple(m["aliases"]), tuple(m["firmware"]),
                                    tuple(m["depends"])) for n, m in raw.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IndexCorrupt(f"index {self.link} is corrupt: {MODULES_FILE}: {exc}", hint=REBUILD) from None

    def _table(self, fname: str):
        """The JSON of one of the index's xz files, capped before and after decompression."""
        import lzma

        try:
            packed = read_capped(self.path / fname, MODULES_CAP, error_class=IndexCorrupt, hint=REBUILD)
            dec = lzma.LZMADecompressor()
            text = dec.decompress(packed, max_length=MODULES_JSON_CAP)
            if not dec.eof:
                raise ValueError(f"it is truncated, or more than {MODULES_JSON_CAP} bytes decompressed")
            return parse_json(text, fname)
        except (OSError, EOFError, lzma.LZMAError, ValueError, IndexCorrupt) as exc:
            raise IndexCorrupt(f"index {self.link} is corrupt: {fname}: {exc}", hint=REBUILD) from None

    @property
    def disk_size(self) -> int:
        return sum(f.lstat().st_size for f in self.path.rglob("*") if f.is_file() and not f.is_symlink())

    def summary(self) -> dict:
        return {
            "package": self.name,
            "version": self.version,
            "request": self.request,
            "rebuilds_initramfs": self.rebuilds_initramfs,
            "kernel": self.kver,
            "modules": self.module_count,
            "blacklisted": sorted(self.blacklist),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.built)),
            "age_seconds": max(0, int(time.time() - self.built)),
            "size_bytes": self.disk_size,
            "path": str(self.link),
            "source": self.source,
            "derived_from": self.derived_from,
        }


class KernelIndex:
    """All packages indexed for one kernel version. Broken package indexes are kept aside, not fatal."""

    def __init__(self, root: Path, kver: str, verified=None):
        """verified: see PackageIndex (a Diagnoser passes the cache in STATE_DIR)."""
        self.root = Path(root)
        self.kver = kver
        self.dir = self.root / kver
        self.packages: list[PackageIndex] = []
        self.errors: dict[str, IndexCorrupt] = {}
        try:
            if not self.dir.is_dir():
                return
            entries = sorted(self.dir.iterdir())
        except OSError as exc:  # e.g. a directory closed to a non-root reader
            self.errors[kver] = IndexCorrupt(f"the index {self.dir} cannot be read: {exc.strerror or exc}",
                                             hint="run the command as root, or fix the directory's permissions")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue  # generations and unfinished builds
            try:
                self.packages.append(PackageIndex(entry, kver, verified))
            except IndexCorrupt as exc:
                self.errors[entry.name] = exc

    @property
    def exists(self) -> bool:
        return bool(self.packages)

    def lookup(self, modalias: str) -> tuple[tuple[PackageIndex, tuple[str, ...]], ...]:
        """(package, its matching modules) for each package that has any; hashable, as judging
        keys its verdicts by what matched."""
        found = ()
        for pkg, lookup in self._lookups:
            modules = lookup(modalias)
            if modules:
                found += ((pkg, modules),)  # one or two packages match: no list to convert
        return found

    @cached_property
    def _lookups(self) -> list[tuple[PackageIndex, Callable[[str], tuple[str, ...]]]]:
        """(package, its lookup) for each package, made at the first lookup (which opens libkmod on
        each): libkmod's own, one call fewer for each package and modalias, unless the index is a
        derived one that names only some of its modules (PackageIndex.lookup filters them)."""
        return [(p, p.context.lookup_tuple if p.only_modules is None else p.lookup) for p in self.packages]


def kernels(root: Path) -> list[str]:
    root = Path(root)
    try:
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []  # unreadable to this user: KernelIndex says so for the kernel asked about


def publish(root: Path, kver: str, package: str, staged: Path) -> Path:
    """Make a fully written package directory the current index for (kver, package), atomically.

    The new generation is renamed next to the old one, then the symlink is swapped with
    rename(2): a reader sees the old index or the new one, never a mix. A kill at any moment
    leaves at most an unreferenced .generation behind, which the next publish removes.
    """
    import secrets
    import shutil

    kdir = Path(root) / valid_name("kernel version", kver)
    make_dir(kdir)
    link = kdir / valid_name("package name", package)
    for f in staged.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    generation = kdir / f".{package}.{secrets.token_hex(6)}"
    os.rename(staged, generation)
    tmp_link = kdir / f".{package}.link-{secrets.token_hex(6)}"
    os.symlink(generation.name, tmp_link)
    if link.exists() and not link.is_symlink():
        raise IndexCorrupt(f"{link} is not an index kmodguard made", hint=f"move {link} away and build again")
    os.rename(tmp_link, link)
    fsync_dir(kdir)
    current = generation.name
    for stale in kdir.glob(f".{package}.*"):
        if stale.name == current:
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return link


def remove(root: Path, kver: str, package: str) -> bool:
    import shutil

    kdir = Path(root) / kver
    link = kdir / package
    if not link.is_symlink():
        return False
    target = link.resolve()
    link.unlink()
    shutil.rmtree(target, ignore_errors=True)
    return True
