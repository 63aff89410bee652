"""On-disk package index: INDEX_ROOT/KVER/PACKAGE -> .PACKAGE.<token>/ (a symlink swapped atomically).

A package directory is a kmod-format module directory that libkmod opens as it is:
  modules.alias.bin          depmod's alias index of the package's modules (the real one)
  modules.dep.bin, modules.symbols.bin, modules.builtin.bin, modules.builtin.alias.bin
                             empty kmod indexes: a package index answers aliases only
  modprobe.d/                the modprobe.d files the package ships (its own blacklists)
  modules.json.xz            per module: path, size, aliases, firmware, depends
  index.json                 format, version, package, request, blacklist, checksums (written last);
                             a derived index (build.derive) also says which kernel it was derived
                             from ("derived_from") and may restrict the alias tables to the modules
                             the new package is known to hold ("only_modules")
"""

from __future__ import annotations

import json
import os
import time
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from ..errors import IndexCorrupt, InvalidInput
from ..fsutil import fsync_dir, make_dir
from ..kmod import Context

FORMAT = "kmodguard-index"
VERSION = 1
KMOD_FILES = ("modules.alias.bin", "modules.dep.bin", "modules.symbols.bin", "modules.builtin.bin",
              "modules.builtin.alias.bin")
MODULES_FILE = "modules.json.xz"
META_FILE = "index.json"


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def valid_name(kind: str, value: str) -> str:
    """Package names and kernel versions become directory names: keep them boring."""
    ok = value and len(value) <= 200 and value[0] not in ".-" and all(c.isalnum() or c in "._+-~^" for c in value)
    if not ok:
        raise InvalidInput(f"{kind} {value!r} is not acceptable (letters, digits and . _ + - ~ ^ only)")
    return value


class ModuleRecord(NamedTuple):
    name: str
    path: str
    size: int
    aliases: tuple[str, ...]
    firmware: tuple[str, ...]
    depends: tuple[str, ...]


class PackageIndex:
    """One indexed package for one kernel, opened read-only and verified."""

    def __init__(self, path: Path, kver: str):
        self.link = path
        self.path = path.resolve()
        self.kver = kver
        meta_path = self.path / META_FILE
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
        except FileNotFoundError:
            raise IndexCorrupt(f"index {path} is incomplete: {META_FILE} is missing",
                               hint=f"rebuild it with 'kmodguard index build', or remove {path}") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise IndexCorrupt(f"index {path} is corrupt: {META_FILE} is not readable JSON ({exc})",
                               hint=f"rebuild it with 'kmodguard index build', or remove {path}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise IndexCorrupt(f"{meta_path} is not a kmodguard index",
                               hint=f"remove {path} if it is not yours")
        if meta.get("version") != VERSION:
            raise IndexCorrupt(f"index {path} has format version {meta.get('version')!r}; this kmodguard reads {VERSION}",
                               hint="rebuild it with 'kmodguard index build'")
        try:
            self.name = valid_name("package name", meta["package"]["name"])
            self.version = str(meta["package"]["version"])
            self.request = str(meta["package"]["request"])
            self.rebuilds_initramfs = bool(meta["package"].get("rebuilds_initramfs", False))
            self.blacklist = frozenset(meta["blacklist"]["modules"])
            self.module_count = int(meta["modules"])
            self.built = float(meta["built"])
            self.checksums = dict(meta["files"])
            self.source = meta.get("source")
            self.derived_from = meta.get("derived_from")
            only = meta.get("only_modules")
            self.only_modules = None if only is None else frozenset(str(m) for m in only)
            indexed_kver = meta["kernel"]
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise IndexCorrupt(f"index {path} is corrupt: {META_FILE} lacks or mangles {exc}",
                               hint="rebuild it with 'kmodguard index build'") from None
        if indexed_kver != kver:
            raise IndexCorrupt(f"index {path} is for kernel {indexed_kver}, not {kver}",
                               hint=f"remove {path}; it was filed under the wrong kernel")
        for fname, digest in self.checksums.items():
            if fname not in (*KMOD_FILES, MODULES_FILE):
                raise IndexCorrupt(f"index {path} names an unexpected file {fname!r}")
            try:
                actual = _sha256(self.path / fname)
            except OSError as exc:
                raise IndexCorrupt(f"index {path} is incomplete: {fname}: {exc.strerror}",
                                   hint="rebuild it with 'kmodguard index build'") from None
            if actual != digest:
                raise IndexCorrupt(f"index {path} is corrupt: {fname} does not match its checksum",
                                   hint="rebuild it with 'kmodguard index build'")
        if set(self.checksums) != {*KMOD_FILES, MODULES_FILE}:
            raise IndexCorrupt(f"index {path} is incomplete: files missing from {META_FILE}")
        self.meta = meta

    @cached_property
    def context(self) -> Context:
        """libkmod on this package's alias index, reading only the package's own modprobe.d."""
        confdir = self.path / "modprobe.d"
        ctx = Context(self.path, [str(confdir)] if confdir.is_dir() else [])
        ctx.load_resources()
        return ctx

    def lookup(self, modalias: str) -> list[str]:
        found = self.context.lookup(modalias)
        return found if self.only_modules is None else [m for m in found if m in self.only_modules]

    @cached_property
    def modules(self) -> dict[str, ModuleRecord]:
        import lzma

        try:
            raw = json.loads(lzma.decompress((self.path / MODULES_FILE).read_bytes()))
            return {n: ModuleRecord(n, m["path"], int(m["size"]), tuple(m["aliases"]), tuple(m["firmware"]),
                                    tuple(m["depends"])) for n, m in raw.items()}
        except (OSError, EOFError, lzma.LZMAError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IndexCorrupt(f"index {self.link} is corrupt: {MODULES_FILE}: {exc}",
                               hint="rebuild it with 'kmodguard index build'") from None

    @property
    def disk_size(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

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

    def __init__(self, root: Path, kver: str):
        self.root = Path(root)
        self.kver = kver
        self.dir = self.root / kver
        self.packages: list[PackageIndex] = []
        self.errors: dict[str, IndexCorrupt] = {}
        if not self.dir.is_dir():
            return
        for entry in sorted(self.dir.iterdir()):
            if entry.name.startswith("."):
                continue  # generations and unfinished builds
            try:
                self.packages.append(PackageIndex(entry, kver))
            except IndexCorrupt as exc:
                self.errors[entry.name] = exc

    @property
    def exists(self) -> bool:
        return bool(self.packages)

    def lookup(self, modalias: str) -> list[tuple[PackageIndex, list[str]]]:
        found = []
        for pkg in self.packages:
            modules = pkg.lookup(modalias)
            if modules:
                found.append((pkg, modules))
        return found


def kernels(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


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
