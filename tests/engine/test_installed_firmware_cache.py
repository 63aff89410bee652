"""The installed modules' firmware lists remembered in STATE_DIR (engine/remembered.py):
a later run judges from them without reading the module files, a module file changed in any way
is read again, and a bad, planted or foreign cache file is only a miss, never a wrong verdict."""

from __future__ import annotations

import json
import os

import pytest

import synthetic
from kmodguard.config import Config
from kmodguard.engine.diagnosis import Diagnoser
from kmodguard.engine.environment import detect
from kmodguard.engine.remembered import CACHE_FILE
from kmodguard.index import modinfo
from kmodguard.paths import Paths

KVER = synthetic.KVER
MODALIAS = "pci:v0000FEF0d00000001sv00000000sd00000000bc02sc00i00"
ALIAS = "pci:v0000FEF0d*sv*sd*bc*sc*i*"


def module(firmware):
    return synthetic.Module("kmg_fwc", aliases=(ALIAS,), firmware=firmware)


@pytest.fixture
def machine(tmp_path):
    mdir = tmp_path / "root" / "lib" / "modules" / KVER
    ko = synthetic.build_module(module(("kmg/one.bin",)), mdir, tmp_path / "src")
    synthetic.depmod(tmp_path / "root", KVER)
    for d in ("state", "firmware", "proc", "sys/module", "modprobe.d"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "proc" / "cmdline").write_text("ro quiet\n")
    (tmp_path / "proc" / "modules").write_text("")
    env = {"KMODGUARD_MODULES_DIR": str(mdir), "KMODGUARD_INDEX_DIR": str(tmp_path / "index"),
           "KMODGUARD_STATE_DIR": str(tmp_path / "state"), "KMODGUARD_RUNTIME_DIR": str(tmp_path / "run"),
           "KMODGUARD_CONFIG_DIR": str(tmp_path / "etc"), "KMODGUARD_MODPROBE_DIRS": str(tmp_path / "modprobe.d"),
           "KMODGUARD_FIRMWARE_DIRS": str(tmp_path / "firmware"), "KMODGUARD_PROC": str(tmp_path / "proc"),
           "KMODGUARD_SYSFS": str(tmp_path / "sys"), "KMODGUARD_CONTAINER": "none"}
    return Paths.from_environment(env=env, kver=KVER), ko, tmp_path


def judged(paths, remember=True):
    d = Diagnoser(paths, Config(), detect(paths))
    v = d.explain(MODALIAS)
    if remember:
        d.remember()
    return v


def test_a_later_run_judges_from_the_remembered_list_without_reading_the_module(machine, monkeypatch):
    paths, ko, _ = machine
    first = judged(paths)
    assert first.verdict == "loadable" and first.firmware.named == 1
    doc = json.loads((paths.state_dir / CACHE_FILE).read_text())
    assert doc["scope"] == str(paths.installed_modules)
    assert [e[5] for p, e in doc["files"].items() if os.path.samefile(p, ko)] == [["kmg/one.bin"]]

    def unread(path):
        raise AssertionError(f"{path} was read again")
    monkeypatch.setattr(modinfo, "firmware", unread)
    assert judged(paths) == first


@pytest.mark.parametrize("how", ["rewritten in place", "replaced"])
def test_a_module_file_changed_since_is_read_again(machine, how, tmp_path_factory):
    paths, ko, top = machine
    assert judged(paths).firmware.named == 1
    new = synthetic.build_module(module(("kmg/one.bin", "kmg/two.bin")), tmp_path_factory.mktemp("new"), top / "src2")
    if how == "rewritten in place":  # same inode; the size may even be the same: ctime still moves
        with open(ko, "r+b") as f:
            f.write(new.read_bytes())
            f.truncate()
    else:
        os.replace(new, ko)
    assert judged(paths).firmware.named == 2


@pytest.mark.parametrize("planted", ["garbage", "symlink", "fifo", "directory", "ill-typed", "other tree", "lies"])
def test_a_bad_or_planted_cache_is_only_a_miss(machine, planted, tmp_path):
    paths, ko, top = machine
    cache = paths.state_dir / CACHE_FILE
    truth = judged(paths, remember=False)
    real = {"scope": str(paths.installed_modules), "files": {}}
    stat = os.stat(ko)
    identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    path = Diagnoser(paths, Config(), detect(paths)).installed.lookup_paths(MODALIAS)[0][1]
    if planted == "garbage":
        cache.write_bytes(b"\x00{not json")
    elif planted == "symlink":  # a link is never followed, whatever it points to
        (top / "elsewhere.json").write_text(json.dumps({**real, "files": {path: [*identity, []]}}))
        cache.symlink_to(top / "elsewhere.json")
    elif planted == "fifo":  # no writer: a read would hang
        os.mkfifo(cache)
    elif planted == "directory":
        cache.mkdir()
    elif planted == "ill-typed":
        cache.write_text(json.dumps({**real, "files": {path: [*identity[:4], "x", [1]]}}))
    elif planted == "other tree":
        cache.write_text(json.dumps({"scope": "/lib/modules/0.0", "files": {path: [*identity, []]}}))
    else:  # an entry for another file (its identity), saying the module names nothing
        cache.write_text(json.dumps({**real, "files": {path: [identity[0], identity[1] + 1, *identity[2:], []]}}))
    assert judged(paths) == truth and truth.firmware.named == 1


def test_nothing_is_written_where_there_is_no_state_dir(machine):
    paths, _, top = machine
    os.rmdir(paths.state_dir)
    assert judged(paths).firmware.named == 1
    assert not paths.state_dir.exists()
