"""The index build reads modinfo from the ELF section itself (kmodguard/index/modinfo.py); what it
reads must be what libkmod reads, for every module of Debian's real tree, for gcc-built modules
(32-bit too), and for damaged files, which it leaves to libkmod."""

from __future__ import annotations

import os
import subprocess

import pytest

import realtree
import synthetic
from kmodguard.index import modinfo
from kmodguard.kmod import Context


def _libkmod(ctx: Context, path: str):
    return ctx.module_info(path)


@pytest.mark.realtree
def test_every_module_of_the_real_tree_reads_as_libkmod_reads_it():
    tree = realtree.ensure_tree()
    ctx = Context(tree.mdir, [])
    paths = [str(tree.mdir / rel) for rel in realtree._module_files(tree.mdir)]
    assert len(paths) > 4000
    read_here = 0
    for path in paths:
        ours = modinfo.read(path)
        if ours is None:
            assert not path.endswith(".ko"), f"an uncompressed module left to libkmod: {path}"
            continue
        read_here += 1
        assert ours == _libkmod(ctx, path), path
    assert read_here == sum(p.endswith(".ko") for p in paths)


@pytest.mark.parametrize("bits", ["-m64", "-m32"])
def test_gcc_built_modules_read_as_libkmod_reads_them(tmp_path, bits):
    m = synthetic.Module("kmg-odd_name", aliases=("pci:v0000ABCDd*sv*sd*bc*sc*i*", "usb:v1234p*d*", "virtio:d00000001v*"),
                         firmware=("kmg/a.bin", "kmg/b.bin"), depends=("kmg-dep", "kmg_other"))
    src = tmp_path / "m.c"
    src.write_text(synthetic._c_source(m) + 'static const char e[] __attribute__((section(".modinfo"),used)) = '
                   '"noequals\\0\\0alias=after-empty\\0firmware=caf\\xc3\\xa9\\xff.bin";\n')
    ko = tmp_path / "kmg-odd_name.ko"
    res = subprocess.run(["gcc", bits, "-c", "-O0", "-o", str(ko), str(src)], capture_output=True, text=True)
    if res.returncode != 0 and bits == "-m32":
        pytest.fail(f"gcc -m32 is needed here (gcc-multilib): {res.stderr[-300:]}")
    ours = modinfo.read(str(ko))
    theirs = _libkmod(Context(tmp_path, []), str(ko))
    assert ours == theirs
    assert ours.name == "kmg_odd_name" and "after-empty" in ours.aliases
    assert ours.depends == ("kmg_dep", "kmg_other")


def test_compressed_and_damaged_files_are_left_to_libkmod(tmp_path):
    good = synthetic.build_module(synthetic.Module("kmg_a", aliases=("pci:v1*",)), tmp_path / "m", tmp_path / "w")
    data = good.read_bytes()
    cases = {
        "empty.ko": b"",
        "text.ko": b"not an ELF file at all\n" * 10,
        "truncated.ko": data[:200],
        "no-sections.ko": data[:0x3C] + b"\0\0" + data[0x3E:],  # e_shnum = 0
        "offsets-past-the-end.ko": data[:0x28] + (len(data) * 4).to_bytes(8, "little") + data[0x30:],
    }
    ctx = Context(tmp_path, [])
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert modinfo.read(str(path)) is None, name
    xz = synthetic.build_module(synthetic.Module("kmg_x", aliases=("pci:v2*",), compress="xz"), tmp_path / "m",
                                tmp_path / "w")
    assert modinfo.read(str(xz)) is None
    assert _libkmod(ctx, str(xz)).aliases == ("pci:v2*",)  # libkmod still reads it
    assert modinfo.read(str(tmp_path / "missing.ko")) is None
    fifo = tmp_path / "fifo.ko"
    os.mkfifo(fifo)
    assert modinfo.read(str(fifo)) is None  # not blocked on
