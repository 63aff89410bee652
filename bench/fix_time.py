"""Time of `kmodguard fix --yes`, split into the package manager's time and kmodguard's own.

Set-up (as tests/test_fix_dnf.py): signed Fedora-like kernel RPMs in a createrepo_c repository,
an installroot holding kernel-core + kernel-modules-core, two GPUs faked with umockdev, the real
dnf 4. This machine's kernel cannot load modules, so a run ends at the load step instead of
"device bound"; what is measured is everything a fix does up to it, from a fresh process:
  package manager = the install step (rpm database check, repoquery, the dnf transaction)
  external tools  = depmod
  kmodguard's own = the rest: start-up, judging, planning, loading attempt, probing, reporting
                    (umockdev-run's own start-up, measured in the same run, is left out: test harness).
Goal: kmodguard's own share <= 10 %.
"""

from __future__ import annotations

import json
import os
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
        totals, pm, tools, harness = [], [], [], []
        for i in range(runs):
            root = tmp / f"root{i}"
            subprocess.run(["cp", "-a", str(base), str(root)], check=True)
            env = {**os.environ, "KMODGUARD_ROOT": str(root), "KMODGUARD_MODULES_DIR": str(root / "lib/modules" / KVER),
                   "KMODGUARD_MODPROBE_DIRS": str(root / "etc/modprobe.d"), "KMODGUARD_CONFIG_DIR": str(tmp / "etc"),
                   "KMODGUARD_INDEX_DIR": str(tmp / "index"), "KMODGUARD_STATE_DIR": str(tmp / f"state{i}"),
                   "KMODGUARD_BOOT_DIR": str(root / "boot"), "KMODGUARD_KMSG": "/nonexistent",
                   "KMODGUARD_CONTAINER": "none", "PYTHONDONTWRITEBYTECODE": ""}
            if i == 0:
                subprocess.run(_common.kmodguard_command() + ["index", "build", "--from-rpm",
                                                              str(rpms[KVER]["kernel-modules"])],
                               env=env, check=True, capture_output=True)
            t = time.perf_counter()
            subprocess.run(["umockdev-run", "--device", str(devices), "--", "true"], env=env, check=True)
            harness.append(time.perf_counter() - t)
            t = time.perf_counter()
            res = subprocess.run(["umockdev-run", "--device", str(devices), "--", *_common.kmodguard_command(),
                                  "fix", "--yes", "--json", "--kver", KVER], env=env, capture_output=True, text=True)
            total = time.perf_counter() - t
            doc = json.loads(res.stdout)
            steps = {s["step"]: s for s in doc["steps"]}
            assert steps["install"]["result"] == "done", steps
            totals.append(total - harness[-1])  # umockdev-run's own start-up is the test harness
            pm.append(steps["install"]["seconds"])
            tools.append(steps["depmod"]["seconds"])
    total, pm_t, tool_t = statistics.median(totals), statistics.median(pm), statistics.median(tools)
    own = total - pm_t - tool_t
    share = own / total
    rows = [
        _common.row("fix", "fix --yes, whole run (2 devices, 1 package)", total, "s", "(reported)", True),
        _common.row("fix", "  package manager (rpm check, repoquery, dnf)", pm_t, "s", "(reported)", True),
        _common.row("fix", "  depmod", tool_t, "s", "(reported)", True),
        _common.row("fix", "  kmodguard's own", own, "s", "share <= 10 %", share <= 0.10, total, "whole run", share),
    ]
    return {"rows": rows, "details": {"totals": totals, "package_manager": pm, "depmod": tools, "harness": harness,
                                      "own_share": share}}


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent)]
    r = run()
    for row in r["rows"]:
        print(row["metric"], f"{row['value']:.3f} s", f"ratio {row['ratio']:.3f}" if row["ratio"] else "")
