"""depmod indexes stand-ins that hold only each module's .modinfo (kmodguard/index/modinfo_elf.py),
staged on tmpfs. The alias index must be byte for byte the one depmod writes from the real
modules, the stand-ins must read as the modules do (libkmod and modinfo.py, for every ELF class
and byte order), and the stage must be gone after every build, also one that is refused or one
for which tmpfs is not available."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import realtree
import synthetic
from kmodguard.errors import InvalidInput
from kmodguard.index import build, modinfo, modinfo_elf
from kmodguard.kmod import Context


def _depmod_alias_index(mdir: Path, kver: str, base: Path) -> bytes:
    """depmod's own modules.alias.bin for the modules under mdir (a tree of links to them)."""
    stage = base / "lib" / "modules" / kver
    stage.mkdir(parents=True)
    for entry in os.scandir(mdir):
        if entry.is_dir(follow_symlinks=False) or entry.name.endswith(build.MODULE_SUFFIXES):
            os.symlink(entry.path, stage / entry.name)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        (stage / f).touch()
    (base / "conf").mkdir()
    subprocess.run(["depmod", "-C", str(base / "conf"), "-b", str(base), kver], check=True)
    return (stage / "modules.alias.bin").read_bytes()


def _build(root: Path, kver: str, payload: Path, name: str = "pkg"):
    source = build.PackageSource(name, "1", f"{name} = 1", payload, {"from-dir": str(payload)})
    return build.build_package(root, kver, source)


def _stages() -> set[str]:
    return {p for p in os.listdir(build.STAGE_PARENTS[0]) if p.startswith("kmodguard-stage.")}


@pytest.mark.realtree
def test_the_alias_index_of_the_real_tree_is_depmods_own(tmp_path):
    tree = realtree.ensure_tree()
    before = _stages()
    pkg = _build(tmp_path / "index", tree.kver, tree.root)
    assert pkg.module_count > 4000
    ours = (pkg.path / "modules.alias.bin").read_bytes()
    assert ours == _depmod_alias_index(tree.mdir, tree.kver, tmp_path / "depmod")
    assert _stages() <= before  # none of its own left (a stale one may have gone)


def test_a_tree_with_compressed_modules_indexes_as_depmod_indexes_it(world, tmp_path):
    """Compressed modules are staged as links to themselves, beside the stand-ins."""
    payload = world.packages["kernel-modules-extra"]
    mdir = build.modules_dir_of(payload, world.kver)
    assert {p.suffix for p in mdir.rglob("*.ko*")} >= {".ko", ".xz", ".zst"}
    pkg = _build(tmp_path / "index", world.kver, payload)
    assert (pkg.path / "modules.alias.bin").read_bytes() == _depmod_alias_index(mdir, world.kver, tmp_path / "d")


def test_without_tmpfs_the_stage_is_made_beside_the_index(world, tmp_path, monkeypatch):
    payload = world.packages["kernel-modules-extra"]
    mdir = build.modules_dir_of(payload, world.kver)
    monkeypatch.setattr(build, "STAGE_PARENTS", (str(tmp_path / "no-such-dir"),))
    made = []
    private_dir = build._private_dir
    monkeypatch.setattr(build, "_private_dir", lambda parent, prefix: made.append(
        private_dir(parent, prefix)) or made[-1])
    root = tmp_path / "index"
    pkg = _build(root, world.kver, payload)
    assert [(p.parent.parent, p.name.split(".")[0]) for p in made[1:]] == [(root, "stage")]  # in the work dir
    assert (pkg.path / "modules.alias.bin").read_bytes() == _depmod_alias_index(mdir, world.kver, tmp_path / "d")
    assert not [p for p in root.iterdir() if p.name.startswith(".build-")]
    assert not (tmp_path / "no-such-dir").exists()


def test_a_refused_payload_leaves_no_stage(world, tmp_path):
    payload = tmp_path / "payload"
    shutil.copytree(world.packages["kernel-modules"], payload, symlinks=True)
    first = next(payload.rglob("*.ko"))
    twin = first.parent / "sub"
    twin.mkdir()
    shutil.copyfile(os.path.realpath(first), twin / first.name)  # the same module name twice
    before = _stages()
    with pytest.raises(InvalidInput) as exc:
        _build(tmp_path / "index", world.kver, payload)
    assert "appears twice" in exc.value.message
    assert _stages() <= before  # none of its own left (a stale one may have gone)


@pytest.mark.parametrize("bits", ["-m64", "-m32"])
def test_a_stand_in_reads_as_its_module(tmp_path, bits):
    m = synthetic.Module("kmg_stand", aliases=("pci:v0000ABCDd*sv*sd*bc*sc*i*", "usb:v1234p*d*"),
                         firmware=("kmg/a.bin",), depends=("kmg_dep",))
    src = tmp_path / "m.c"
    src.write_text(synthetic._c_source(m))
    ko = tmp_path / "kmg_stand.ko"
    res = subprocess.run(["gcc", bits, "-c", "-O0", "-o", str(ko), str(src)], capture_output=True, text=True)
    if res.returncode != 0 and bits == "-m32":
        pytest.fail(f"gcc -m32 is needed here (gcc-multilib): {res.stderr[-300:]}")
    stand_in = tmp_path / "stand-in" / "kmg_stand.ko"
    stand_in.parent.mkdir()
    with open(ko, "rb") as f:
        stand_in.write_bytes(modinfo_elf.build(*modinfo.section(f.fileno(), ko.stat().st_size)))
    ctx = Context(tmp_path, [])
    original, copy = ctx.module_info(str(ko)), ctx.module_info(str(stand_in))
    assert (copy.name, copy.aliases, copy.firmware, copy.depends) == \
        (original.name, original.aliases, original.firmware, original.depends)
    assert modinfo.read(str(stand_in))._replace(path="", size=0) == modinfo.read(str(ko))._replace(path="", size=0)


def test_a_big_endian_stand_in_reads_as_written(tmp_path):
    """A big-endian module (s390x): its header, as modinfo.section returns it, keeps the byte order."""
    raw = b"alias=ccw:t3088m08*\0firmware=kmg/be.bin\0depends=\0"
    ident = b"\x7fELF\x02\x02\x01" + bytes(9)
    stand_in = tmp_path / "kmg_be.ko"
    stand_in.write_bytes(modinfo_elf.build(ident + struct.pack(">HH", 1, 22), raw))
    with open(stand_in, "rb") as f:
        header, section = modinfo.section(f.fileno(), stand_in.stat().st_size)
    assert section == raw and header[:16] == ident
    info = Context(tmp_path, []).module_info(str(stand_in))
    assert info.aliases == ("ccw:t3088m08*",) and info.firmware == ("kmg/be.bin",)


def test_a_killed_builds_stage_is_removed_by_the_next_build(world, tmp_path, monkeypatch):
    """A stage no build holds (its build was killed) goes; one a running build holds, a link and
    another user's directory of the same name stay."""
    import fcntl

    monkeypatch.setattr(build, "STALE_AFTER", 0)
    shm = Path(build.STAGE_PARENTS[0])
    stale = build._private_dir(shm, build.STAGE_PREFIX)
    (stale / "kmg_left.ko").write_bytes(b"x" * 4096)
    held = build._private_dir(shm, build.STAGE_PREFIX)
    held_fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held_fd, fcntl.LOCK_EX)
    foreign = build._private_dir(shm, build.STAGE_PREFIX)
    os.chown(foreign, 65534, 65534)
    link = shm / f"{build.STAGE_PREFIX}.kmglink"
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("")
    link.symlink_to(target)
    try:
        _build(tmp_path / "index", world.kver, world.packages["kernel-modules-extra"])
        assert not stale.exists()
        assert held.is_dir() and foreign.is_dir() and (target / "keep").exists()
    finally:
        os.close(held_fd)
        for d in (stale, held, foreign):
            shutil.rmtree(d, ignore_errors=True)
        link.unlink()
