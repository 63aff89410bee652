"""Shared by the benchmarks: process timing with peak RSS, medians, result rows."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(REPO / "tests" / "helpers")):
    if p not in sys.path:
        sys.path.insert(0, p)

MiB = 1024 * 1024


@dataclass
class Run:
    wall: float  # seconds, from fork to reaping
    returncode: int
    stdout: bytes
    stderr: bytes
    cpu: float = 0.0  # user + system seconds of the process and its children (from wait4)


def timed(cmd: list[str], env: dict | None = None, stdin: bytes | None = None, cwd=None) -> Run:
    """Run cmd once and time it: wall clock, and CPU time from wait4, which a machine shared with
    other work disturbs less (peak RSS: see peak_rss; wait4's figure would be this process's)."""
    with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if stdin:
            inp.write(stdin)
            inp.seek(0)
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=inp, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(wall, proc.returncode, out.read(), err.read(), usage.ru_utime + usage.ru_stime)


def peak_rss(cmd: list[str], env: dict | None = None) -> tuple[int, str]:
    """Peak RSS (bytes) of cmd, read by a small launcher: GNU time, else busybox time.

    Not os.wait4 on a child of this process: Linux keeps a process's peak RSS across exec, and
    a child forked (or vforked) from this large Python process starts with its RSS, so every
    such figure would read the same large number. A launcher of 1-2 MiB forks the command instead.
    """
    gnu = "/usr/bin/time"
    version = subprocess.run([gnu, "--version"], capture_output=True, text=True) if os.access(gnu, os.X_OK) else None
    if version is not None and "GNU" in version.stdout + version.stderr:
        launcher, scale, how = [gnu], 1, "GNU time"
    elif shutil.which("busybox"):
        # busybox (1.35) prints ru_maxrss * (page size / 1024): it takes kilobytes for pages
        launcher, scale, how = [shutil.which("busybox"), "time"], os.sysconf("SC_PAGE_SIZE") // 1024, "busybox time"
    else:
        raise RuntimeError("peak RSS needs /usr/bin/time (package 'time') or busybox")
    with tempfile.NamedTemporaryFile("r") as out:
        proc = subprocess.run(launcher + ["-f", "%M", "-o", out.name] + cmd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"{cmd}: exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
        kib = int(re.findall(r"\d+", out.read())[-1])
    return kib * 1024 // scale, how


def bench_env(world, isolated: bool = True) -> dict:
    """The world's kmodguard environment, with bytecode caching on (an installed package has its
    .pyc files; a PYTHONDONTWRITEBYTECODE inherited from a sandbox would recompile every run)."""
    env = world.env(isolated=isolated)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def median(xs) -> float:
    return statistics.median(xs)


def row(benchmark: str, metric: str, value: float, unit: str, goal: str, met: bool,
        baseline: float | None = None, baseline_name: str | None = None, ratio: float | None = None) -> dict:
    return {"benchmark": benchmark, "metric": metric, "value": value, "unit": unit, "baseline": baseline,
            "baseline_name": baseline_name, "ratio": ratio, "goal": goal, "met": met}


def kmodguard_command() -> list[str]:
    """What a user runs: the console script beside this interpreter (same interpreter), else -m."""
    script = Path(sys.executable).parent / "kmodguard"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kmodguard"]


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)
