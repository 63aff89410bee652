"""Durable file operations shared by the index store and the initramfs code."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename in this directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DIR_MODE = 0o755  # state, runtime and index directories: root writes, everyone reads


def make_dir(directory: Path, mode: int = DIR_MODE) -> Path:
    """mkdir -p with an explicit mode for every directory it creates (never the caller's umask);
    directories that exist are left as they are."""
    directory = Path(directory)
    missing = []
    p = directory
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        os.chmod(d, mode)  # mkdir's mode is narrowed by the umask
    return directory


_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_new(tmp: Path, mode: int) -> int:
    """Create a temporary file that is surely new: O_EXCL|O_NOFOLLOW, so a planted file or symlink
    of that name is never written through. A leftover of that name (a crash, or planted) is
    removed first (unlink removes a symlink itself, not what it points to)."""
    try:
        return os.open(tmp, _NEW, mode)
    except FileExistsError:
        os.unlink(tmp)
        return os.open(tmp, _NEW, mode)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Write path through a temporary file renamed over it: readers see old or new, never half.
    durable: fsync the file and the rename (not for files in /run, which no reboot keeps)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.kmodguard-tmp")
    fd = open_new(tmp, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # not narrowed by the umask: the daemon's snapshot is world-readable
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        fsync_dir(path.parent)


def copy_atomic(src: Path, dest: Path, tmp: Path) -> None:
    """Copy src over dest (mode included) through tmp, fsynced, renamed: dest is old or new, never half."""
    import shutil  # not at import: `index build` imports this module before depmod can start

    try:
        fd = open_new(tmp, 0o600)
        with open(fd, "wb") as out, open(src, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
            os.fchmod(out.fileno(), os.stat(source.fileno()).st_mode & 0o7777)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


# --- reading files kmodguard does not control ---------------------------------------------------
#
# An index, a configuration drop-in, an RPM or a module file may be a FIFO (open and read block
# forever), a link to /dev/zero (read never ends) or a link planted to reach another file. Every
# such file is read through read_capped or checked by regular_file: opened with O_NONBLOCK (a FIFO
# opens at once and is then refused), O_NOFOLLOW where its last component must not be a link,
# fstat'ed to be a regular file, and read up to a cap. Errors are KmodguardError subclasses that
# name the file (error_class), never a bare OSError.

MiB = 1 << 20


def _refuse(error_class, path, why: str, hint: str | None):
    return error_class(f"{path}: {why}", hint=hint)


def open_regular(path, *, follow: bool = False, cap: int | None = None, error_class=None,
                 hint: str | None = None) -> int:
    """A read-only descriptor on path, which must be a regular file of at most cap bytes.

    follow=False: the last component must not be a symbolic link (O_NOFOLLOW); links in the
    directories above are followed. The descriptor is blocking again when returned."""
    import errno
    import fcntl
    import stat

    from .errors import KmodguardError

    error_class = error_class or KmodguardError
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            why = "is a symbolic link, which is not followed here" if not follow else "is a symbolic link loop"
            raise _refuse(error_class, path, why, hint) from None
        if exc.errno == errno.ENOENT:
            raise error_class(f"{path}: no such file", hint=hint) from None
        raise _refuse(error_class, path, f"cannot open it: {exc.strerror or exc}", hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
            raise _refuse(error_class, path, f"is {kind}, not a regular file", hint)
        if cap is not None and st.st_size > cap:
            raise _refuse(error_class, path, f"is {st.st_size} bytes, more than the {cap} bytes allowed", hint)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_capped(path, cap: int, *, follow: bool = False, error_class=None, hint: str | None = None) -> bytes:
    """The whole of a regular file of at most cap bytes (see open_regular); at most cap+1 bytes
    are ever read, so a file that grows while it is read is refused, not swallowed."""
    return read_capped_stat(path, cap, follow=follow, error_class=error_class, hint=hint)[0]


def read_capped_stat(path, cap: int, *, follow: bool = False, error_class=None,
                     hint: str | None = None) -> tuple[bytes, os.stat_result]:
    """read_capped, and the fstat of the file it read (its identity, for a cache of facts)."""
    from .errors import KmodguardError

    fd = open_regular(path, follow=follow, cap=cap, error_class=error_class, hint=hint)
    try:
        st = os.fstat(fd)
        chunks, total = [], 0
        while total <= cap:
            try:
                chunk = os.read(fd, min(cap + 1 - total, MiB))
            except OSError as exc:
                raise (error_class or KmodguardError)(f"{path}: cannot read it: {exc.strerror or exc}",
                                                      hint=hint) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > cap:
        raise (error_class or KmodguardError)(f"{path}: is more than the {cap} bytes allowed", hint=hint)
    return b"".join(chunks), st


def sha256_capped(path, cap: int, *, follow: bool = False, error_class=None,
                  hint: str | None = None) -> tuple[str, os.stat_result]:
    """sha256 of a regular file of at most cap bytes, read in pieces (see open_regular), and the
    fstat of the file it read."""
    import hashlib

    from .errors import KmodguardError

    fd = open_regular(path, follow=follow, cap=cap, error_class=error_class, hint=hint)
    h, total = hashlib.sha256(), 0
    try:
        st = os.fstat(fd)
        while True:
            chunk = os.read(fd, MiB)
            if not chunk:
                break
            total += len(chunk)
            if total > cap:
                raise (error_class or KmodguardError)(f"{path}: is more than the {cap} bytes allowed", hint=hint)
            h.update(chunk)
    except OSError as exc:
        raise (error_class or KmodguardError)(f"{path}: cannot read it: {exc.strerror or exc}", hint=hint) from None
    finally:
        os.close(fd)
    return h.hexdigest(), st


def regular_file(path, *, follow: bool = False, cap: int | None = None, error_class=None,
                 hint: str | None = None) -> None:
    """Check, without reading, that path is a regular file (for files another program opens:
    libkmod, depmod)."""
    os.close(open_regular(path, follow=follow, cap=cap, error_class=error_class, hint=hint))
