"""Running `kmodguard status` on exactly the devices a test fakes (umockdev records, records.py),
against the synthetic world of gcc-built modules (synthetic.py: ALIAS names a modalias for each
outcome), and reading its answer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from synthetic import ALIAS, KVER

PACKAGE_VERSION = "6.1.0-1.kmg"  # what the `indexed` fixture records
SYS = "/sys"
GPU = ALIAS["gpu"]  # missing: kmg_gpu in kernel-modules (if unbound and not ignored)


def syspath(addr: str) -> str:
    return f"{SYS}/devices/pci0000:00/{addr}"


def status(runner, records: str, tmp_path, *args: str, code: int | None = None, env: dict | None = None):
    """`kmodguard status --kver KVER ARGS` with exactly these devices; `env` adds variables."""
    run = runner.with_devices(records, tmp_path)
    if env:
        run = dataclasses.replace(run, env={**run.env, **env})
    return run("status", "--kver", KVER, *args, check_code=code)


def status_json(runner, records: str, tmp_path, code: int | None = None, env: dict | None = None) -> dict:
    res = status(runner, records, tmp_path, "--json", code=code, env=env)
    return res.json


def by_id(doc: dict) -> dict:
    return {d["id"]: d for d in doc["devices"]}


def write_policy(runner, text: str) -> None:
    etc = Path(runner.env["KMODGUARD_CONFIG_DIR"])
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "kmodguard.toml").write_text(text)


def assert_no_control_characters(text: str) -> None:
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    assert not bad, f"raw control characters in output: {bad!r}"
