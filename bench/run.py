"""Run kmodguard's benchmarks, print a table, write bench/results/latest.json.

    .venv/bin/python bench/run.py [--only lookups,status,index,plan,fix,daemon] [--quick] [--profile] [--out FILE]

Every figure is set against a baseline measured in the same run on the same machine (machines
are noisy; only ratios travel). The real-tree benchmarks share one world: Debian's
kernel package linux-image-amd64 depends on today (tests/helpers/realtree.py: cached, or downloaded
once) split the Fedora way.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import _common  # noqa: E402  (puts the repository and tests/ on sys.path)
import realtree  # noqa: E402

ALL = ("lookups", "status", "index", "plan", "fix", "daemon")


def machine() -> dict:
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return None

    return {
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": sys.version.split()[0],
        "executable": sys.executable, "kmod": first_line(["kmod", "--version"]),
        "commit": first_line(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"]),
    }


def fmt(value, unit) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.2f} MiB"
    return f"{value:.1f} {unit}" if unit != "us" else f"{value:.1f} µs"


def table(rows: list[dict]) -> str:
    head = ("benchmark", "figure", "kmodguard", "baseline", "ratio", "goal", "")
    lines = [head]
    for r in rows:
        lines.append((r["benchmark"], r["metric"], fmt(r["value"], r["unit"]),
                      fmt(r["baseline"], r["unit"]) if r["baseline"] is not None else "-",
                      f"{r['ratio']:.2f}" if r["ratio"] is not None else "-", r["goal"],
                      "" if r["goal"] in ("-", "(reported)") else ("ok" if r["met"] else "MISSED")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {', '.join(ALL)}")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run; noisier figures)")
    ap.add_argument("--profile", action="store_true", help="also profile kmodguard's lookup phase (cProfile)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = ap.parse_args(argv)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(chosen) - set(ALL)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    started = time.time()
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                     "quick": args.quick, "benchmarks": {}}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kmg-bench-") as tmp:
        world = None
        if set(chosen) & {"lookups", "status", "index"}:
            try:
                tree = realtree.ensure_tree()
            except realtree.RealTreeUnavailable as exc:
                print(f"bench: the real kernel tree is unavailable:\n{exc}", file=sys.stderr)
                return 1
            _common.progress(f"building the split world of {tree.package} (symlinks, depmod, index build)")
            world = realtree.build_world(tree, Path(tmp) / "world")
            results["tree"] = {"package": tree.package, "kver": tree.kver, "version": tree.version,
                               "world_build_s": world.timings}
        for name in chosen:
            t = time.perf_counter()
            if name == "lookups":
                import lookups

                res = lookups.run(world, n=9000, repeats=1 if args.quick else 5, profile=args.profile)
            elif name == "status":
                import status_cold

                res = status_cold.run(world, runs=5 if args.quick else 21)
            elif name == "index":
                import index_build

                res = index_build.run(world, runs=2 if args.quick else 5)
            elif name == "fix":
                import fix_time

                res = fix_time.run(runs=1 if args.quick else 3)
            elif name == "daemon":
                import daemon_bench

                res = daemon_bench.run(quick=args.quick)
            else:
                import plan_cost

                r = plan_cost.main()
                res = {"rows": [
                    _common.row("plan", "plan for 256 VFs (one PF) vs 1 device", r["plan_256_devices_ms"] / 1000, "s",
                                "ratio < 3", r["ratio_256_to_1"] < 3, r["plan_1_device_ms"] / 1000,
                                "plan for 1 device", r["ratio_256_to_1"])],
                    "details": r}
            res["details"]["elapsed_s"] = time.perf_counter() - t
            results["benchmarks"][name] = res
            rows.extend(res["rows"])
    results["elapsed_s"] = time.time() - started

    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp_out, args.out)
    print(f"\nwritten to {args.out} ({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
