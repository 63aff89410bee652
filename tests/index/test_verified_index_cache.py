"""The checksums of the index's files remembered in STATE_DIR (engine/remembered.py,
verified-index.json): a later status or explain opens the index without reading or hashing its
files, a file changed in any way since (rewritten in place, replaced, swapped for a link) is
checked again and refused, a bad or planted cache is only a miss, and `index show` checks every
file whatever the cache says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import ALIAS
from kmodguard.engine.remembered import VERIFIED_FILE

QUICK = 20


@pytest.fixture
def cached(indexed, world):
    """Both packages indexed, STATE_DIR made as the package makes it, and one explain run since."""
    Path(indexed.env["KMODGUARD_STATE_DIR"]).mkdir(mode=0o755)
    first = indexed("explain", "--json", "--kver", world.kver, ALIAS["gpu"], check_code=3, timeout=QUICK).json
    return indexed, first


def generation(env, kver, name="kernel-modules") -> Path:
    return (Path(env["KMODGUARD_INDEX_DIR"]) / kver / name).resolve()


def index_files(env, kver) -> list[str]:
    return sorted(str(p) for name in ("kernel-modules", "kernel-modules-extra")
                  for p in generation(env, kver, name).rglob("*") if p.is_file())


def explain_gpu(kmodguard, world) -> dict:
    return kmodguard("explain", "--json", "--kver", world.kver, ALIAS["gpu"], timeout=QUICK).json["results"][0]


def test_the_cache_covers_every_file_of_the_index(cached, world):
    kmodguard, _ = cached
    doc = json.loads((Path(kmodguard.env["KMODGUARD_STATE_DIR"]) / VERIFIED_FILE).read_text())
    assert doc["scope"] == str(Path(kmodguard.env["KMODGUARD_INDEX_DIR"]) / world.kver)
    assert sorted(doc["files"]) == index_files(kmodguard.env, world.kver)


def test_a_later_run_reads_and_hashes_no_index_file_and_loads_no_openssl(cached, world):
    kmodguard, first = cached
    probe = (
        "import sys\n"
        "from kmodguard import fsutil\n"
        "from kmodguard.index import store\n"
        "def unread(*a, **k): raise AssertionError(f'hashed {a[0]}')\n"
        "fsutil.sha256_capped = store.sha256_capped = store.meta_digest = unread\n"
        "from kmodguard.cli import main\n"
        "code = main(['explain', '--json', '--kver', sys.argv[1], sys.argv[2]])\n"
        "assert 'hashlib' not in sys.modules and '_hashlib' not in sys.modules, 'OpenSSL was loaded'\n"
        "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", probe, world.kver, ALIAS["gpu"]], env=kmodguard.env,
                          capture_output=True, text=True, timeout=QUICK)
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout) == first


@pytest.mark.parametrize("how", ["rewritten in place", "replaced", "swapped for a link to a true copy"])
def test_a_file_changed_since_is_checked_again(cached, world, how, tmp_path):
    kmodguard, first = cached
    victim = generation(kmodguard.env, world.kver) / "modules.alias.bin"
    data = victim.read_bytes()
    if how == "rewritten in place":  # same inode, same size, mtime put back: ctime still moves
        st = os.stat(victim)
        with open(victim, "r+b") as f:
            f.seek(len(data) // 2)
            f.write(bytes([data[len(data) // 2] ^ 0xFF]))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        message = "modules.alias.bin does not match its checksum"
    elif how == "replaced":
        new = victim.with_name("new")
        new.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        os.replace(new, victim)
        message = "modules.alias.bin does not match its checksum"
    else:  # the same bytes, but an index holds no links
        copy = tmp_path / "copy.bin"
        copy.write_bytes(data)
        victim.unlink()
        victim.symlink_to(copy)
        message = "is a symbolic link"
    gpu = explain_gpu(kmodguard, world)
    assert gpu["verdict"] == "unindexed" and message in gpu["reason"], gpu


def test_index_json_edited_since_is_checked_again(cached, world):
    kmodguard, _ = cached
    meta = generation(kmodguard.env, world.kver) / "index.json"
    doc = json.loads(meta.read_text())
    doc["package"]["version"] = "6.1.0-2.kmg"  # not re-sealed: its own digest no longer matches
    meta.write_text(json.dumps(doc))
    gpu = explain_gpu(kmodguard, world)
    assert gpu["verdict"] == "unindexed" and "does not match its own digest" in gpu["reason"], gpu


@pytest.mark.parametrize("planted", ["garbage", "symlink", "fifo", "directory", "ill-typed", "other kernel", "lies"])
def test_a_bad_or_planted_cache_is_only_a_miss(cached, world, planted, tmp_path):
    kmodguard, first = cached
    cache = Path(kmodguard.env["KMODGUARD_STATE_DIR"]) / VERIFIED_FILE
    real = json.loads(cache.read_text())
    cache.unlink()
    victim = str(generation(kmodguard.env, world.kver) / "modules.alias.bin")
    entry = real["files"][victim]
    if planted == "garbage":
        cache.write_bytes(b"\x00{not json")
    elif planted == "symlink":  # never followed, whatever it points to
        (tmp_path / "elsewhere.json").write_text(json.dumps(real))
        cache.symlink_to(tmp_path / "elsewhere.json")
    elif planted == "fifo":  # no writer: a read would hang
        os.mkfifo(cache)
    elif planted == "directory":
        cache.mkdir()
    elif planted == "ill-typed":
        real["files"][victim] = [*entry[:4], "x", entry[5]]
        cache.write_text(json.dumps(real))
    elif planted == "other kernel":
        cache.write_text(json.dumps({**real, "scope": "/var/lib/kmodguard/index/0.0"}))
    else:  # right digest, another file's identity
        real["files"][victim] = [entry[0], entry[1] + 1, *entry[2:]]
        cache.write_text(json.dumps(real))
    # the damage is found whatever the cache holds
    with open(victim, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    gpu = explain_gpu(kmodguard, world)
    assert gpu["verdict"] == "unindexed" and "does not match its checksum" in gpu["reason"], gpu
    assert first["results"][0]["verdict"] == "missing"


def test_index_show_checks_every_file_whatever_the_cache_says(cached, world):
    """A cache is root's word about files it saw (damage beneath the file system keeps a file's
    identity); `index show` reads and hashes every file all the same."""
    kmodguard, _ = cached
    victim = generation(kmodguard.env, world.kver) / "modules.alias.bin"
    with open(victim, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    cache = Path(kmodguard.env["KMODGUARD_STATE_DIR"]) / VERIFIED_FILE
    doc = json.loads(cache.read_text())
    st = os.stat(victim)
    doc["files"][str(victim)][:5] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache.write_text(json.dumps(doc))
    show = kmodguard("index", "show", "--json", "--kver", world.kver, timeout=QUICK)
    assert show.returncode == 1
    errors = {e["package"]: e["message"] for e in show.json["errors"]}
    assert "modules.alias.bin does not match its checksum" in errors["kernel-modules"], errors
