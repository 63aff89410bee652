"""The package index on disk: side by side packages, atomic replacement, and damage handled clearly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthetic import ALIAS


def pkgdir(env, kver, name) -> Path:
    return Path(env["KMODGUARD_INDEX_DIR"]) / kver / name


def test_two_packages_side_by_side(indexed, world):
    doc = indexed("index", "show", "--json", "--kver", world.kver, check_code=0).json
    by_name = {p["package"]: p for p in doc["packages"]}
    assert set(by_name) == {"kernel-modules", "kernel-modules-extra"}
    assert by_name["kernel-modules"]["modules"] == 7
    assert by_name["kernel-modules"]["request"] == f"kernel-modules-uname-r = {world.kver}"
    assert by_name["kernel-modules-extra"]["blacklisted"] == ["kmg_extra"]
    assert 0 < by_name["kernel-modules"]["size_bytes"] < 64 * 1024
    listing = indexed("index", "list", "--json", check_code=0).json
    assert [k["kernel"] for k in listing["kernels"]] == [world.kver]


def test_show_modules_records_path_size_aliases_firmware(indexed, world):
    doc = indexed("index", "show", "--json", "--modules", "--kver", world.kver, "kernel-modules", check_code=0).json
    mods = {m["module"]: m for m in doc["packages"][0]["module_list"]}
    gpu = mods["kmg_gpu"]
    assert gpu["path"] == "kernel/drivers/gpu/drm/kmg/kmg_gpu.ko"
    assert gpu["firmware"] == ["kmg/gpu_present.bin", "kmg/gpu_absent.bin"]
    assert gpu["depends"] == ["kmg_helper"]
    assert gpu["aliases"] == ["pci:v0000BBBBd00000001sv*sd*bc03sc*i*"]
    assert gpu["size"] > 0


def test_the_firmware_table_is_the_module_tables_and_an_index_built_before_it_judges_alike(indexed, world):
    from test_hostile_files import rewrite_meta

    from kmodguard.index.store import FIRMWARE_FILE, KernelIndex

    doc = indexed("index", "show", "--json", "--modules", "--kver", world.kver, "kernel-modules", check_code=0).json
    table = {m["module"]: tuple(m["firmware"]) for m in doc["packages"][0]["module_list"]}
    [pkg] = [p for p in KernelIndex(Path(indexed.env["KMODGUARD_INDEX_DIR"]), world.kver).packages
             if p.name == "kernel-modules"]
    assert {m: pkg.firmware_of(m) for m in table} == table and table["kmg_gpu"]
    assert pkg._firmware.keys() == {m for m, names in table.items() if names}  # only modules that name some
    gpu = indexed("explain", "--json", "--kver", world.kver, ALIAS["gpu"], check_code=3).json["results"][0]
    assert gpu["candidates"][0]["firmware_missing"] == ["kmg/gpu_absent.bin"]
    (pkg.path / FIRMWARE_FILE).unlink()  # as the build wrote it before: the module table answers
    rewrite_meta(pkg.path, lambda m: m["files"].pop(FIRMWARE_FILE))
    again = indexed("explain", "--json", "--kver", world.kver, ALIAS["gpu"], check_code=3).json["results"][0]
    assert again == gpu


def test_rebuild_replaces_atomically_and_leaves_no_generations(indexed, world):
    link = pkgdir(indexed.env, world.kver, "kernel-modules")
    first = os.readlink(link)
    indexed("index", "build", "--kver", world.kver, "--package", "kernel-modules", "--version", "6.1.0-2.kmg",
            "--from-dir", str(world.packages["kernel-modules"]), check_code=0)
    assert os.readlink(link) != first
    assert sorted(p.name for p in link.parent.iterdir() if p.name.startswith(".kernel-modules.")) == [os.readlink(link)]
    out = indexed("explain", "--json", "--kver", world.kver, ALIAS["gpu"], check_code=3).json
    assert out["results"][0]["candidates"][0]["version"] == "6.1.0-2.kmg"


def damage_meta(path: Path, text: str):
    meta = path.resolve() / "index.json"
    meta.write_text(text)


@pytest.mark.parametrize("damage, message", [
    ("{not json", "not readable JSON"),
    ('{"format": "something-else", "version": 1}', "is not a kmodguard index"),
    ('{"format": "kmodguard-index", "version": 99}', "format version 99"),
    ("", "not readable JSON"),
])
def test_damaged_metadata_is_reported_and_the_other_package_still_works(indexed, world, damage, message):
    damage_meta(pkgdir(indexed.env, world.kver, "kernel-modules"), damage)
    show = indexed("index", "show", "--kver", world.kver)
    assert show.returncode == 1
    assert message in show.stdout
    # kernel-modules-extra is intact and still answers
    out = indexed("explain", "--json", "--kver", world.kver, ALIAS["extra_xz"], check_code=3).json
    assert out["results"][0]["candidates"][0]["package"] == "kernel-modules-extra"
    status = indexed("status", "--json", "--kver", world.kver, check_code=0).json
    assert any(message in e["message"] for e in status["environment"]["index"]["errors"])


def test_truncated_alias_table_is_caught_by_its_checksum(indexed, world):
    table = pkgdir(indexed.env, world.kver, "kernel-modules").resolve() / "modules.alias.bin"
    table.write_bytes(table.read_bytes()[:40])
    show = indexed("index", "show", "--json", "--kver", world.kver)
    assert show.returncode == 1
    assert "modules.alias.bin does not match its checksum" in show.json["errors"][0]["message"]


def test_garbage_in_every_file_never_crashes(indexed, world):
    d = pkgdir(indexed.env, world.kver, "kernel-modules").resolve()
    for f in d.iterdir():
        if f.is_file():
            f.write_bytes(os.urandom(64))
    res = indexed("explain", "--json", "--kver", world.kver, ALIAS["gpu"], check_code=0)
    # the driver may be in the broken package: kmodguard cannot tell, and says so
    assert res.json["results"][0]["verdict"] == "unindexed"
    assert "kernel-modules" in res.json["results"][0]["reason"]
    extra = indexed("explain", "--json", "--kver", world.kver, ALIAS["extra_xz"], check_code=3).json
    assert extra["results"][0]["verdict"] == "missing"


def test_index_filed_under_the_wrong_kernel(indexed, world):
    kdir = Path(indexed.env["KMODGUARD_INDEX_DIR"])
    os.rename(kdir / world.kver, kdir / "6.9.9-other")
    show = indexed("index", "show", "--json", "--kver", "6.9.9-other")
    assert show.returncode == 1
    assert f"is for kernel {world.kver}, not 6.9.9-other" in show.stdout


def test_no_index_means_unindexed(kmodguard, world):
    out = kmodguard("explain", "--json", "--kver", world.kver, ALIAS["gpu"], check_code=0).json
    assert out["results"][0]["verdict"] == "unindexed"
    assert "kmodguard index build" in out["results"][0]["reason"]


@pytest.mark.parametrize("args, code, message", [
    (["--package", "p", "--version", "1", "--from-dir", "/nonexistent"], 2, "no such directory"),
    (["--from-dir", "/tmp"], 2, "--from-dir needs --package"),
    (["--package", "p", "--from-dir", "/tmp"], 2, "and --version"),
    (["--package", "../evil", "--version", "1", "--from-dir", "{payload}"], 2, "is not a package request"),
    (["--package", "p", "--version", "1", "--from-dir", "{empty}"], 2, "holds no modules for kernel"),
])
def test_build_refuses_bad_requests_clearly(kmodguard, world, tmp_path, args, code, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(payload=world.packages["kernel-modules"], empty=tmp_path / "empty") for a in args]
    res = kmodguard("index", "build", "--json", "--kver", world.kver, *args)
    assert res.returncode == code, res.stderr
    assert message in res.json["error"]["message"] + res.json["error"].get("hint", "")
    assert not list(Path(kmodguard.env["KMODGUARD_INDEX_DIR"]).glob("*/p"))


def test_a_killed_build_never_leaves_a_broken_index(indexed, world):
    """SIGKILL at many points of a rebuild: the index is always the old one or the new one, never half."""
    args = [sys.executable, "-m", "kmodguard", "index", "build", "--kver", world.kver, "--package", "kernel-modules",
            "--version", "6.1.0-9.kmg", "--from-dir", str(world.packages["kernel-modules"])]
    for delay in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4):
        proc = subprocess.Popen(args, env=indexed.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        show = indexed("index", "show", "--json", "--kver", world.kver, "kernel-modules")
        assert show.returncode == 0, show.stdout
        assert show.json["packages"][0]["version"] in ("6.1.0-1.kmg", "6.1.0-9.kmg")
    indexed("index", "build", "--kver", world.kver, "--package", "kernel-modules", "--version", "6.1.0-10.kmg",
            "--from-dir", str(world.packages["kernel-modules"]), check_code=0)
    out = indexed("explain", "--json", "--kver", world.kver, ALIAS["gpu"], check_code=3).json
    assert out["results"][0]["candidates"][0]["version"] == "6.1.0-10.kmg"


def test_remove(indexed, world):
    indexed("index", "remove", "--kver", world.kver, "kernel-modules-extra", check_code=0)
    doc = indexed("index", "show", "--json", "--kver", world.kver, check_code=0).json
    assert [p["package"] for p in doc["packages"]] == ["kernel-modules"]
    assert indexed("index", "remove", "--kver", world.kver, "kernel-modules-extra").returncode == 2


def test_derive_spells_the_new_kernel_as_the_package_manager_spells_the_old(kmodguard, world):
    """Debian's kernel release 6.1.0-kmg1-amd64 cannot be an RPM version: its RPMs provide
    kernel-modules-uname-r = 6.1.0-kmg1.amd64. The request derived for the next kernel is built
    from the allow-listed package name and NEW spelled alike, not NEW as uname prints it; a
    Debian package carries the kernel in its name; a package not allow-listed gets none."""
    old, new = world.kver, world.kver.replace("kmg1", "kmg2")
    assert old == "6.1.0-kmg1-amd64"
    payload = str(world.packages["kernel-modules"])
    for package, version, request in [
            ("kernel-modules", "6.1.0-kmg1", "kernel-modules-uname-r = 6.1.0-kmg1.amd64"),
            (f"linux-modules-extra-{old}", f"{old}.1", f"linux-modules-extra-{old}"),
            ("kmg-vendor-modules", "1.0", f"kmg-vendor-modules-uname-r = {old}")]:
        kmodguard("index", "build", "--kver", old, "--package", package, "--version", version, "--request", request,
                  "--from-dir", payload, check_code=0)
    doc = kmodguard("index", "derive", "--kver", new, "--from-kver", old, "--json", check_code=0).json
    built = {p["package"]: (p["request"], p["version"]) for p in doc["built"]}
    assert built == {"kernel-modules": ("kernel-modules-uname-r = 6.1.0-kmg2.amd64", "6.1.0-kmg2"),
                     f"linux-modules-extra-{new}": (f"linux-modules-extra-{new}", "unknown")}
    shown = kmodguard("index", "show", "--kver", new, "--json", check_code=0).json
    assert {p["package"]: p["request"] for p in shown["packages"]} == {k: v[0] for k, v in built.items()}
