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


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Write path through a temporary file renamed over it: readers see old or new, never half.
    durable: fsync the file and the rename (not for files in /run, which no reboot keeps)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.kmodguard-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
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
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
