"""docs/contract.md is true: every table read back and compared with the code (verdicts, exit
codes, error names, MESSAGE_IDs, D-Bus names, configuration keys, environment) and with the JSON
documents the commands print on the synthetic world. A name added to the code and not to the
Contract, or the other way round, fails here by name."""

from __future__ import annotations

import importlib
import pkgutil
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import synthetic
from records import pci
from kmodguard import errors, journal
from kmodguard.config import Config, Ignore, Timeouts
from kmodguard.engine.diagnosis import VERDICTS

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "contract.md").read_text()


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert m, f"docs/contract.md has no section {title!r}"
    return m.group(1)


def rows(title: str) -> list[list[str]]:
    """The table rows of a section, cells stripped, header and rule dropped."""
    lines = [ln for ln in section(title).splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def keyed(title: str) -> dict[str, list[str]]:
    return {r[0]: names(r[1]) for r in rows(title)}


def test_verdicts():
    assert [names(r[0])[0] for r in rows("Verdicts")] == list(VERDICTS)


def test_exit_codes():
    assert [int(r[0]) for r in rows("Exit codes (every command)")] == [int(c) for c in errors.ExitCode]


def every_error_class() -> list[type]:
    """KmodguardError and every subclass anywhere in kmodguard (each module imported first)."""
    import kmodguard

    for info in pkgutil.walk_packages(kmodguard.__path__, "kmodguard."):
        if info.name != "kmodguard.__main__":
            importlib.import_module(info.name)
    found, todo = [], [errors.KmodguardError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_error_names_and_their_exit_codes():
    codes: dict[str, set[int]] = {}
    for c in every_error_class():
        codes.setdefault(c.name, set()).add(int(c.exit_code))
    assert all(len(v) == 1 for v in codes.values()), codes  # a name means one exit code
    code = {name: v.pop() for name, v in codes.items()}
    doc = {names(r[0])[0]: int(r[1]) for r in rows("Error names")}
    assert doc == code


def test_the_interface_documents_every_error_name():
    """The checked-in interface's Errors paragraph names every error a D-Bus caller may get."""
    every_error_class()  # each module imported: its error classes exist
    comment = (REPO / "units" / "org.kmodguard.Daemon1.xml").read_text().split("Errors:", 1)[1].split("never a traceback")[0]
    assert set(re.findall(r"\.([A-Z][A-Za-z]+)\b", comment)) - {"Error"} == errors.error_names()


def test_message_ids():
    assert {names(r[0])[0]: names(r[1])[0] for r in rows("Journal MESSAGE_IDs")} == journal.MESSAGE_IDS


def test_dbus_names_are_the_checked_in_interface():
    node = ET.parse(REPO / "units" / "org.kmodguard.Daemon1.xml").getroot()
    iface = next(i for i in node.iter("interface") if i.get("name") == "org.kmodguard.Daemon1")
    doc = keyed("D-Bus")
    for kind, tag in (("methods", "method"), ("signals", "signal"), ("properties", "property")):
        assert sorted(doc[kind]) == sorted(e.get("name") for e in iface.iter(tag)), kind
    actions = re.findall(r'action id="([^"]+)"', (REPO / "units" / "org.kmodguard.policy").read_text())
    assert sorted(doc["polkit actions"]) == sorted(actions)


def test_configuration_keys():
    doc = keyed("Configuration")
    assert doc["top level"] == [f for f in Config._fields if f != "sources"]
    assert doc["`[timeouts]`"] == list(Timeouts._fields) and doc["`[ignore]`"] == list(Ignore._fields)


def test_environment_is_what_kmodguard_reads():
    documented = set(names(section("Environment"))) - {"KMODGUARD_"}
    source = "".join(p.read_text() for p in (REPO / "kmodguard").rglob("*.py"))
    read = set(re.findall(r'"(KMODGUARD_[A-Z_]+)"', (REPO / "kmodguard" / "paths.py").read_text()))
    assert read <= documented, read - documented  # every path setting is in the Contract
    assert all(f'"{v}"' in source for v in documented), [v for v in documented if f'"{v}"' not in source]


@pytest.fixture
def documents(indexed, tmp_path, world):
    records = (pci("0000:00:05.0", synthetic.ALIAS["gpu"])
               + pci("0000:00:06.0", synthetic.ALIAS["installed"], driver="kmg_installed"))
    run = indexed.with_devices(records, tmp_path)
    kver = world.kver
    return {"status": run("status", "--kver", kver, "--json", check_code=None).json,
            "explain": run("explain", "--json", "--kver", kver, synthetic.ALIAS["gpu"]).json,
            "fix --dry-run": run("fix", "--dry-run", "--json", "--kver", kver).json,
            "error": run("explain", "--json", "--kver", kver, "pci:[").json}


def test_every_documented_key_is_in_the_documents_the_commands_print(documents):
    s, e, f = documents["status"], documents["explain"], documents["fix --dry-run"]
    missing_device = next(d for d in s["devices"] if d["verdict"] == "missing")
    where = {"status": [s], "status `environment`": [s["environment"]], "status `devices[]`": s["devices"],
             "`candidates[]`": missing_device["candidates"] + e["results"][0]["candidates"],
             "explain": [e], "explain `results[]`": e["results"],
             "fix --dry-run": [f], "fix --dry-run `install[]`": f["install"],
             "fix --dry-run `initramfs`": [f["initramfs"]], "fix --dry-run `devices[]`": f["devices"],
             "error": [documents["error"]]}
    table = keyed("JSON documents")
    assert set(table) == set(where)
    for doc, keys in table.items():
        keys = keys[:1] if doc == "error" else keys
        assert where[doc], doc
        for item in where[doc]:
            assert set(keys) <= set(item), (doc, sorted(set(keys) - set(item)))
    assert {"name", "message"} <= set(documents["error"]["error"])
