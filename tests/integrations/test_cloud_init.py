"""cloud-init: the examples in docs/cloud-init/ as cloud-init's own schema command and kmodguard's
policy validator judge them, and kmodguard-check.service among cloud-init's real units.

cloud-init is never run against this machine: only `cloud-init schema --config-file` (which reads
the given file) and its unit files and /etc/cloud/cloud.cfg are used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kmodguard import config
from kmodguard.errors import InvalidInput

REPO = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO / "docs" / "cloud-init"
EXAMPLES = sorted(p.name for p in EXAMPLES_DIR.glob("*.yaml"))
# what each documented example must make kmodguard do
EXPECTED_MODE = {"offer-only.yaml": "offer", "auto-fix-gpus.yaml": "auto", "hands-off.yaml": "off"}
DROP_IN = re.compile(r"^/etc/kmodguard/conf\.d/(\d\d-cloud-init\.toml)$")
UNIT = REPO / "units" / "kmodguard-check.service"
SYSTEM_UNITS = Path("/lib/systemd/system") if Path("/lib/systemd/system/cloud-init.target").exists() \
    else Path("/usr/lib/systemd/system")


def cloud_init() -> str:
    path = shutil.which("cloud-init")
    assert path, "cloud-init is not installed: run tools/setup --test (it is used for its schema command only)"
    return path


def schema(path: Path) -> subprocess.CompletedProcess:
    """cloud-init's schema check of one user-data file. 22.4 (Debian 12) prints "Valid
    cloud-config: FILE" and exits 0, or prints the errors on stderr and exits 1."""
    return subprocess.run([cloud_init(), "schema", "--config-file", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=path.parent)


def top_level_schema_is_closed() -> bool:
    """True from cloud-init 23.4 on: the schema lists every top-level key (additionalProperties false)."""
    probe = "from cloudinit.config.schema import get_schema\nprint(get_schema().get('additionalProperties', True))"
    res = subprocess.run([sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip() == "False"


def drop_in_of(example: str) -> tuple[str, str]:
    """(file name, TOML text) of the one kmodguard drop-in the example writes."""
    doc = yaml.safe_load((EXAMPLES_DIR / example).read_text())
    entries = [e for e in doc.get("write_files", []) if DROP_IN.match(e.get("path", ""))]
    assert len(entries) == 1, f"{example}: one write_files entry for /etc/kmodguard/conf.d/NN-cloud-init.toml"
    entry = entries[0]
    # deferred files are written in cloud-init's final stage, after kmodguard-check.service
    assert not entry.get("defer", False), f"{example}: defer: true writes the policy after the check"
    assert entry.get("encoding", "text/plain") == "text/plain" and not entry.get("append", False), entry
    assert entry.get("permissions", "0644") == "0644", entry
    return DROP_IN.match(entry["path"]).group(1), entry["content"]


def load_drop_in(tmp_path: Path, name: str, text: str) -> config.Config:
    (tmp_path / "conf.d").mkdir(exist_ok=True)
    (tmp_path / "conf.d" / name).write_text(text)
    return config.load(tmp_path)


def test_the_documented_examples_are_there():
    assert set(EXPECTED_MODE) <= set(EXAMPLES), EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_is_valid_cloud_config(example):
    text = (EXAMPLES_DIR / example).read_text()
    assert text.startswith("#cloud-config\n"), "a complete #cloud-config document"
    res = schema(EXAMPLES_DIR / example)
    assert res.returncode == 0 and f"Valid cloud-config: {EXAMPLES_DIR / example}" in res.stdout, \
        res.stdout + res.stderr


def test_the_schema_command_does_check_write_files(tmp_path):
    """The control: a misspelt write_files entry is refused, so a pass above means something."""
    bad = tmp_path / "user-data"
    bad.write_text("#cloud-config\nwrite_files:\n  - path: /etc/kmodguard/conf.d/90-cloud-init.toml\n"
                   "    contnet: |\n      mode = \"auto\"\n")
    res = schema(bad)
    assert res.returncode != 0 and "'contnet' was unexpected" in res.stderr, res.stdout + res.stderr


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_policy_each_example_writes_is_accepted_by_kmodguard(example, tmp_path):
    name, text = drop_in_of(example)
    policy = load_drop_in(tmp_path, name, text)
    assert policy.sources == (str(tmp_path / "conf.d" / name),)
    if example in EXPECTED_MODE:
        assert policy.mode == EXPECTED_MODE[example]
    if example == "auto-fix-gpus.yaml":
        assert policy.auto_buses == ("pci",) and policy.initramfs == "never"
        assert set(policy.packages) <= set(config.DEFAULT_PACKAGES)  # no wider than the default allow-list
        assert "nouveau" in policy.ignore.modules
    # a list in a drop-in replaces the default one: an example that sets one keeps the defaults
    # (the q35 noise pcspkr and lpc_ich, the CPU subsystem)
    for field in config.Ignore._fields:
        dropped = set(getattr(config.Ignore(), field)) - set(getattr(policy.ignore, field))
        assert not dropped, f"{example}: ignore.{field} drops the defaults {sorted(dropped)}"


@pytest.mark.parametrize("text, key, allowed", [
    ('mode = "sometimes"\n', "mode", "off, offer, auto"),
    ('initramfs = "later"\n', "initramfs", "auto, always, never"),
    ('mode = "auto"\ncolour = "blue"\n', "unknown key 'colour'",
     "known: auto_buses, backend, firmware_packages, ignore, initramfs, mode, packages, timeouts"),
    ('[timeouts]\nforever = 1\n', "unknown key timeouts.forever", "known: package_manager, lock_wait, settle, dracut"),
])
def test_a_bad_drop_in_is_refused_naming_file_key_and_allowed_values(tmp_path, text, key, allowed):
    # cloud-init cannot see into the TOML: it accepts the user data as it is ...
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\n" + yaml.safe_dump(
        {"write_files": [{"path": "/etc/kmodguard/conf.d/90-cloud-init.toml", "content": text}]}))
    res = schema(user_data)
    assert res.returncode == 0, res.stdout + res.stderr
    # ... kmodguard's validator refuses it, saying where, what and what would do
    (tmp_path / "etc").mkdir()
    with pytest.raises(InvalidInput) as exc:
        load_drop_in(tmp_path / "etc", "90-cloud-init.toml", text)
    message = exc.value.message
    assert str(tmp_path / "etc" / "conf.d" / "90-cloud-init.toml") in message, message
    assert key in message and allowed in message, message


def test_a_kmodguard_key_in_the_cloud_config_is_not_the_way(tmp_path):
    """A top-level `kmodguard:` key: cloud-init 22.4 calls the document valid and ignores the key
    (the instance would silently keep the image's policy); 23.4 onwards refuse the document."""
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\nkmodguard:\n  mode: auto\n")
    res = schema(user_data)
    if top_level_schema_is_closed():
        assert res.returncode != 0 and "'kmodguard' was unexpected" in res.stderr, res.stdout + res.stderr
    else:
        assert res.returncode == 0 and "Valid cloud-config" in res.stdout, res.stdout + res.stderr


def test_write_files_runs_before_cloud_config_service():
    """The premise of the unit's ordering, from the installed cloud-init's own configuration:
    write_files is an init-stage module (cloud-init.service), and only its deferred form runs in
    the final stage (cloud-final.service)."""
    cloud_init()
    cfg = yaml.safe_load(Path("/etc/cloud/cloud.cfg").read_text())

    def names(stage):
        return [(m if isinstance(m, str) else m[0]).replace("-", "_") for m in cfg.get(stage, [])]

    assert "write_files" in names("cloud_init_modules"), cfg.get("cloud_init_modules")
    assert "write_files" not in names("cloud_config_modules") + names("cloud_final_modules")
    deferred = "write_files_deferred"
    assert deferred not in names("cloud_init_modules") + names("cloud_config_modules")
    # and cloud-init orders its own stages as the unit assumes: final after config
    final = (SYSTEM_UNITS / "cloud-final.service").read_text()
    assert re.search(r"^After=.*\bcloud-config\.service\b", final, re.M), final


# --- kmodguard-check.service -----------------------------------------------------------------

def unit_lines() -> list[str]:
    return [line.strip() for line in UNIT.read_text().splitlines() if line.strip() and not line.startswith("#")]


def installed_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as installed, ExecStart pointing at this checkout's command (verify wants it to exist)."""
    script = Path(sys.executable).parent / "kmodguard"
    assert script.exists(), "tools/setup installs the kmodguard command into the virtual environment"
    path = tmp_path / UNIT.name
    path.write_text((text if text is not None else UNIT.read_text()).replace("/usr/bin/kmodguard", f'"{script}"'))
    return path


def test_check_unit_runs_the_policy_once_cloud_init_configured_the_machine():
    lines = unit_lines()
    assert "Type=oneshot" in lines
    assert "ExecStart=/usr/bin/kmodguard check --apply-policy" in lines
    assert "SuccessExitStatus=3" in lines  # 3: some device needs a package or a fix (reported)
    assert "After=cloud-config.service" in lines and "Before=cloud-final.service" in lines
    assert "WantedBy=cloud-init.target" in lines
    # offer mode needs no network; an auto fix gets it through cloud-config.service's ordering
    assert not any(line.startswith(("Wants=network-online", "Requires=")) for line in lines), lines


def test_check_unit_options_exist_in_the_command():
    command = next(line for line in unit_lines() if line.startswith("ExecStart=")).split()
    assert command[:2] == ["ExecStart=/usr/bin/kmodguard", "check"]
    script = Path(sys.executable).parent / "kmodguard"
    res = subprocess.run([str(script), "check", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for option in command[2:]:
        assert option in res.stdout, option


def test_systemd_analyze_verify_is_clean(tmp_path):
    res = subprocess.run(["systemd-analyze", "verify", str(installed_copy(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    # verify exits 0 on some errors: what it prints is the verdict
    assert res.returncode == 0 and res.stderr.strip() == "" and res.stdout.strip() == "", res.stderr + res.stdout


def verify_in_cloud_init_target(tmp_path: Path, text: str | None = None) -> subprocess.CompletedProcess:
    """systemd-analyze verify of cloud-init.target with the unit enabled in it (a .wants link as
    `systemctl enable` makes): the transaction holds cloud-init's real units and ours."""
    cloud_init()
    assert (SYSTEM_UNITS / "cloud-init.target").exists(), "cloud-init's units: run tools/setup --test"
    unit = installed_copy(tmp_path, text)
    (tmp_path / "cloud-init.target.wants").mkdir()
    (tmp_path / "cloud-init.target.wants" / UNIT.name).symlink_to(unit)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}  # trailing colon: then the usual path
    return subprocess.run(["systemd-analyze", "verify", "cloud-init.target", str(unit)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_check_unit_fits_between_cloud_init_units_without_a_cycle(tmp_path):
    res = verify_in_cloud_init_target(tmp_path)
    assert res.returncode == 0 and res.stderr.strip() == "" and res.stdout.strip() == "", res.stderr + res.stdout


def test_verify_does_see_an_ordering_cycle_with_cloud_init_units(tmp_path):
    """The control: ordered the wrong way round, the same check reports the cycle."""
    wrong = UNIT.read_text().replace("After=cloud-config.service", "Before=cloud-config.service") \
                            .replace("Before=cloud-final.service", "After=cloud-final.service")
    res = verify_in_cloud_init_target(tmp_path, wrong)
    assert "ordering cycle" in res.stderr, res.stderr + res.stdout
