"""Time of `kmodguard fix --yes`, split into the package manager's time and kmodguard's own.

Set-up (as tests/backends/test_fix_dnf.py): signed Fedora-like kernel RPMs in a createrepo_c repository,
an installroot holding kernel-core + kernel-modules-core, two GPUs faked with umockdev, the real
dnf 4. This machine's kernel cannot load modules, so a run ends at the load step instead of
"device bound"; what is measured is everything a fix does up to it, from a fresh process:
  package manager = every dnf and rpm process the fix ran, wherever in the fix it ran (the rpm
                    database check, the firmware repoquery that judging asks since issue 14, the
                    availability repoquery, the dnf transaction): the union of their wall-clock
                    intervals, recorded by shims on PATH that run the real tool (kmodguard finds
                    both through PATH, as on a real system)
  external tools  = depmod, recorded the same way
  kmodguard's own = the rest: start-up, judging, planning, loading attempt, probing, reporting
                    (umockdev-run's own start-up, measured in the same run, is left out: test harness).
The install step's own seconds (what kmodguard's report says) are kept in the details: before the
firmware lookups, they were the package manager's whole time.
Goal: kmodguard's own share <= 10 %.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import rpmbuild
import synthetic
from rpmbuild import KVER, LOGGED


def _dnf(root: Path, *args: str) -> None:
    res = subprocess.run(["dnf", "-y", "--installroot", str(root), *args], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C"}, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(res.stdout + res.stderr)


SHIM = """#!/bin/bash
# bench/fix_time.py: run the real {tool}, and record its wall-clock interval
start=$EPOCHREALTIME
{real} "$@"
rc=$?
echo "{tool} $start $EPOCHREALTIME" >> {log}
exit $rc
"""


def _shims(bindir: Path, log: Path) -> None:
    bindir.mkdir()
    for tool in ("dnf", "rpm", "depmod"):
        real = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        (bindir / tool).write_text(SHIM.format(tool=tool, real=real, log=log))
        (bindir / tool).chmod(0o755)


def _union(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the intervals (a dnf scriptlet's rpm inside its dnf counts once)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _tool_times(log: Path) -> tuple[float, float]:
    """(package manager, depmod) seconds: dnf and rpm, then what depmod adds outside them (a
    package's scriptlet runs depmod inside dnf's transaction: that is the package manager's)."""
    pm, every = [], []
    for line in log.read_text().splitlines() if log.exists() else ():
        tool, a, b = line.split()
        every.append((float(a), float(b)))
        if tool != "depmod":
            pm.append(every[-1])
    return _union(pm), _union(every) - _union(pm)


def run(runs: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="kmg-fix-bench.") as tmp:
        tmp = Path(tmp)
        repo, rpms = rpmbuild.kernel_repo(tmp / "rpms", (KVER,), scripts=LOGGED, signed=True, name="repo")
        key = rpmbuild.test_key(tmp / "rpms")
        rpmbuild.build_rpm(repo, "kmg-release", "42", provides=("system-release(releasever) = 42",), sign=key)
        rpmbuild.createrepo(repo)
        base = tmp / "image"
        (base / "etc/yum.repos.d").mkdir(parents=True)
        (base / "etc/yum.repos.d/kmg.repo").write_text(
            f"[kmg]\nname=kmg\nbaseurl=file://{repo}\ngpgcheck=1\ngpgkey=file://{key.public}\n")
        _dnf(base, "--releasever", "42", "install", "kmg-release", f"kernel-core-uname-r = {KVER}",
             f"kernel-modules-core-uname-r = {KVER}")
        subprocess.run(["depmod", "-b", str(base), KVER], check=True)
        gpu = synthetic.ALIAS["gpu"]
        devices = tmp / "devices.umockdev"
        devices.write_text("".join(
            f"P: /devices/pci0000:00/{a}\nE: SUBSYSTEM=pci\nE: MODALIAS={gpu}\nA: modalias={gpu}\n"
            f"A: driver_override=(null)\n\n" for a in ("0000:00:05.0", "0000:00:06.0")))
        (tmp / "etc").mkdir()
        (tmp / "etc/kmodguard.toml").write_text('backend = "dnf"\n[timeouts]\nsettle = 0.2\n')
        totals, pm, tools, harness, install_step, depmod_step = [], [], [], [], [], []
        for i in range(runs):
            root = tmp / f"root{i}"
            subprocess.run(["cp", "-a", str(base), str(root)], check=True)
            env = {**os.environ, "KMODGUARD_ROOT": str(root), "KMODGUARD_MODULES_DIR": str(root / "lib/modules" / KVER),
                   "KMODGUARD_MODPROBE_DIRS": str(root / "etc/modprobe.d"), "KMODGUARD_CONFIG_DIR": str(tmp / "etc"),
                   "KMODGUARD_INDEX_DIR": str(tmp / "index"), "KMODGUARD_STATE_DIR": str(tmp / f"state{i}"),
                   "KMODGUARD_BOOT_DIR": str(root / "boot"), "KMODGUARD_KMSG": "/nonexistent",
                   "KMODGUARD_CONTAINER": "none", "PYTHONDONTWRITEBYTECODE": "",
                   "PYTHONPATH": str(_common.REPO)}  # this checkout's kmodguard, not the one the venv installed
            if i == 0:
                subprocess.run(_common.kmodguard_command() + ["index", "build", "--from-rpm",
                                                              str(rpms[KVER]["kernel-modules"])],
                               env=env, check=True, capture_output=True)
            t = time.perf_counter()
            subprocess.run(["umockdev-run", "--device", str(devices), "--", "true"], env=env, check=True)
            harness.append(time.perf_counter() - t)
            log = tmp / f"tools{i}.log"
            _shims(tmp / f"shims{i}", log)
            fix_env = {**env, "PATH": f"{tmp / f'shims{i}'}:{env.get('PATH', '/usr/bin:/bin')}"}
            t = time.perf_counter()
            res = subprocess.run(["umockdev-run", "--device", str(devices), "--", *_common.kmodguard_command(),
                                  "fix", "--yes", "--json", "--kver", KVER], env=fix_env, capture_output=True, text=True)
            total = time.perf_counter() - t
            doc = json.loads(res.stdout)
            steps = {s["step"]: s for s in doc["steps"]}
            assert steps["install"]["result"] == "done", steps
            totals.append(total - harness[-1])  # umockdev-run's own start-up is the test harness
            pm_s, depmod_s = _tool_times(log)
            pm.append(pm_s)
            tools.append(depmod_s)
            install_step.append(steps["install"]["seconds"])
            depmod_step.append(steps["depmod"]["seconds"])
    total, pm_t, tool_t = statistics.median(totals), statistics.median(pm), statistics.median(tools)
    own = total - pm_t - tool_t
    share = own / total
    rows = [
        _common.row("fix", "fix --yes, whole run (2 devices, 1 package)", total, "s", "(reported)", True),
        _common.row("fix", "  package manager (every dnf and rpm run)", pm_t, "s", "(reported)", True),
        _common.row("fix", "  depmod", tool_t, "s", "(reported)", True),
        _common.row("fix", "  kmodguard's own", own, "s", "share <= 10 %", share <= 0.10, total, "whole run", share),
    ]
    old_own = total - statistics.median(install_step) - statistics.median(depmod_step)
    return {"rows": rows, "details": {"totals": totals, "package_manager": pm, "depmod": tools, "harness": harness,
                                      "own_share": share, "install_step": install_step, "depmod_step": depmod_step,
                                      "own_share_by_steps": old_own / total}}


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent)]
    r = run()
    for row in r["rows"]:
        print(row["metric"], f"{row['value']:.3f} s", f"ratio {row['ratio']:.3f}" if row["ratio"] else "")
