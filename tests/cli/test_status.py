"""`kmodguard status` as it prints: the JSON contract, the daemon's snapshot, exit codes, the human
output and hostile sysfs strings, on umockdev-faked devices (records.py), checked the way a user
would read them. The verdicts themselves: tests/engine/test_verdicts.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess

import pytest

from records import device, pci
from status_runs import GPU, PACKAGE_VERSION, assert_no_control_characters, by_id, status, status_json
from synthetic import ALIAS, KVER


# --- the JSON contract -----------------------------------------------------------------------

DEVICE_KEYS = {"id", "syspath", "subsystem", "modalias", "driver", "verdict", "reason", "installed_modules",
               "candidates"}


def test_json_document_shape(indexed, world, tmp_path):
    records = (pci("0000:00:03.0", ALIAS["installed"], driver="kmg_core_nic") + pci("0000:00:05.0", GPU)
               + device("/devices/pci0000:00/0000:00:04.0/virtio1", "virtio", ALIAS["virtio"]))
    res = status(indexed, records, tmp_path, "--json", code=3)
    assert res.stdout.count("\n{") == 0 and res.stdout.startswith("{")  # exactly one document
    doc = res.json
    assert {"kernel", "environment", "daemon", "devices"} <= set(doc)
    assert doc["kernel"] == KVER
    env = doc["environment"]
    assert {"container", "image_mode", "modules_dir", "index", "can_install"} <= set(env)
    assert env["modules_dir"] == str(world.installed)
    assert env["image_mode"] is None
    assert sorted(p["package"] for p in env["index"]["packages"]) == ["kernel-modules", "kernel-modules-extra"]
    assert all(p["version"] == PACKAGE_VERSION for p in env["index"]["packages"])
    assert env["index"]["errors"] == []
    assert doc["daemon"] is None  # no daemon snapshot in the runtime dir
    assert [d["id"] for d in doc["devices"]] == ["0000:00:03.0", "/sys/devices/pci0000:00/0000:00:04.0/virtio1",
                                                 "0000:00:05.0"]  # sorted by syspath
    for dev in doc["devices"]:
        assert DEVICE_KEYS <= set(dev), dev
        assert dev["verdict"] in ("bound", "ignored", "loadable", "missing", "unindexed", "unknown")
        assert isinstance(dev["reason"], str) and dev["reason"]
        assert dev["syspath"].startswith("/sys/devices/")
        if dev["subsystem"] == "pci":
            assert dev["id"] == dev["syspath"].rsplit("/", 1)[1]
        else:
            assert dev["id"] == dev["syspath"]
    devs = by_id(doc)
    assert devs["0000:00:03.0"]["driver"] == "kmg_core_nic"
    assert devs["0000:00:05.0"]["driver"] is None
    assert devs["0000:00:05.0"]["modalias"] == GPU


def test_daemon_snapshot_is_attached_while_its_writer_lives(indexed, tmp_path):
    # the real daemon writes it (tests/daemon/test_daemon.py); here a live process stands in for it
    snapshot = {"pid": os.getpid(), "mode": "offer", "since": "2026-01-01T00:00:00Z",
                "needs_driver": ["0000:00:05.0"], "last_fix": None, "extra": {"kept": True}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps(snapshot))
    assert indexed.env["KMODGUARD_RUNTIME_DIR"] == str(run)
    doc = status_json(indexed, pci("0000:00:05.0", GPU), tmp_path, code=3)
    assert doc["daemon"] == snapshot
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / "state.json").write_text(json.dumps({**snapshot, "pid": gone.pid}))  # a killed daemon's leftover
    assert status_json(indexed, pci("0000:00:05.0", GPU), tmp_path, code=3)["daemon"] is None


@pytest.mark.parametrize("content", ['["not", "an", "object"]', "{truncated", "", "\xff"],
                         ids=["a-list", "truncated", "empty", "not-utf8"])
def test_daemon_snapshot_that_is_not_an_object_is_null(indexed, tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(content, "latin-1")
    doc = status_json(indexed, pci("0000:00:05.0", GPU), tmp_path, code=3)
    assert doc["daemon"] is None
    assert by_id(doc)["0000:00:05.0"]["verdict"] == "missing"


def test_exit_code_0_when_nothing_needs_action(indexed, tmp_path):
    records = (pci("0000:00:03.0", ALIAS["installed"], driver="kmg_core_nic")  # bound
               + pci("0000:00:05.0", GPU, override="vfio-pci")  # ignored
               + pci("0000:00:08.0", ALIAS["none"]))  # unknown
    doc = status_json(indexed, records, tmp_path, code=0)
    assert sorted(d["verdict"] for d in doc["devices"]) == ["bound", "ignored", "unknown"]
    assert status(indexed, records, tmp_path, code=0).returncode == 0  # human output too


@pytest.mark.parametrize("alias, verdict", [(ALIAS["installed"], "loadable"), (GPU, "missing")],
                         ids=["loadable", "missing"])
def test_exit_code_3_when_one_device_needs_action(indexed, tmp_path, alias, verdict):
    records = (pci("0000:00:03.0", ALIAS["installed"], driver="kmg_core_nic")
               + pci("0000:00:08.0", ALIAS["none"]) + pci("0000:00:09.0", alias))
    doc = status_json(indexed, records, tmp_path, code=3)
    assert by_id(doc)["0000:00:09.0"]["verdict"] == verdict
    assert status(indexed, records, tmp_path, code=3).returncode == 3


def test_no_devices_at_all(indexed, tmp_path):
    # A record file whose only device has no modalias: nothing to judge, exit 0.
    doc = status_json(indexed, "P: /devices/platform/kmg-nomodalias\nE: SUBSYSTEM=platform\n\n", tmp_path, code=0)
    assert doc["devices"] == []


# --- human output ----------------------------------------------------------------------------

def _sections(text: str) -> dict[str, list[str]]:
    """Heading line -> the lines under it, for the verdict groups of the human output."""
    sections, current = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "(" in line and line.split(":")[0].split(" ")[0] in (
                "missing", "loadable", "unindexed", "unknown", "ignored", "bound"):
            current = line
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line)
    return sections


MIXED = (pci("0000:00:01.0", GPU) + pci("0000:00:02.0", ALIAS["extra_xz"])
         + pci("0000:00:03.0", ALIAS["installed"]) + pci("0000:00:04.0", ALIAS["builtin"])
         + pci("0000:00:08.0", ALIAS["none"]) + pci("0000:00:09.0", ALIAS["blacklisted"])
         + pci("0000:00:0a.0", ALIAS["installed"], driver="kmg_core_nic"))


def test_human_output_groups_devices_by_verdict(indexed, tmp_path):
    out = status(indexed, MIXED, tmp_path, code=3).stdout
    assert out.splitlines()[0] == f"kmodguard: kernel {KVER}, 7 devices with a modalias"
    sections = _sections(out)
    headings = list(sections)
    assert [h.split(":")[0].split(" ")[0] for h in headings] == ["missing", "loadable", "unknown", "ignored", "bound"]
    assert [h.rsplit("(", 1)[1] for h in headings] == ["2)", "2)", "1)", "1)", "1)"]
    members = {h.split(":")[0].split(" ")[0]: "\n".join(lines) for h, lines in sections.items()}
    assert "0000:00:01.0" in members["missing"] and "kmg_gpu in kernel-modules" in members["missing"]
    assert "0000:00:02.0" in members["missing"] and "kmg_extra_xz in kernel-modules-extra" in members["missing"]
    assert "0000:00:03.0" in members["loadable"] and "0000:00:04.0" in members["loadable"]
    assert "modprobe -a kmg_core_nic" in members["loadable"]
    assert "0000:00:08.0" in members["unknown"]
    # bound and ignored are only counted unless --all
    assert "0000:00:09.0" not in out and "0000:00:0a.0" not in out
    assert "--all" in members["ignored"]
    every = _sections(status(indexed, MIXED, tmp_path, "--all", code=3).stdout)
    listed = {h.split(":")[0].split(" ")[0]: "\n".join(lines) for h, lines in every.items()}
    assert "0000:00:09.0" in listed["ignored"] and "kmg_banned" in listed["ignored"]
    assert "0000:00:0a.0" in listed["bound"] and "kmg_core_nic" in listed["bound"]


def test_human_output_gives_the_exact_install_command(indexed, tmp_path):
    out = status(indexed, MIXED, tmp_path, code=3, env={"KMODGUARD_CONTAINER": "none"}).stdout
    missing = _sections(out)[next(h for h in _sections(out) if h.startswith("missing"))]
    [command] = [line.split("next:", 1)[1] for line in missing if line.strip().startswith("next:")]
    argv = shlex.split(command)  # what the shell makes of it when the user pastes it
    assert "install" in argv
    requests = argv[argv.index("install") + 1:]
    assert requests == [f"kernel-modules-uname-r = {KVER}", f"kernel-modules-extra-uname-r = {KVER}"]
    assert "nothing can be installed" not in out


def test_human_output_in_a_container_installs_nothing(indexed, tmp_path):
    env = {"KMODGUARD_CONTAINER": "docker"}
    res = status(indexed, MIXED, tmp_path, code=3, env=env)
    assert "nothing can be installed here" in res.stdout
    assert "container (docker)" in res.stdout
    assert "uname-r = " not in res.stdout  # no install command is offered
    doc = status_json(indexed, MIXED, tmp_path, code=3, env=env)
    assert doc["environment"]["container"] == "docker"
    assert doc["environment"]["can_install"] is False
    assert by_id(doc)["0000:00:01.0"]["verdict"] == "missing"  # still reported as seen


# --- hostile sysfs strings -------------------------------------------------------------------

def _hostile_run(runner, tmp_path, bad: dict[str, bytes], *args: str, code: int | None = 3):
    """Devices with raw-byte modaliases (E: and A:) plus one normal 'missing' GPU; the file is built as bytes."""
    data = b""
    for addr, raw in bad.items():
        uevent = b"SUBSYSTEM=pci\nPCI_SLOT_NAME=" + addr.encode() + b"\nMODALIAS=" + raw + b"\n"
        # H: lines carry hex, so any byte fits (the record parser itself wants UTF-8 text)
        data += (f"P: /devices/pci0000:00/{addr}\nE: SUBSYSTEM=pci\n".encode()
                 + b"H: uevent=" + uevent.hex().encode() + b"\n"
                 + b"H: modalias=" + (raw + b"\n").hex().encode() + b"\n"
                 + b"A: driver_override=(null)\n\n")
    data += pci("0000:00:05.0", GPU).encode()
    path = tmp_path / f"hostile-{len(list(tmp_path.glob('hostile-*')))}.umockdev"
    path.write_bytes(data)
    run = dataclasses.replace(runner, umockdev=path)
    return run("status", "--kver", KVER, *args, check_code=code)


def _judged_despite(doc: dict, addr: str, fragment: str) -> dict:
    devs = by_id(doc)
    assert devs["0000:00:05.0"]["verdict"] == "missing"  # the other devices are still judged
    dev = devs[addr]
    assert dev["verdict"] == "unknown", dev
    assert "malformed modalias" in dev["reason"] and fragment in dev["reason"], dev["reason"]
    assert dev["candidates"] == [] and dev["installed_modules"] == []
    return dev


@pytest.mark.parametrize("raw", [b"pci:v0000\x01ABCD", b"pci:v0000AAAA\x1b[2J\x1b[31mRED", b"pci:v0000\rAAAA\x7f",
                                 b"pci:v0000\xc2\x9bAAAA"],  # the last: U+009B, a C1 CSI in UTF-8
                         ids=["soh", "ansi-escape", "cr-del", "c1-csi"])
def test_hostile_control_characters(indexed, tmp_path, raw):
    doc = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}, "--json").json
    dev = _judged_despite(doc, "0000:00:01.0", "only printable ASCII")
    assert dev["modalias"] == raw.decode("utf-8")  # reported as the device wrote it (JSON escapes it)
    res = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw})
    assert_no_control_characters(res.stdout)
    assert_no_control_characters(res.stderr)
    assert "0000:00:01.0" in res.stdout and "malformed modalias" in res.stdout


@pytest.mark.parametrize("raw", [b"pci:v0000AAAA\x0b", b"\x1cpci:v0000AAAA", b"pci:v0000AAAA\x1f\x1e ",
                                 b"\x0cpci:v0000AAAA\t"], ids=["trailing-vt", "leading-fs", "trailing-us-rs", "ff-tab"])
def test_control_bytes_at_either_end_are_kept_and_refused(indexed, tmp_path, raw):
    """Whitespace to str.strip() (\x0b, \x1c..\x1f, \x0c, \t, blanks) is a control byte to a modalias:
    kept as the device wrote it, and refused, not silently trimmed into a well-formed one."""
    doc = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}, "--json").json
    dev = _judged_despite(doc, "0000:00:01.0", "only printable ASCII")
    assert dev["modalias"] == raw.decode()


def test_hostile_shell_metacharacters(indexed, tmp_path):
    marker = tmp_path / "PWNED"
    bad = {
        "0000:00:01.0": f"pci:$(touch${{IFS}}{marker});rm".encode(),
        "0000:00:02.0": f"pci:`touch${{IFS}}{marker}`|&&>x".encode(),
    }
    doc = _hostile_run(indexed, tmp_path, bad, "--json").json
    devs = by_id(doc)
    assert devs["0000:00:05.0"]["verdict"] == "missing"
    for addr, raw in bad.items():
        # well-formed (printable ASCII, a bus name): judged like any other string, matching nothing
        assert devs[addr]["modalias"] == raw.decode()
        assert devs[addr]["verdict"] == "unknown", devs[addr]
    res = _hostile_run(indexed, tmp_path, bad)
    assert "pci:$(touch${IFS}/" in res.stdout and "pci:`touch${IFS}/" in res.stdout  # shown as text
    assert not marker.exists()


def test_hostile_very_long_modalias(indexed, tmp_path):
    raw = b"pci:v" + b"A" * 4995  # 5000 characters; sysfs never writes more than a page
    doc = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}, "--json").json
    dev = _judged_despite(doc, "0000:00:01.0", "5000 characters long")
    assert dev["modalias"] == raw.decode()
    out = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}).stdout
    assert "0000:00:01.0" in out and "5000 characters long" in out
    assert max(len(line) for line in out.splitlines()) < 600  # shortened for a terminal


def test_hostile_non_utf8_modalias(indexed, tmp_path):
    raw = b"pci:v0000\xff\xfeBBBBd\x80"
    doc = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw}, "--json").json
    dev = _judged_despite(doc, "0000:00:01.0", "only printable ASCII")
    # bytes kept visible as \xNN text, not replaced, and no lone surrogate for strict JSON parsers
    assert dev["modalias"] == "pci:v0000\\xff\\xfeBBBBd\\x80"
    res = _hostile_run(indexed, tmp_path, {"0000:00:01.0": raw})
    assert "\ufffd" not in res.stdout  # the runner decodes with 'replace': stdout was valid UTF-8
    assert_no_control_characters(res.stdout)
    assert "pci:v0000\\xff\\xfeBBBBd\\x80" in res.stdout  # the bytes as sysfs holds them
    assert "'\\xff' (a byte that is not UTF-8)" in res.stdout


def test_hostile_non_utf8_modalias_without_the_attribute(indexed, tmp_path):
    # Only the uevent carries MODALIAS (no modalias attribute file): the device must still be reported.
    raw = b"pci:v0000\xff\xfeBBBB"
    uevent = b"SUBSYSTEM=pci\nMODALIAS=" + raw + b"\n"
    records = (b"P: /devices/pci0000:00/0000:00:01.0\nE: SUBSYSTEM=pci\nH: uevent=" + uevent.hex().encode()
               + b"\nA: driver_override=(null)\n\n" + pci("0000:00:05.0", GPU).encode())
    path = tmp_path / "uevent-only.umockdev"
    path.write_bytes(records)
    doc = dataclasses.replace(indexed, umockdev=path)("status", "--json", "--kver", KVER, check_code=3).json
    dev = _judged_despite(doc, "0000:00:01.0", "only printable ASCII")
    assert dev["modalias"] == "pci:v0000\\xff\\xfeBBBB"


def test_hostile_devices_all_at_once(indexed, tmp_path):
    bad = {
        "0000:00:01.0": b"pci:v0000\x01ABCD",
        "0000:00:02.0": b"pci:$(reboot);rm",
        "0000:00:03.0": b"pci:v" + b"A" * 4995,
        "0000:00:04.0": b"pci:v0000\xff\xfe",
    }
    doc = _hostile_run(indexed, tmp_path, bad, "--json").json
    assert len(doc["devices"]) == 5
    assert [by_id(doc)[a]["verdict"] for a in bad] == ["unknown"] * 4
    res = _hostile_run(indexed, tmp_path, bad)
    assert_no_control_characters(res.stdout)
    assert all(a in res.stdout for a in bad)
