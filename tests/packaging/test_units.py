"""The files under units/ as systemd, dbus-daemon and polkit read them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units"
SERVICES = ("kmodguard.service", "kmodguard-fix.service")


def _installed_copy(unit: str, tmp_path: Path) -> Path:
    """The unit as it would be installed, with ExecStart pointing at this checkout's command
    (systemd-analyze verify checks that the executable exists)."""
    script = Path(sys.executable).parent / "kmodguard"
    assert script.exists(), "tools/setup installs the kmodguard command into the virtual environment"
    text = (UNITS / unit).read_text().replace("/usr/bin/kmodguard", f'"{script}"')
    (tmp_path / unit).write_text(text)
    return tmp_path / unit


@pytest.mark.parametrize("unit", SERVICES)
def test_systemd_analyze_verify_is_clean(unit, tmp_path):
    # `verify` exits 0 on some errors: what it prints is the verdict
    res = subprocess.run(["systemd-analyze", "verify", str(_installed_copy(unit, tmp_path))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "" and res.stdout.strip() == "", res.stderr + res.stdout


def test_the_daemon_is_hardened_and_the_fix_unit_is_what_may_change_the_system(tmp_path):
    scores = {}
    for unit in SERVICES:
        res = subprocess.run(["systemd-analyze", "security", "--offline=true", str(_installed_copy(unit, tmp_path))],
                             capture_output=True, text=True, timeout=60)
        scores[unit] = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout).group(1))
    assert scores["kmodguard.service"] <= 2.0, scores  # "OK": the watcher can read, not change, the system
    daemon = (UNITS / "kmodguard.service").read_text()
    assert "CapabilityBoundingSet=\n" in daemon and "~@privileged" in daemon and "@module" in daemon
    assert "Type=notify" in daemon and "WatchdogSec=" in daemon and "BusName=org.kmodguard.Daemon1" in daemon
    fix = (UNITS / "kmodguard-fix.service").read_text()
    assert "Type=oneshot" in fix and "--request /var/lib/kmodguard/fix-request.json" in fix


# Launchers that put a process under MemoryDenyWriteExecute, then exec the command after them.
# systemd (252, Debian 12's) enforces MemoryDenyWriteExecute=yes with this seccomp filter
# (src/shared/seccomp-util.c, seccomp_memory_deny_write_execute): no mapping both writable and
# executable, no mprotect that adds execute, no executable System V shared memory. Kernels from
# 6.3 on also have PR_SET_MDWE, the same refusal set by the kernel itself (newer systemd uses it).
MDWE_SECCOMP = """\
import errno, mmap, os, sys
import seccomp
W, X, SHM_EXEC = mmap.PROT_WRITE, mmap.PROT_EXEC, 0o100000
f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
deny = seccomp.ERRNO(errno.EPERM)
f.add_rule(deny, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, W | X, W | X))
f.add_rule(deny, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(deny, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(deny, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
f.load()
os.execv(sys.argv[1], sys.argv[1:])
"""
MDWE_PRCTL = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _kernel_has_pr_set_mdwe() -> bool:
    probe = subprocess.run([sys.executable, "-c", MDWE_PRCTL, "/bin/true"], capture_output=True, text=True)
    return probe.returncode == 0


def test_the_daemon_runs_with_memory_deny_write_execute(tmp_path):
    """The unit sets MemoryDenyWriteExecute=yes: Python, cffi (libkmod) and pyudev's ctypes must
    start under it. Proven with systemd's own mechanism (its seccomp filter) on every kernel, and
    with the kernel's PR_SET_MDWE where the kernel has it (Linux >= 6.3); the e2e systemd guest
    runs the shipped unit itself."""
    mechanisms = {"seccomp (systemd 252's MemoryDenyWriteExecute)": MDWE_SECCOMP}
    if _kernel_has_pr_set_mdwe():
        mechanisms["PR_SET_MDWE"] = MDWE_PRCTL
    env = {**os.environ, "KMODGUARD_RUNTIME_DIR": str(tmp_path / "run"), "KMODGUARD_STATE_DIR": str(tmp_path / "state"),
           "KMODGUARD_CONFIG_DIR": str(tmp_path / "etc"), "KMODGUARD_MOTD_DIR": str(tmp_path / "motd"),
           "PYTHONPATH": str(REPO)}
    for what, launcher in mechanisms.items():
        probe = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-c",
                                "import mmap\ntry:\n mmap.mmap(-1, 4096, prot=7)\n print('allowed')\n"
                                "except OSError:\n print('refused')"], capture_output=True, text=True)
        assert probe.stdout.strip() == "refused", (what, probe.stdout, probe.stderr)  # the restriction holds
        proc = subprocess.Popen([sys.executable, "-c", launcher, sys.executable, "-m", "kmodguard", "daemon",
                                 "--no-bus", "--json"], env=env, stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()  # the daemon's first log line comes after its coldplug scan
        proc.terminate()
        rest = proc.communicate(timeout=30)[1]
        assert '"kmodguard_event": "started"' in line, (what, line + rest)
        assert proc.returncode == 0 and "Traceback" not in rest, (what, rest)


def test_dbus_policy_activation_and_polkit_files_agree_with_the_code():
    from kmodguard import dbus as D
    from kmodguard.daemon import bus

    policy = ET.parse(UNITS / "org.kmodguard.Daemon1.conf").getroot()
    owners = [p.get("user") for p in policy.findall("policy") if p.find(f"allow[@own='{D.BUS_NAME}']") is not None]
    assert owners == ["root"]  # only root owns the name
    default = policy.find("policy[@context='default']")
    assert default.find(f"allow[@send_destination='{D.BUS_NAME}'][@send_interface='{D.INTERFACE}']") is not None
    activation = (UNITS / "org.kmodguard.Daemon1.service").read_text()
    assert f"Name={D.BUS_NAME}" in activation and "SystemdService=kmodguard.service" in activation
    actions = {a.get("id"): a.find("defaults/allow_active").text
               for a in ET.parse(UNITS / "org.kmodguard.policy").getroot().findall("action")}
    assert actions == {bus.ACTION_FIX: "auth_admin_keep", bus.ACTION_RELOAD: "auth_admin_keep"}
    interface = ET.parse(UNITS / "org.kmodguard.Daemon1.xml").getroot()
    assert interface.get("name") == D.OBJECT_PATH and interface.find(f"interface[@name='{D.INTERFACE}']") is not None


def test_the_dbus_policy_is_accepted_by_dbus_daemon(tmp_path):
    """dbus-daemon refuses to start on a policy file it cannot parse: start one with ours."""
    config = tmp_path / "bus.conf"
    config.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={tmp_path}/s</listen>
<include>{UNITS / 'org.kmodguard.Daemon1.conf'}</include></busconfig>""")
    res = subprocess.run([shutil.which("dbus-daemon"), "--config-file", str(config), "--fork", "--nopidfile",
                          "--print-pid=1"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    os.kill(int(res.stdout.split()[0]), 15)
