"""Build a package index from an extracted payload or from RPM files.

Alias matching is libkmod's: depmod writes modules.alias.bin for the package's modules, staged
on tmpfs as stand-ins that hold only each module's .modinfo section (modinfo_elf.py; a link to
the module for one that is compressed). While depmod runs, this process turns the same sections
(libkmod for compressed modules) into the module table and writes the index's own files, on
the other core. An index derived for a new kernel: derive.py.
"""

from __future__ import annotations

import json
import os
import stat
import time
from typing import NamedTuple
from pathlib import Path

from ..errors import InvalidInput, KmodguardError
from .. import process
from ..fsutil import MiB, make_dir, read_capped, regular_file
from ..memory import no_cyclic_gc
from . import store

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
MODPROBE_DIRS = ("etc/modprobe.d", "usr/lib/modprobe.d", "lib/modprobe.d")


class PackageSource(NamedTuple):
    name: str
    version: str
    request: str
    root: Path  # the extracted payload
    origin: dict  # what it was built from, for `index show`
    rebuilds_initramfs: bool = False  # its install scriptlet runs dracut (Fedora's kernel-modules %posttrans)


def _tool(name: str) -> str:
    for d in (*os.environ.get("PATH", "").split(":"), "/usr/sbin", "/sbin"):
        candidate = os.path.join(d, name) if d else ""
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise KmodguardError(f"'{name}' is not installed", hint="install the kmod package (it provides depmod)")


def modules_dir_of(root: Path, kver: str) -> Path:
    for sub in ("lib/modules", "usr/lib/modules"):
        d = root / sub / kver
        if d.is_dir():
            return d
    raise InvalidInput(f"{root} holds no modules for kernel {kver}",
                       hint=f"expected {root}/lib/modules/{kver} or {root}/usr/lib/modules/{kver}")


MODULE_CAP = 512 * MiB  # one module file (amdgpu.ko is about 20 MiB, uncompressed with debug info 300)
CONF_CAP = MiB  # one modprobe.d file
DEPMOD_TIMEOUT = 600  # seconds for depmod on one package (2,000 modules take under a second)


def _where(source: PackageSource | None, path: str | os.PathLike) -> str:
    """How an error names a file of the payload: inside the RPM it came from (the extracted copy is
    a temporary directory, gone when the user reads the message), else its own path."""
    rpm = (source.origin or {}).get("from-rpm") if source is not None else None
    if rpm is None:
        return str(path)
    try:
        rel = os.path.relpath(path, source.root)
    except ValueError:
        rel = str(path)
    return f"{rpm} (its file /{rel})"


def _find_modules(mdir: Path, source: PackageSource | None = None) -> list[str]:
    """The module files under mdir. Each must be (or link to: the user chose this tree, and a tree
    of links such as `cp -rs` makes is a fair payload) a regular file, not a FIFO or device
    (depmod and libkmod open it and would block or read without end), of at most MODULE_CAP
    bytes. os.walk does not descend into linked directories.

    A link (whatever it may lead to) is checked here; a plain regular file (the directory entry
    says so, no stat needed) is checked when _stage opens it to read its .modinfo. The first
    refusal in walk order is the one reported."""
    found: list[str] = []
    plain: list[str] = []
    try:
        _walk_modules(os.fspath(mdir), found, plain, source)
    except InvalidInput:
        check_modules(plain, source)  # a plain file before the refused one is refused first
        raise
    return found


def check_modules(paths: list[str], source: PackageSource | None = None) -> None:
    """Refuse the first of paths that is not a readable regular file within MODULE_CAP (as the walk does)."""
    for path in paths:
        _check_module(path, os.stat, source)


def _check_module(path: str, stat_of, source: PackageSource | None) -> None:
    """A module that stat shows to be a readable regular file within the cap is taken as is
    (open_regular's open, fstat and close, 2,000 times, were 14 ms); anything else goes to
    regular_file, which refuses it."""
    try:
        st = stat_of(path)
        ok = stat.S_ISREG(st.st_mode) and st.st_size <= MODULE_CAP and os.access(path, os.R_OK)
    except OSError:
        ok = False
    if not ok:
        regular_file(path, follow=True, cap=MODULE_CAP, error_class=InvalidInput,
                     hint=f"a module must be a regular file: {_where(source, path)} is refused")


def _walk_modules(directory: str, found: list[str], plain: list[str], source: PackageSource | None) -> None:
    """os.walk's order and choices (sorted names, a directory's files before its subdirectories,
    linked directories listed but not entered, unreadable directories skipped), in one scandir a
    directory: this runs before depmod can start."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    subdirs = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            try:
                if not entry.is_symlink():
                    subdirs.append(entry.path)
            except OSError:
                pass
            continue
        if not entry.name.endswith(MODULE_SUFFIXES):
            continue
        try:
            is_plain = entry.is_file(follow_symlinks=False)  # from the directory entry's type
        except OSError:
            is_plain = False
        if is_plain:
            plain.append(entry.path)
        else:
            _check_module(entry.path, lambda _: entry.stat(), source)
        found.append(entry.path)
    for sub in subdirs:
        _walk_modules(sub, found, plain, source)


STAGE_PARENTS = ("/dev/shm",)  # tmpfs, where the stand-ins are made (else the work directory)


def _stage(stage: Path, modules: list[str], kver: str, source: PackageSource | None) -> tuple[Path, list]:
    """A tree for depmod in stage (_stage_root): for each module a stand-in that
    holds only its .modinfo (modinfo_elf), or, for a module not read here (compressed), a link to
    it; and the empty files depmod insists on. Its output lands there too. (2,002 small files take
    11 ms on tmpfs and up to half a second on a disk mounted with `discard`.)

    Each module is opened once, and refused (as check_modules refuses it) unless it is a readable
    regular file within MODULE_CAP. Returns the stage's module directory and, for each module
    in order, (path, its .modinfo bytes or None, its size). A module whose name another one has
    is not staged: _read_modinfo refuses the pair, after every other refusal, as it always did."""
    from . import modinfo, modinfo_elf

    stage_mdir = stage / "lib" / "modules" / kver
    staged = []
    names = set()
    where = os.fspath(stage_mdir)
    try:
        stage_mdir.mkdir(parents=True)
        for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            (stage_mdir / f).touch()
        for path in modules:
            found, size = _open_module(path, modinfo.section, source)
            staged.append((path, found and found[1], size))
            name = modinfo.modname(path)
            if name in names:
                continue
            names.add(name)
            target = os.path.join(where, os.path.basename(path))
            if found is None:
                os.symlink(os.path.abspath(path), target)
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, modinfo_elf.build(*found))
            finally:
                os.close(fd)
    except OSError as exc:
        raise KmodguardError(f"cannot stage the modules for depmod in {stage}: {exc.strerror}",
                             hint=f"free space in {stage.parent} and retry") from None
    return stage_mdir, staged


def _open_module(path: str, section, source: PackageSource | None):
    """section(fd, size) of the module at path (an uncompressed one) and its size, once it is
    known to be a readable regular file within MODULE_CAP; else refused by _check_module."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO swapped in: no wait
    except OSError:
        _check_module(path, os.stat, source)
        return None, 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MODULE_CAP:
            _check_module(path, lambda _: st, source)
        if not path.endswith(".ko"):
            return None, st.st_size
        try:
            return section(fd, st.st_size), st.st_size
        except OSError:
            return None, st.st_size  # libkmod reads it, and words the error
    finally:
        os.close(fd)


STAGE_PREFIX = "kmodguard-stage"
STALE_AFTER = 60  # seconds: a stage this old that no build holds was left by a killed one


def _stage_root(work: Path) -> tuple[Path, int | None]:
    """A new private directory in the first of STAGE_PARENTS that takes one, else in work; and
    the descriptor whose lock marks it as in use until the build closes it (a killed build's
    lock goes with it: the next build removes what it left on tmpfs)."""
    import fcntl

    for parent in STAGE_PARENTS:
        try:
            _remove_stale_stages(parent)
            stage = _private_dir(Path(parent), STAGE_PREFIX)
        except OSError:
            continue
        try:
            fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return stage, None  # unlocked, it is still this build's until removed
        fcntl.flock(fd, fcntl.LOCK_EX)  # new and private: no one else holds it
        return stage, fd
    return _private_dir(work, "stage"), None


def _remove_stale_stages(parent: str) -> None:
    """Remove the stages of killed builds from parent: directories of this user's, named as
    _stage_root names them, older than STALE_AFTER, whose lock no build holds. Anything else in a
    shared directory, a link or another user's file among them, is left alone."""
    import fcntl
    import shutil

    now = time.time()
    for entry in os.scandir(parent):
        if not entry.name.startswith(STAGE_PREFIX + "."):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or now - st.st_ctime < STALE_AFTER:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # refused while a build runs in it
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def _modprobe_files(root: Path) -> list[Path]:
    """The payload's modprobe.d/*.conf; links and special files among them are left out (a package's
    own configuration is plain files; a link could name anything on this machine)."""
    return sorted(f for d in MODPROBE_DIRS if (root / d).is_dir() and not (root / d).is_symlink()
                  for f in (root / d).glob("*.conf") if f.is_file() and not f.is_symlink())


def build_package(index_root: Path, kver: str, source: PackageSource, progress=None) -> store.PackageIndex:
    """Index one package's modules for kernel kver and publish it under index_root."""
    return build_packages(index_root, [(kver, source)], progress, announce=False)[0]


def build_packages(index_root: Path, items: list[tuple[str, PackageSource]], progress=None,
                   announce: bool = True) -> list[store.PackageIndex]:
    """Index several packages, all or nothing: every one is staged first, and only when all are
    built are they published. One bad package leaves every index as it was."""
    for kver, source in items:
        store.valid_name("package name", source.name)
        store.valid_name("kernel version", kver)
    make_dir(index_root)
    staged = []
    try:
        for kver, source in items:
            if progress and announce:
                progress(f"indexing {source.name} {source.version} for kernel {kver}")
            work = _private_dir(index_root, f".build-{source.name}")
            staged.append((kver, source, work))
            _stage_package(kver, source, work, progress)
        links = [store.publish(index_root, kver, source.name, work / "index") for kver, source, work in staged]
    finally:
        import shutil

        for _, _, work in staged:
            shutil.rmtree(work, ignore_errors=True)
    return [store.PackageIndex(link, kver) for link, (kver, _, _) in zip(links, staged)]


def _private_dir(parent: Path, prefix: str) -> Path:
    """A new directory of this process's own in parent (what tempfile.mkdtemp makes, without
    importing tempfile and random: 2 ms before depmod could start). Safe in a shared directory
    such as /dev/shm: mkdir makes a new one or fails, and no one else may enter it."""
    while True:
        work = Path(parent) / f"{prefix}.{os.urandom(6).hex()}"
        try:
            work.mkdir(mode=0o700)
            return work
        except FileExistsError:
            continue


def _stage_package(kver: str, source: PackageSource, work: Path, progress) -> None:
    """Build one package's index directory in work/index (not yet published; names checked by
    build_packages)."""
    mdir = modules_dir_of(source.root, kver)
    modules = _find_modules(mdir, source)
    if not modules:
        raise InvalidInput(f"{_where(source, mdir)} holds no kernel modules (.ko, .ko.xz, .ko.zst)")
    stage, lock = _stage_root(work)
    try:
        _index_staged(stage, kver, source, mdir, modules, work, progress)
    finally:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _index_staged(stage: Path, kver: str, source: PackageSource, mdir: Path, modules: list[str], work: Path,
                  progress) -> None:
    stage_mdir, sections = _stage(stage, modules, kver, source)
    emptyconf = work / "depmod.d"
    emptyconf.mkdir()
    depmod = process.start([_tool("depmod"), "-C", str(emptyconf), "-b", str(stage), kver],
                           DEPMOD_TIMEOUT, text=False)  # runs beside _read_modinfo
    out = work / "index"
    deferred = None
    try:
        with no_cyclic_gc():  # records hold no cycles; the passes would take CPU from depmod
            records = _read_modinfo(stage_mdir, sections, mdir, progress, source)
            # compressed and written while depmod may still run: off the critical path
            packed = _packed(records)
            # what judging reads of the table, apart: explain need not decompress 1 MB for it
            packed_firmware = _packed({name: r["firmware"] for name, r in records.items() if r["firmware"]})
        try:
            conf_files, blacklist = _own_files(out, packed, packed_firmware, source, stage_mdir)
        except Exception as exc:
            deferred = exc  # reported after depmod's own failure, as when this ran after depmod
    finally:
        try:
            ran = depmod.result()
        except process.CommandTimedOut:
            raise KmodguardError(f"depmod did not finish within {DEPMOD_TIMEOUT} s on {source.name}") from None
    if ran.returncode != 0:
        said = ran.stderr.decode(errors='replace').strip().replace(str(stage), "")[:2000]
        raise KmodguardError(f"depmod failed on {source.name} ({_where(source, source.root)}): {said}")
    if deferred is not None:
        raise deferred

    _write_synced(out / "modules.alias.bin", (stage_mdir / "modules.alias.bin").read_bytes())
    # A package index answers aliases only: an empty index (depmod's own, for the empty
    # modules.builtin) stands in for the dependency and built-in tables.
    empty = (stage_mdir / "modules.builtin.bin").read_bytes()
    for name in store.KMOD_FILES[1:]:
        (out / name).write_bytes(empty)
    meta = {
        "format": store.FORMAT,
        "version": store.VERSION,
        "kernel": kver,
        "package": {"name": source.name, "version": source.version, "request": source.request,
                    "rebuilds_initramfs": source.rebuilds_initramfs},
        "blacklist": {"files": [f.name for f in conf_files], "modules": blacklist},
        "modules": len(records),
        "built": time.time(),
        "source": source.origin,
    }
    store.write_meta(out, meta)  # last: its "files" and its own digest cover everything above


def _packed(table: dict) -> bytes:
    """A table of the index as compact, sorted JSON, xz-compressed. Preset 0: it runs beside depmod,
    and on Fedora's kernel-modules (1 MB of JSON) takes half the CPU time of preset 1 (25 ms, not
    50) for 4 KB more."""
    import lzma

    return lzma.compress(json.dumps(table, separators=(",", ":"), sort_keys=True).encode(), preset=0)


def _own_files(out: Path, packed: bytes, packed_firmware: bytes, source: PackageSource,
               stage_mdir: Path) -> tuple[list[Path], list[str]]:
    """The index's files that do not come from depmod (the module and firmware tables, the package's modprobe.d),
    written and fsynced while depmod runs, so that publish's fsync of them finds nothing to do.
    Returns the modprobe.d files and the modules they blacklist."""
    out.mkdir()
    _write_synced(out / store.MODULES_FILE, packed)
    _write_synced(out / store.FIRMWARE_FILE, packed_firmware)
    conf_files = _modprobe_files(source.root)
    blacklist: list[str] = []
    if conf_files:
        (out / store.MODPROBE_DIR).mkdir()
        for f in conf_files:
            data = read_capped(f, CONF_CAP, follow=False, error_class=InvalidInput,
                               hint=f"{_where(source, f)} is refused")
            _write_synced(out / store.MODPROBE_DIR / f.name, data)
        from ..kmod import Context

        blacklist = sorted(Context(stage_mdir, [str(out / store.MODPROBE_DIR)]).blacklist())
    # loaded now rather than after depmod (OpenSSL's libcrypto is a few ms): write_meta's
    # checksums and publish's generation names need them
    import hashlib  # noqa: F401
    import secrets  # noqa: F401

    return conf_files, blacklist


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_modinfo(stage_mdir: Path, sections: list, mdir: Path, progress, source=None) -> dict:
    """Every module's modinfo while depmod runs on the other core: from the .modinfo bytes _stage
    read, else (compressed, unusual) by libkmod."""
    from . import modinfo

    ctx = None  # libkmod, for the modules _stage could not read (compressed ones): made when needed
    records = {}
    prefix = len(str(mdir).rstrip("/")) + 1  # plain string slicing: pathlib's relative_to is slow here
    for i, (path, raw, size) in enumerate(sections, 1):
        if raw is not None:
            info = modinfo.from_section(path, raw, size)
        else:
            if ctx is None:
                from ..kmod import Context

                ctx = Context(stage_mdir, [])
            try:
                info = ctx.module_info(path)
            except KmodguardError as exc:
                raise InvalidInput(f"{_where(source, path)} is not a readable kernel module: "
                                   f"{str(exc).replace(path, 'it')}") from None
        if info.name in records:
            raise InvalidInput(f"module {info.name} appears twice in {_where(source, mdir)}: "
                               f"{records[info.name]['path']} and {path[prefix:]}")
        records[info.name] = {
            "path": path[prefix:],
            "size": info.size,
            "aliases": list(info.aliases),
            "firmware": list(info.firmware),
            "depends": list(info.depends),
        }
        if progress and (i % 500 == 0 or i == len(sections)):
            progress(f"read {i}/{len(sections)} modules")
    return records
