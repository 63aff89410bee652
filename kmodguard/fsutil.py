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
