"""What explain's shortcuts (issue 16) must never change: a modalias judged among thousands gets
the verdict it gets alone, and the JSON of the results is what json.dumps writes.

The Diagnoser shares one verdict among the modaliases with the same libkmod matches, except when
the verdict reads more of its modalias: every installed match blacklisted (the indexes decide), or
a module's absent firmware that only a repository announcement for this modalias may name. The
CLI encodes each shared verdict once and joins the texts. An installed module's firmware list is
read by modinfo.firmware, which must give what modinfo.read gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import synthetic
from kmodguard.backends import Announcement
from kmodguard.cli import output
from kmodguard.config import Config
from kmodguard.engine.diagnosis import Diagnoser
from kmodguard.engine.environment import detect
from kmodguard.engine.repository import RepositoryDrivers
from kmodguard.errors import InvalidInput
from kmodguard.index import modinfo
from kmodguard.paths import Paths

KVER = synthetic.KVER
PCI = "pci:v0000{v}d{d:08X}sv00000000sd00000000bc02sc00i00"
WIDE = [PCI.format(v="FAFA", d=d) for d in (1, 2, 3)]  # one blacklisted installed match, each its own candidate
INST_FW = [PCI.format(v="FAFB", d=d) for d in (1, 2, 3)]  # installed, firmware absent, d1 announced
IDX_FW = [PCI.format(v="FAFC", d=d) for d in (1, 2, 3)]  # indexed, firmware absent, d1 announced
PLAIN = [PCI.format(v="FAFD", d=d) for d in (1, 2, 3)]  # indexed, no firmware: one shared verdict
ALL = WIDE + INST_FW + IDX_FW + PLAIN

INSTALLED = (
    synthetic.Module("kmg_wide", aliases=("pci:v0000FAFAd*sv*sd*bc*sc*i*",)),
    synthetic.Module("kmg_inst_fw", aliases=("pci:v0000FAFBd*sv*sd*bc*sc*i*",), firmware=("kmg/inst_absent.bin",)),
)
INDEXED = (
    synthetic.Module("kmg_one", aliases=("pci:v0000FAFAd00000001sv*sd*bc*sc*i*",)),
    synthetic.Module("kmg_two", aliases=("pci:v0000FAFAd00000002sv*sd*bc*sc*i*",)),
    synthetic.Module("kmg_idx_fw", aliases=("pci:v0000FAFCd*sv*sd*bc*sc*i*",), firmware=("kmg/idx_absent.bin",)),
    synthetic.Module("kmg_plain", aliases=("pci:v0000FAFDd*sv*sd*bc*sc*i*",)),
)
ANNOUNCED = (Announcement("linux-firmware", "20261201", "pci:v0000FAFBd00000001sv*sd*bc*sc*i*", "supplements"),
             Announcement("linux-firmware", "20261201", "pci:v0000FAFCd00000001sv*sd*bc*sc*i*", "supplements"))


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """(paths, env): an installed tree that blacklists kmg_wide, and kernel-modules indexed."""
    top = tmp_path_factory.mktemp("invariants")
    for m in INSTALLED:
        synthetic.build_module(m, top / "installed" / "lib" / "modules" / KVER, top / "src")
    synthetic.depmod(top / "installed", KVER)
    for m in INDEXED:
        synthetic.build_module(m, top / "payload" / "lib" / "modules" / KVER, top / "src")
    (top / "modprobe.d").mkdir()
    (top / "modprobe.d" / "admin.conf").write_text("blacklist kmg_wide\n")
    (top / "firmware").mkdir()
    (top / "state").mkdir()  # as installed: apt's answers are cached there
    (top / "proc").mkdir()
    (top / "proc" / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet\n")
    (top / "proc" / "modules").write_text("")
    (top / "sys" / "module").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMODGUARD_")}
    env.update({
        "KMODGUARD_MODULES_DIR": str(top / "installed" / "lib" / "modules" / KVER),
        "KMODGUARD_INDEX_DIR": str(top / "index"), "KMODGUARD_STATE_DIR": str(top / "state"),
        "KMODGUARD_RUNTIME_DIR": str(top / "run"), "KMODGUARD_CONFIG_DIR": str(top / "etc"),
        "KMODGUARD_MODPROBE_DIRS": str(top / "modprobe.d"), "KMODGUARD_FIRMWARE_DIRS": str(top / "firmware"),
        "KMODGUARD_PROC": str(top / "proc"), "KMODGUARD_SYSFS": str(top / "sys"), "KMODGUARD_CONTAINER": "none",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    })
    build = subprocess.run([sys.executable, "-m", "kmodguard", "index", "build", "--kver", KVER, "--package",
                            "kernel-modules", "--version", "6.1.0-1.kmg", "--from-dir", str(top / "payload")],
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return Paths.from_environment(env=env, kver=KVER), env


def diagnoser(paths, announced=()):
    d = Diagnoser(paths, Config(), detect(paths))
    d.repository_lookup = lambda: RepositoryDrivers(announced, kver=KVER)
    return d


@pytest.mark.parametrize("announced", [(), ANNOUNCED], ids=["no-announcements", "announcements"])
def test_a_modalias_among_others_gets_the_verdict_it_gets_alone(machine, announced):
    paths, _ = machine
    together = diagnoser(paths, announced)
    verdicts = [together.explain(m) for m in ALL + ALL[::-1]]
    alone = [diagnoser(paths, announced).explain(m) for m in ALL]
    assert verdicts[:len(ALL)] == alone and verdicts[len(ALL):] == alone[::-1]
    by = dict(zip(ALL, alone))
    # the cases are what they are meant to be: a shared verdict would have given the first one's
    assert [[c.module for c in by[m].candidates] for m in WIDE] == [["kmg_one"], ["kmg_two"], []]
    assert by[WIDE[2]].verdict == "ignored"
    assert by[PLAIN[0]] is not None and together.explain(PLAIN[1]) is together.explain(PLAIN[2])
    if announced:
        assert by[INST_FW[0]].firmware.names == ("linux-firmware",) and by[INST_FW[1]].firmware.names == ()
        assert by[IDX_FW[0]].candidates[0].firmware.names == ("linux-firmware",)
        assert by[IDX_FW[1]].candidates[0].firmware.names == ()
    else:
        assert by[INST_FW[0]] == by[INST_FW[1]] and by[INST_FW[0]].firmware.named == 1


@pytest.mark.parametrize("announced", [(), ANNOUNCED], ids=["no-announcements", "announcements"])
def test_explain_all_answers_as_explain_one_by_one(machine, announced):
    paths, _ = machine
    order = ALL + ALL[::-1] + [ALL[0]]
    one_by_one = [diagnoser(paths, announced).explain(m) for m in order]
    batch = diagnoser(paths, announced)
    assert batch.explain_all(order) == one_by_one
    assert batch.explain_all(PLAIN)[1] is batch.explain(PLAIN[1])  # the same memo as explain


def test_explain_all_refuses_a_malformed_modalias_before_judging_any(machine):
    paths, _ = machine
    d = diagnoser(paths)
    with pytest.raises(InvalidInput):
        d.explain_all([PLAIN[0], "pci:v0000FAFD d1", PLAIN[1]])
    assert d._by_matches == {} and d._memo == {}


def test_new_round_forgets_the_shared_verdicts(machine):
    paths, _ = machine
    d = diagnoser(paths)
    first = d.explain(PLAIN[0])
    d.new_round()
    assert d.explain(PLAIN[1]) == first and d.explain(PLAIN[1]) is not first


def test_explain_json_of_many_is_json_dumps_of_each_alone(machine):
    _, env = machine

    def explain(*args, stdin=None):
        proc = subprocess.run([sys.executable, "-m", "kmodguard", "explain", "--json", "--kver", KVER, *args],
                              env=env, input=stdin, capture_output=True)
        assert proc.returncode in (0, 3), proc.stderr
        return proc.stdout

    many = explain("-", stdin="".join(f"{m}\n" for m in ALL + ALL).encode())
    results = [json.loads(explain(m))["results"][0] for m in ALL]
    assert many == (json.dumps({"kernel": KVER, "results": results + results}) + "\n").encode()


@pytest.mark.parametrize("head, results", [
    ({"kernel": "k"}, []),
    ({"kernel": "k", "n": 1}, [("a:1", {"verdict": "x", "list": [1, "é"]})] * 3 + [("a:2", {})]),
    ({}, [("a:1", {"reason": "not UTF-8: \udcff"}), ("a:2", {"reason": "fine"})]),
    ({"kernel": "k", "results": "taken"}, [("a:1", {"v": 1})]),
    ({"kernel": "k"}, [("a:1", {"reason": "a DEL: \x7f"}), ("a:\x7f", {})]),
])
@pytest.mark.parametrize("printable", [False, True], ids=["raw", "printable"])
def test_emit_json_results_writes_what_emit_json_writes(capsys, monkeypatch, head, results, printable):
    if printable:  # as the CLI writes: control characters a terminal would act on are escaped
        monkeypatch.setattr(sys, "stdout", output._Printable(sys.stdout))
    output.emit_json({**head, "results": [{"modalias": m, **body} for m, body in results]})
    expected = capsys.readouterr().out
    output.emit_json_results(head, "results", "modalias", results)
    assert capsys.readouterr().out == expected
    # json escapes DEL too: nothing raw reaches the stream, whether it is wrapped or not
    has_del = any("\x7f" in m or "\x7f" in json.dumps(body, ensure_ascii=False) for m, body in results)
    assert "\x7f" not in expected and ("\\u007f" in expected) == has_del


def test_modinfo_firmware_is_what_read_gives(tmp_path):
    mods = [synthetic.Module("kmg_fw", aliases=("pci:v1*",), firmware=("kmg/a.bin", "kmg/b.bin")),
            synthetic.Module("kmg_nofw", aliases=("pci:v2*",)),
            synthetic.Module("kmg_xz", aliases=("pci:v3*",), firmware=("kmg/c.bin",), compress="xz")]
    paths = [str(synthetic.build_module(m, tmp_path / "m", tmp_path / "w")) for m in mods]
    odd = tmp_path / "odd.c"  # a bare 'firmware' key, empty strings, a name that only starts like it
    odd.write_text('static const char e[] __attribute__((section(".modinfo"),used)) = '
                   '"firmware\\0\\0firmwarex=no\\0firmware=caf\\xc3\\xa9.bin";\n')
    subprocess.run(["gcc", "-c", "-O0", "-o", str(tmp_path / "odd.ko"), str(odd)], check=True)
    (tmp_path / "damaged.ko").write_bytes(b"\x7fELF" + b"\0" * 60)
    paths += [str(tmp_path / "odd.ko"), str(tmp_path / "damaged.ko"), str(tmp_path / "missing.ko")]
    for path in paths:
        info = modinfo.read(path)
        assert modinfo.firmware(path) == (None if info is None else info.firmware), path
    assert modinfo.firmware(paths[0]) == ("kmg/a.bin", "kmg/b.bin") and modinfo.firmware(paths[1]) == ()
    assert modinfo.firmware(paths[2]) is None  # compressed: libkmod reads it
    assert modinfo.firmware(paths[3]) == ("", "café.bin")
