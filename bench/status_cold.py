"""`kmodguard status --json`, cold: a fresh process each time, versus `python -c "import asyncio"`.

Both run with the same interpreter and environment, alternating, after warm-up runs (so both
find their .pyc files and shared libraries in the page cache: "cold" means a new process, not
a cold disk). status judges this machine's real devices (/sys through pyudev) against the real
tree's installed core modules and the package index. Medians of N runs; goal ratio <= 1.3.
Peak RSS of the status process is read by GNU time (or busybox time), not by os.wait4 from this
process: Linux carries the spawner's peak RSS across exec (goal <= 25 MiB).

STATE_DIR exists, as on an installed system (the package owns /var/lib/kmodguard): status keeps
what the repositories announce there per metadata revision (repository-drivers.json), and the
warm-up runs fill it. The first status after the package lists change, or one run by a user
who cannot write STATE_DIR before root has, asks the package manager instead: that is the
second row ("uncached"), measured with a STATE_DIR that does not exist.
"""

from __future__ import annotations

import json
import os
import sys

from _common import MiB, bench_env, kmodguard_command, median, peak_rss, progress, row, timed


def run(world, runs: int = 15, warmup: int = 2, rss_runs: int = 3, uncached_runs: int = 5) -> dict:
    env = bench_env(world, isolated=False)  # the machine's own /sys and /proc
    os.makedirs(env["KMODGUARD_STATE_DIR"], mode=0o755, exist_ok=True)  # as the package makes it
    env_uncached = {**env, "KMODGUARD_STATE_DIR": env["KMODGUARD_STATE_DIR"] + "-absent"}
    cmd_status = kmodguard_command() + ["status", "--json", "--kver", world.kver]
    cmd_base = [sys.executable, "-c", "import asyncio"]
    progress(f"status: {runs} cold runs each (+{warmup} warm-up)")
    for _ in range(warmup):
        timed(cmd_status, env)
        timed(cmd_base, env)
    st, base = [], []
    for i in range(runs):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            if which == 0:
                r = timed(cmd_status, env)
                assert r.returncode in (0, 3), (r.returncode, r.stdout[-500:], r.stderr[-1000:])
                st.append(r)
            else:
                r = timed(cmd_base, env)
                assert r.returncode == 0, r.stderr
                base.append(r)
    doc = json.loads(st[-1].stdout)
    t_st, t_base = median(r.wall for r in st), median(r.wall for r in base)
    progress(f"status: {uncached_runs} runs without the repository cache (STATE_DIR absent)")
    unc = []
    for _ in range(uncached_runs):
        r = timed(cmd_status, env_uncached)
        assert r.returncode in (0, 3), (r.returncode, r.stdout[-500:], r.stderr[-1000:])
        assert json.loads(r.stdout)["devices"] == doc["devices"], "the cache changed a verdict"
        unc.append(r)
    t_unc = median(r.wall for r in unc)
    progress(f"status: peak RSS, {rss_runs} runs each")
    rss_st = [peak_rss(cmd_status, env) for _ in range(rss_runs)]
    rss_base = [peak_rss(cmd_base, env) for _ in range(rss_runs)]
    rss = max(r for r, _ in rss_st)
    rss_unc = peak_rss(cmd_status, env_uncached)[0]
    verdicts = {}
    for d in doc["devices"]:
        verdicts[d["verdict"]] = verdicts.get(d["verdict"], 0) + 1
    c_st, c_base = median(r.cpu for r in st), median(r.cpu for r in base)
    rows = [
        row("status", "kmodguard status --json, cold (median)", t_st, "s", "ratio <= 1.3", t_st / t_base <= 1.3,
            t_base, 'python -c "import asyncio"', t_st / t_base),
        row("status", "  CPU time (user + system, median)", c_st, "s", "ratio <= 1.3", c_st / c_base <= 1.3,
            c_base, 'python -c "import asyncio"', c_st / c_base),
        row("status", "  peak RSS of the status process", rss / MiB, "MiB", "<= 25 MiB", rss <= 25 * MiB,
            max(r for r, _ in rss_base) / MiB, 'python -c "import asyncio"', None),
        row("status", "  uncached: the package manager asked (STATE_DIR absent; median)", t_unc, "s", "(reported)",
            True, t_base, 'python -c "import asyncio"', t_unc / t_base),
        row("status", "  uncached: peak RSS", rss_unc / MiB, "MiB", "(reported)", True, None, None, None),
    ]
    details = {
        "runs": runs, "command": cmd_status, "baseline": cmd_base,
        "status_s": [r.wall for r in st], "baseline_s": [r.wall for r in base],
        "status_cpu_s": [r.cpu for r in st], "baseline_cpu_s": [r.cpu for r in base],
        "status_peak_rss_bytes": [r for r, _ in rss_st], "baseline_peak_rss_bytes": [r for r, _ in rss_base],
        "peak_rss_read_by": rss_st[0][1],
        "uncached_s": [r.wall for r in unc], "uncached_cpu_s": [r.cpu for r in unc], "uncached_peak_rss_bytes": rss_unc,
        "devices": len(doc["devices"]), "verdicts": verdicts, "exit_code": st[-1].returncode,
    }
    return {"rows": rows, "details": details}
