"""Index build for the real kernel-modules payload (about 2,000 modules) versus depmod alone.

kmodguard: `kmodguard index build --json --from-dir PAYLOAD` into a fresh index directory each
run (a whole process: every module's .modinfo read, depmod on stand-ins that hold only that
section, the module table beside it, checksums, atomic publish).
Baseline: `depmod -C EMPTY -b ROOT KVER` on the real modules (ROOT's lib/modules/KVER/kernel is
a symlink to the payload's, plus empty modules.order/.builtin/.builtin.modinfo), as anyone would
build the package's alias index.
Medians of N runs, alternating; goal ratio <= 1.2. Index size on disk: goal <= 1 MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from _common import MiB, bench_env, kmodguard_command, median, peak_rss, progress, row, timed

import realtree


def run(world, runs: int = 5) -> dict:
    pkg = realtree.MODULES
    payload = world.payloads[pkg]
    mdir = realtree.modules_dir(payload, world.kver)
    nmods = sum(1 for _ in mdir.rglob("*.ko*"))
    work = Path(tempfile.mkdtemp(prefix="kmg-bench-index-"))
    try:
        stage = work / "depmod-root" / "lib" / "modules" / world.kver
        stage.mkdir(parents=True)
        for entry in os.scandir(mdir):
            os.symlink(entry.path, stage / entry.name)
        for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            (stage / f).touch()
        cmd_depmod = [realtree._tool("depmod"), "-C", str(world.empty), "-b", str(work / "depmod-root"), world.kver]
        env = bench_env(world)

        def cmd_index(index_dir):
            return kmodguard_command() + [
                "index", "build", "--json", "--kver", world.kver, "--package", pkg, "--version", world.kver,
                "--request", f"{pkg}-uname-r = {world.kver}", "--from-dir", str(payload), "--index-dir", str(index_dir)]

        progress(f"index build: {nmods} modules of {pkg}, {runs} runs each (+1 warm-up)")
        kmg, dep = [], []
        summary = None
        for i in range(runs + 1):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                if which == 0:
                    index_dir = work / f"index-{i}"
                    r = timed(cmd_index(index_dir), env)
                    assert r.returncode == 0, (r.stdout[-500:], r.stderr[-1000:])
                    summary = json.loads(r.stdout)["built"][0]
                    files = {f.name: (f.stat().st_size, f.stat().st_blocks * 512)
                             for f in Path(summary["path"]).resolve().rglob("*") if f.is_file()}
                    shutil.rmtree(index_dir)
                    if i:  # run 0 warms the page cache
                        kmg.append(r)
                else:
                    r = timed(cmd_depmod, env)
                    assert r.returncode == 0, r.stderr[-1000:]
                    if i:
                        dep.append(r)
        t_k, t_d = median(r.wall for r in kmg), median(r.wall for r in dep)
        rss_k, _ = peak_rss(cmd_index(work / "index-rss"), env)
        rss_d, how = peak_rss(cmd_depmod, env)
        apparent = sum(s for s, _ in files.values())
        allocated = sum(b for _, b in files.values())
        rows = [
            row("index", f"kmodguard index build, {summary['modules']} modules (median)", t_k, "s", "ratio <= 1.2",
                t_k / t_d <= 1.2, t_d, "depmod -b on the same modules", t_k / t_d),
            row("index", "  CPU time (user + system; kmodguard's spans both cores)", median(r.cpu for r in kmg), "s",
                "(reported)", True, median(r.cpu for r in dep), "depmod", median(r.cpu for r in kmg) / median(r.cpu for r in dep)),
            row("index", "  index size on disk (allocated)", allocated / MiB, "MiB", "<= 1 MiB",
                allocated <= MiB and apparent <= MiB, None, None, None),
        ]
        details = {
            "runs": runs, "modules": summary["modules"], "kmodguard_s": [r.wall for r in kmg],
            "depmod_s": [r.wall for r in dep], "kmodguard_cpu_s": [r.cpu for r in kmg], "depmod_cpu_s": [r.cpu for r in dep],
            "kmodguard_peak_rss_bytes": rss_k,
            "depmod_peak_rss_bytes": rss_d, "peak_rss_read_by": how, "size_bytes": apparent,
            "size_allocated_bytes": allocated, "files": {k: v[0] for k, v in sorted(files.items())},
        }
        return {"rows": rows, "details": details}
    finally:
        shutil.rmtree(work, ignore_errors=True)
