"""Durable file operations shared by the index store and the initramfs code."""

from __future__ import annotations

import os
import shutil
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
