"""Prometheus metrics (text exposition format 0.0.4) of one machine: what fleets already collect.
`kmodguard status --prometheus --output /var/lib/node_exporter/textfile_collector/kmodguard.prom`
from a timer keeps node_exporter's textfile collector fed."""

from __future__ import annotations

import collections
import datetime

from ..engine.diagnosis import VERDICTS


def _escape(value: str) -> str:
    """Label values: backslash, double quote and newline escaped, as the format says."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}" if labels else ""


def _timestamp(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def exposition(engine, judged, daemon: dict | None) -> str:
    lines: list[str] = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{_labels(**labels)} {value}")

    counts = collections.Counter(v.verdict for _, v in judged)
    metric("kmodguard_devices", "gauge", "Devices with a modalias, by kmodguard's verdict.",
           [({"verdict": v}, counts.get(v, 0)) for v in VERDICTS])
    metric("kmodguard_info", "gauge", "The kernel judged, kmodguard's mode and whether this system may install.",
           [({"kernel": engine.paths.kver, "mode": engine.policy.mode,
              "can_install": str(engine.env.can_install).lower()}, 1)])
    packages = engine.diagnoser.index.packages
    metric("kmodguard_index_packages", "gauge", "Package indexes usable for the kernel.", [({}, len(packages))])
    metric("kmodguard_index_errors", "gauge", "Package indexes that are corrupt or foreign.",
           [({}, len(engine.diagnoser.index.errors))])
    import time

    metric("kmodguard_index_age_seconds", "gauge", "Age of each package index of the kernel.",
           [({"package": p.name, "derived": str(p.derived_from is not None).lower()},
             round(max(0.0, time.time() - p.built), 3)) for p in packages])
    metric("kmodguard_daemon_up", "gauge", "1 when kmodguard's daemon runs.", [({}, 1 if daemon else 0)])
    last = (daemon or {}).get("last_fix")
    if last is None:
        from ..engine.state import last_fix

        last = last_fix(engine.paths.state_dir)
    if last:
        finished = _timestamp(last.get("finished"))
        if finished is not None:
            metric("kmodguard_last_fix_timestamp_seconds", "gauge", "When the last fix ended (Unix time).",
                   [({}, finished)])
        metric("kmodguard_last_fix_exit_code", "gauge", "Exit code of the last fix (0: every device bound).",
               [({}, int(last.get("exit_code") or 0))])
        outcomes = collections.Counter(o.get("outcome") for o in (last.get("report") or {}).get("outcomes", []))
        metric("kmodguard_last_fix_devices", "gauge", "Devices of the last fix, by outcome.",
               [({"outcome": k}, n) for k, n in sorted(outcomes.items()) if k])
    return "\n".join(lines) + "\n"
