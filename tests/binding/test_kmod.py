"""The libkmod binding against the real tools on real (synthetic) modules."""

import json
import os
import subprocess
import sys

import pytest

from kmodguard.errors import KmodError
from kmodguard.kmod import Context
from synthetic import ALIAS, KERNEL_MODULES_EXTRA, Module, build_module, depmod


def modprobe_R(root, kver, alias, confdir):
    p = subprocess.run(["modprobe", "-C", str(confdir), "-d", str(root), "-S", kver, "-R", alias],
                       capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else []


@pytest.mark.parametrize("what", ["installed", "blacklisted", "builtin", "gpu", "none"])
def test_lookup_equals_modprobe_R(world, tmp_path, what):
    ctx = Context(world.installed, [])
    root = world.installed.parents[2]
    assert ctx.lookup(ALIAS[what]) == modprobe_R(root, world.kver, ALIAS[what], tmp_path)


def test_lookup_reports_builtin_modules_without_a_path(world):
    ctx = Context(world.installed, [])
    assert ctx.lookup_paths(ALIAS["builtin"]) == (("kmg_builtin", None),)
    [(name, path)] = ctx.lookup_paths(ALIAS["installed"])
    assert name == "kmg_core_nic" and path.endswith("kernel/drivers/kmg/kmg_core_nic.ko")


def test_module_path_is_the_path_a_lookup_gives(world):
    """What judging asks once a module instead of with every lookup (Diagnoser._module_path)."""
    ctx = Context(world.installed, [])
    pairs = {pair for alias in ALIAS.values() for pair in ctx.lookup_paths(alias)}
    assert {path is None for _, path in pairs} == {True, False}  # built-in and installed ones
    for name, path in pairs:
        assert ctx.module_path(name) == path


def test_one_alias_two_modules_normalised_and_deduplicated(tmp_path):
    mods = [Module("kmg-dash", aliases=("usb:v1234p*", "usb:v1234p5678*")), Module("kmg_other", aliases=("usb:v1234p*",))]
    for m in mods:
        build_module(m, tmp_path / "lib/modules/6.0.0-k1", tmp_path / "src")
    depmod(tmp_path, "6.0.0-k1")
    names = Context(tmp_path / "lib/modules/6.0.0-k1", []).lookup("usb:v1234p5678d0000")
    assert sorted(names) == ["kmg_dash", "kmg_other"]  # kmod's names: '-' becomes '_', each once
    oracle = modprobe_R(tmp_path, "6.0.0-k1", "usb:v1234p5678d0000", tmp_path)
    assert len(oracle) == 3  # modprobe lists kmg_dash once per matching alias
    assert set(names) == set(oracle)


def test_lookups_match_in_the_c_locale_as_modprobe_does_and_leave_pythons_locale_alone(tmp_path):
    """In a UTF-8 locale glibc's fnmatch reads '?' as one character, 'é' included; modprobe, which
    never calls setlocale, reads it as one byte. kmodguard must answer as modprobe does."""
    build_module(Module("kmg_q", aliases=("kmg:x?y",)), tmp_path / "lib/modules/6.0.0-k3", tmp_path / "src")
    depmod(tmp_path, "6.0.0-k3")
    probe = ("import json, locale, sys; from kmodguard.kmod import Context\n"
             "ctx = Context(sys.argv[1], [])\n"
             "print(json.dumps([ctx.lookup('kmg:x\\u00e9y'), ctx.lookup('kmg:xzy'), locale.setlocale(locale.LC_CTYPE), "
             "locale.getencoding(), open(sys.argv[1] + '/modules.dep').encoding]))")
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "lib/modules/6.0.0-k3")], env=env,
                         capture_output=True, text=True, check=True).stdout
    multibyte, plain, ctype, encoding, default = json.loads(out)
    assert multibyte == modprobe_R(tmp_path, "6.0.0-k3", "kmg:x\u00e9y", tmp_path) == []
    assert plain == ["kmg_q"]
    assert (ctype, encoding, default) == ("C.UTF-8", "UTF-8", "UTF-8")  # Python's own locale is untouched


def test_blacklist_comes_from_the_given_config_only(world, tmp_path):
    assert "kmg_banned" in Context(world.installed, [str(world.modprobe_d)]).blacklist()
    assert "kmg_banned" not in Context(world.installed, []).blacklist()


@pytest.mark.parametrize("module", KERNEL_MODULES_EXTRA, ids=lambda m: m.filename)
def test_module_info_reads_plain_xz_and_zstd(world, module):
    path = world.packages["kernel-modules-extra"] / "lib/modules" / world.kver / module.subdir / module.filename
    info = Context(world.installed, []).module_info(path)
    assert info.name == module.name
    assert info.aliases == module.aliases
    assert info.size == path.stat().st_size


def test_module_info_has_firmware_and_depends(world):
    gpu = next(world.packages["kernel-modules"].rglob("kmg_gpu.ko"))
    info = Context(world.installed, []).module_info(gpu)
    assert info.firmware == ("kmg/gpu_present.bin", "kmg/gpu_absent.bin")
    assert info.depends == ("kmg_helper",)


def test_errors_become_kmod_errors_with_errno(world, tmp_path):
    garbage = tmp_path / "garbage.ko"
    garbage.write_bytes(b"not an elf file at all")
    with pytest.raises(KmodError) as exc:
        Context(world.installed, []).module_info(garbage)
    assert exc.value.errno > 0 and "garbage.ko" in exc.value.message
    with pytest.raises(KmodError):
        Context(tmp_path / "no-such-dir", []).load_resources()


def test_validate_resources_sees_a_rebuilt_index(tmp_path):
    build_module(Module("kmg_a", aliases=("pci:v0000AAAAd*",)), tmp_path / "lib/modules/6.0.0-k2", tmp_path / "src")
    depmod(tmp_path, "6.0.0-k2")
    ctx = Context(tmp_path / "lib/modules/6.0.0-k2", [])
    ctx.load_resources()
    assert not ctx.resources_changed()
    build_module(Module("kmg_b", aliases=("pci:v0000BBBBd*",)), tmp_path / "lib/modules/6.0.0-k2", tmp_path / "src")
    depmod(tmp_path, "6.0.0-k2")
    assert ctx.resources_changed()
    assert Context(tmp_path / "lib/modules/6.0.0-k2", []).lookup("pci:v0000BBBBd00000001") == ["kmg_b"]
