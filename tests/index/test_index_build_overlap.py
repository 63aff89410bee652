"""The index build overlaps its own work with depmod (issue 16): plain module files are checked
for size and readability as their .modinfo is read for depmod's stand-ins, and the module table
and the package's modprobe.d are written before depmod ends. What is refused, and which refusal is reported first, stay as
when everything ran in order; nothing is published from a refused payload."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kmodguard.errors import InvalidInput
from kmodguard.index import build, store


def _payload(world, tmp_path, name="kernel-modules") -> Path:
    payload = tmp_path / "payload"
    shutil.copytree(world.packages[name], payload, symlinks=True)
    return payload


def _build(world, payload, root, name="kernel-modules"):
    source = build.PackageSource(name, "1", f"{name}-uname-r = {world.kver}", payload, {"from-dir": str(payload)})
    return build.build_package(root, world.kver, source)


def _nothing_published(root: Path, kver: str) -> None:
    assert store.KernelIndex(root, kver).packages == []
    kdir = root / kver
    assert not kdir.exists() or not any(kdir.iterdir())
    assert not [p for p in root.iterdir() if p.name.startswith(".build-")]  # the staging is gone


def _big(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(build.MODULE_CAP + 1)  # sparse


def test_an_oversize_plain_module_is_refused_and_nothing_published(world, tmp_path):
    payload = _payload(world, tmp_path)
    big = next(payload.rglob("*.ko")).with_name("kmg_big.ko")
    _big(big)
    root = tmp_path / "index"
    with pytest.raises(InvalidInput) as exc:
        _build(world, payload, root)
    assert str(big) in exc.value.message and "bytes allowed" in exc.value.message
    _nothing_published(root, world.kver)


@pytest.mark.parametrize("first", ["plain", "fifo"])
def test_the_first_refusal_in_walk_order_is_reported(world, tmp_path, first):
    """A plain file checked late and a FIFO checked before depmod starts, in one directory: the
    one the walk meets first (sorted names) is named, whichever check found it."""
    payload = _payload(world, tmp_path)
    where = next(payload.rglob("*.ko")).parent
    plain, fifo = (where / "kmg_a.ko", where / "kmg_b.ko") if first == "plain" else (where / "kmg_b.ko", where / "kmg_a.ko")
    _big(plain)
    os.mkfifo(fifo)
    root = tmp_path / "index"
    with pytest.raises(InvalidInput) as exc:
        _build(world, payload, root)
    named = plain if first == "plain" else fifo
    assert str(named) in exc.value.message, exc.value.message
    _nothing_published(root, world.kver)


def test_an_oversize_modprobe_file_is_refused_and_nothing_published(world, tmp_path):
    payload = _payload(world, tmp_path, "kernel-modules-extra")
    conf = payload / "etc" / "modprobe.d" / "kmg-huge.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_bytes(b"#" * (build.CONF_CAP + 1))
    root = tmp_path / "index"
    with pytest.raises(InvalidInput) as exc:
        _build(world, payload, root, "kernel-modules-extra")
    assert str(conf) in exc.value.message
    _nothing_published(root, world.kver)


def test_the_published_index_holds_the_module_table_and_modprobe_files(world, tmp_path):
    """Written before depmod ends, they are what index.json's checksums cover."""
    payload = _payload(world, tmp_path, "kernel-modules-extra")
    root = tmp_path / "index"
    pkg = _build(world, payload, root, "kernel-modules-extra")
    names = {p.name for p in (payload / "etc" / "modprobe.d").glob("*.conf")}
    assert names and {f.split("/", 1)[1] for f in pkg.conf_files} == names
    assert set(pkg.checksums) == {*store.KMOD_FILES, store.MODULES_FILE, store.FIRMWARE_FILE, *pkg.conf_files}
    assert len(pkg.modules) == pkg.module_count > 0
    assert pkg.blacklist  # read from the copied modprobe.d, as before
