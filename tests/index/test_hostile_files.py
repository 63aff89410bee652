"""Hostile files (issue 13): a FIFO, a link to /dev/zero, an oversize file, a symlink loop, deep
nesting, NaN, a tampered index, a foreign package link, an unreadable index directory. Each is
reported as that one bad piece, in a few seconds (a subprocess timeout makes a hang fail), and
the rest of the command still works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from synthetic import ALIAS

QUICK = 20  # seconds: a hang fails the test instead of blocking it


def pkgdir(env, kver, name) -> Path:
    return Path(env["KMODGUARD_INDEX_DIR"]) / kver / name


def rewrite_meta(gen: Path, change) -> None:
    """Edit index.json and re-seal it with a valid digest, as a careful attacker would."""
    from kmodguard.index import store

    meta = json.loads((gen / "index.json").read_text())
    change(meta)
    meta[store.DIGEST_KEY] = store.meta_digest(meta)
    (gen / "index.json").write_text(json.dumps(meta))


def judged_with_one_bad_index(indexed, world, message: str):
    """kernel-modules is unusable, named with message; kernel-modules-extra still answers."""
    show = indexed("index", "show", "--json", "--kver", world.kver, timeout=QUICK)
    assert show.returncode == 1
    errors = {e["package"]: e["message"] for e in show.json["errors"]}
    assert message in errors["kernel-modules"], errors
    out = indexed("explain", "--json", "--kver", world.kver, ALIAS["extra_xz"], check_code=3, timeout=QUICK).json
    assert out["results"][0]["candidates"][0]["package"] == "kernel-modules-extra"
    gpu = indexed("explain", "--json", "--kver", world.kver, ALIAS["gpu"], timeout=QUICK).json["results"][0]
    assert gpu["verdict"] == "unindexed" and "kernel-modules" in gpu["reason"]
    status = indexed("status", "--json", "--kver", world.kver, timeout=QUICK)
    assert status.returncode in (0, 3)
    assert any(message in e["message"] for e in status.json["environment"]["index"]["errors"])


@pytest.mark.parametrize("victim", ["index.json", "modules.alias.bin", "modules.json.xz"])
def test_fifo_in_an_index(indexed, world, victim):
    f = pkgdir(indexed.env, world.kver, "kernel-modules").resolve() / victim
    f.unlink()
    os.mkfifo(f)
    judged_with_one_bad_index(indexed, world, "is a FIFO, not a regular file")


@pytest.mark.parametrize("victim", ["index.json", "modules.alias.bin"])
def test_link_to_dev_zero_in_an_index(indexed, world, victim):
    f = pkgdir(indexed.env, world.kver, "kernel-modules").resolve() / victim
    f.unlink()
    f.symlink_to("/dev/zero")
    judged_with_one_bad_index(indexed, world, "is a symbolic link, which is not followed")


def test_oversize_index_file(indexed, world):
    f = pkgdir(indexed.env, world.kver, "kernel-modules").resolve() / "index.json"
    with open(f, "r+b") as fh:
        fh.truncate(64 << 20)  # sparse: costs no disk
    judged_with_one_bad_index(indexed, world, "bytes allowed")


def test_symlink_loop_as_a_package(indexed, world):
    link = pkgdir(indexed.env, world.kver, "kernel-modules")
    link.unlink()
    link.symlink_to("kernel-modules")
    judged_with_one_bad_index(indexed, world, "not at a generation of package kernel-modules")


def test_deeply_nested_index_json(indexed, world):
    f = pkgdir(indexed.env, world.kver, "kernel-modules").resolve() / "index.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    judged_with_one_bad_index(indexed, world, "not readable JSON")


@pytest.mark.parametrize("field, value, message", [
    ("built", float("nan"), "not readable JSON"),  # NaN is not JSON
    ("built", "yesterday", "lacks or mangles"),
    ("built", 1e300, "lacks or mangles"),
    ("modules", True, "lacks or mangles"),
    ("blacklist", {"modules": [1, 2]}, "lacks or mangles"),
])
def test_ill_typed_fields(indexed, world, field, value, message):
    gen = pkgdir(indexed.env, world.kver, "kernel-modules").resolve()
    meta = json.loads((gen / "index.json").read_text())
    meta[field] = value
    if isinstance(value, float) and value != value:
        (gen / "index.json").write_text(json.dumps(meta))  # digest unchecked: parsing refuses it first
    else:
        rewrite_meta(gen, lambda m: m.update({field: value}))
    judged_with_one_bad_index(indexed, world, message)


@pytest.mark.parametrize("table", [{"kmg_gpu": "kmg/a.bin"}, [["kmg_gpu", ["kmg/a.bin"]]], {"kmg_gpu": [7]}])
def test_a_resealed_ill_typed_firmware_table_is_reported(indexed, world, table):
    import hashlib
    import lzma

    from kmodguard.index import store

    gen = pkgdir(indexed.env, world.kver, "kernel-modules").resolve()
    packed = lzma.compress(json.dumps(table).encode())
    (gen / store.FIRMWARE_FILE).write_bytes(packed)
    rewrite_meta(gen, lambda m: m["files"].update({store.FIRMWARE_FILE: hashlib.sha256(packed).hexdigest()}))
    res = indexed("explain", "--json", "--kver", world.kver, ALIAS["gpu"], timeout=QUICK)
    assert res.returncode == 1 and "internal error" not in res.stderr, res.stderr
    assert f"{store.FIRMWARE_FILE}: a value of the wrong type" in res.stderr and "index build" in res.stderr


def test_an_added_modprobe_line_is_caught(indexed, world):
    """One `alias pci:* evilmod` line would make evilmod the candidate for every PCI device."""
    gen = pkgdir(indexed.env, world.kver, "kernel-modules").resolve()
    (gen / "modprobe.d").mkdir(exist_ok=True)
    (gen / "modprobe.d" / "evil.conf").write_text("alias pci:* kmg_gpu\n")
    judged_with_one_bad_index(indexed, world, "does not cover")
    none = indexed("explain", "--json", "--kver", world.kver, ALIAS["none"], timeout=QUICK).json["results"][0]
    assert "kmg_gpu" not in json.dumps(none.get("candidates", []))


def test_an_edited_modprobe_file_is_caught(indexed, world):
    gen = pkgdir(indexed.env, world.kver, "kernel-modules-extra").resolve()
    conf = next((gen / "modprobe.d").iterdir())
    conf.write_text(conf.read_text() + "alias pci:* kmg_extra\n")
    show = indexed("index", "show", "--json", "--kver", world.kver, timeout=QUICK)
    assert show.returncode == 1
    msg = {e["package"]: e["message"] for e in show.json["errors"]}["kernel-modules-extra"]
    assert f"modprobe.d/{conf.name} does not match its checksum" in msg


def test_an_edited_index_json_is_caught(indexed, world):
    gen = pkgdir(indexed.env, world.kver, "kernel-modules").resolve()
    meta = json.loads((gen / "index.json").read_text())
    meta["package"]["version"] = "9.9.9"
    (gen / "index.json").write_text(json.dumps(meta))
    judged_with_one_bad_index(indexed, world, "does not match its own digest")


def test_an_old_index_is_refused_with_what_to_do(indexed, world):
    gen = pkgdir(indexed.env, world.kver, "kernel-modules").resolve()
    rewrite_meta(gen, lambda m: m.update({"version": 1}))
    judged_with_one_bad_index(indexed, world, "format version 1")
    from kmodguard.errors import IndexCorrupt
    from kmodguard.index import store

    with pytest.raises(IndexCorrupt) as exc:
        store.PackageIndex(pkgdir(indexed.env, world.kver, "kernel-modules"), world.kver)
    assert "kmodguard index build" in exc.value.hint and "must be built again" in exc.value.hint


def test_a_link_to_another_packages_directory_is_refused(indexed, world):
    link = pkgdir(indexed.env, world.kver, "kernel-modules")
    other = os.readlink(pkgdir(indexed.env, world.kver, "kernel-modules-extra"))
    link.unlink()
    link.symlink_to(other)
    judged_with_one_bad_index(indexed, world, "not at a generation of package kernel-modules")


def test_a_package_name_other_than_its_link_is_refused(indexed, world):
    kdir = pkgdir(indexed.env, world.kver, "kernel-modules").parent
    gen = pkgdir(indexed.env, world.kver, "kernel-modules").resolve()
    shutil.copytree(gen, kdir / ".kmg-other.0123456789ab")
    (kdir / "kmg-other").symlink_to(".kmg-other.0123456789ab")
    show = indexed("index", "show", "--json", "--kver", world.kver, timeout=QUICK).json
    assert "holds package 'kernel-modules', not 'kmg-other'" in {e["package"]: e["message"]
                                                                 for e in show["errors"]}["kmg-other"]
    assert sorted(p["package"] for p in show["packages"]) == ["kernel-modules", "kernel-modules-extra"]


def test_unreadable_index_dir_for_a_non_root_status(kmodguard, world, unprivileged):
    public = Path(tempfile.mkdtemp(prefix="kmg-idx-", dir="/tmp"))
    try:
        os.chmod(public, 0o755)
        kmodguard.env["KMODGUARD_INDEX_DIR"] = str(public / "index")
        kmodguard("index", "build", "--kver", world.kver, "--package", "kernel-modules", "--version", "6.1.0-1.kmg",
                  "--request", f"kernel-modules-uname-r = {world.kver}",
                  "--from-dir", str(world.packages["kernel-modules"]), check_code=0)
        os.chmod(public / "index", 0o755)
        os.chmod(public / "index" / world.kver, 0o700)
        env = unprivileged.env({"PATH": os.environ["PATH"], "KMODGUARD_INDEX_DIR": str(public / "index"),
                                "KMODGUARD_STATE_DIR": str(public / "state"),
                                "KMODGUARD_RUNTIME_DIR": str(public / "run"),
                                "KMODGUARD_CONFIG_DIR": str(public / "etc")})
        res = subprocess.run(unprivileged.command("status", "--json", "--kver", world.kver), env=env,
                             capture_output=True, text=True, timeout=QUICK)
        assert "Traceback" not in res.stderr and "internal error" not in res.stdout + res.stderr, res.stderr
        assert res.returncode in (0, 3), (res.stdout, res.stderr)
        doc = json.loads(res.stdout)
        assert isinstance(doc["devices"], list)
        errors = doc["environment"]["index"]["errors"]
        assert any("cannot be read" in e["message"] and world.kver in e["message"] for e in errors), errors
    finally:
        subprocess.run(["rm", "-rf", str(public)], check=False)


# --- configuration drop-ins ----------------------------------------------------------------

def _drop_in(kmodguard) -> Path:
    d = Path(kmodguard.env["KMODGUARD_CONFIG_DIR"]) / "conf.d"
    d.mkdir(parents=True, exist_ok=True)
    return d / "50-hostile.toml"


@pytest.mark.parametrize("make, message", [
    (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
    (lambda p: p.symlink_to("/dev/zero"), "is a symbolic link"),
    (lambda p: p.write_text("x = " + "[" * 100_000 + "]" * 100_000), "nested too deeply"),
    (lambda p: p.write_bytes(b"#" * (2 << 20)), "bytes allowed"),
    (lambda p: p.symlink_to(p.name), "is a symbolic link"),  # a loop
])
def test_hostile_config_drop_in(kmodguard, make, message):
    path = _drop_in(kmodguard)
    make(path)
    res = kmodguard("config", "check", "--json", timeout=QUICK)
    assert res.returncode == 2
    assert message in res.json["error"]["message"] and str(path) in res.json["error"]["message"]


# --- build inputs ---------------------------------------------------------------------------

def test_fifo_and_dev_zero_as_an_rpm(kmodguard, tmp_path):
    fifo = tmp_path / "a.rpm"
    os.mkfifo(fifo)
    res = kmodguard("index", "build", "--json", "--from-rpm", str(fifo), timeout=QUICK)
    assert res.returncode == 2 and "is a FIFO, not a regular file" in res.json["error"]["message"]
    zero = tmp_path / "z.rpm"
    zero.symlink_to("/dev/zero")  # named by the user, so followed: and then refused as a device
    res = kmodguard("index", "build", "--json", "--from-rpm", str(zero), timeout=QUICK)
    assert res.returncode == 2 and "is a device, not a regular file" in res.json["error"]["message"]


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_fifo_or_dev_zero_as_a_module_in_from_dir(kmodguard, world, tmp_path, kind):
    payload = tmp_path / "payload"
    shutil.copytree(world.packages["kernel-modules"], payload, symlinks=True)
    bad = next(payload.rglob("*.ko")).with_name("kmg_hostile.ko")
    os.mkfifo(bad) if kind == "fifo" else bad.symlink_to("/dev/zero")
    res = kmodguard("index", "build", "--json", "--kver", world.kver, "--package", "kernel-modules",
                    "--version", "6.1.0-1.kmg", "--request", f"kernel-modules-uname-r = {world.kver}",
                    "--from-dir", str(payload), timeout=QUICK)
    assert res.returncode == 2 and str(bad) in res.json["error"]["message"]
    assert not (Path(kmodguard.env["KMODGUARD_INDEX_DIR"]) / world.kver / "kernel-modules").exists()


def test_a_failed_multi_package_build_publishes_nothing_and_names_the_rpm(world, tmp_path):
    """The second package fails while it is built (after the first is built): nothing is
    published, and the error names the RPM the bad file came from, not its extracted copy."""
    from kmodguard.errors import InvalidInput
    from kmodguard.index import build, store

    good = tmp_path / "good"
    bad = tmp_path / "bad"
    shutil.copytree(world.packages["kernel-modules"], good, symlinks=True)
    shutil.copytree(world.packages["kernel-modules-extra"], bad, symlinks=True)
    garbage = next(bad.rglob("*.ko*")).with_name("kmg_garbage.ko")
    garbage.write_bytes(b"not an ELF object")
    req = f"-uname-r = {world.kver}"
    items = [(world.kver, build.PackageSource("kernel-modules", "1", "kernel-modules" + req, good,
                                              {"from-rpm": "/srv/good.rpm"})),
             (world.kver, build.PackageSource("kernel-modules-extra", "1", "kernel-modules-extra" + req, bad,
                                              {"from-rpm": "/srv/bad.rpm"}))]
    root = tmp_path / "index"
    with pytest.raises(InvalidInput) as exc:
        build.build_packages(root, items)
    assert "/srv/bad.rpm (its file /lib/modules/" in exc.value.message and str(bad) not in exc.value.message
    assert store.KernelIndex(root, world.kver).packages == []
    assert [p.name for p in root.iterdir()] in ([], [world.kver])
    assert not any(p.name for p in (root / world.kver).iterdir()) if (root / world.kver).exists() else True
