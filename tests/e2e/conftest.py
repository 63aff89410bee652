"""Fixtures of the end-to-end tests: the scenarios of every e2e module (test_scenarios.py: the
script guest; test_systemd.py: the systemd guest) run two at a time on one session-wide pool (two
guests with -smp 1 on two cores), the selected ones only, longest first, and each test waits for
its own (several tests may read one scenario's run). A run's results directory is removed at the
end when every test that read it passed, and named in the failures otherwise."""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

WORKERS = 2
_TIMINGS: dict[str, float] = {}
_DOCS: dict[str, dict] = {}  # scenario -> its run's document (harness.Run.doc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.section("e2e scenario wall times (two guests side by side)")
        for name, seconds in _TIMINGS.items():
            terminalreporter.write_line(f"{name:14s} {seconds:7.1f} s")
    if _DOCS:
        terminalreporter.section("e2e timings the daemon showed (s from udev's event reaching it; device_add: host clock)")
        terminalreporter.write_line(f"{'scenario':12s} {'device':12s} {'verdict':9s} {'->verdict':>9s} {'->installed':>11s} "
                                    f"{'->bound':>8s} {'device_add->verdict':>20s}")

        def s(t, key):
            return f"{t[key]:.2f}" if t.get(key) is not None else "-"

        systemd_docs = {n: d for n, d in _DOCS.items() if d.get("init") == "systemd"}
        for name, doc in _DOCS.items():
            for d in doc["devices"] if name not in systemd_docs else ():
                t = d["timings"]
                terminalreporter.write_line(
                    f"{name:12s} {d['device']:12s} {d['verdict'] or '-':9s} {s(t, 'event_to_verdict_s'):>9s} "
                    f"{s(t, 'event_to_installed_s'):>11s} {s(t, 'event_to_bound_s'):>8s} "
                    f"{s(t, 'device_add_to_verdict_s'):>20s}")
        if systemd_docs:
            terminalreporter.section("e2e systemd guest timings (s, host clock: QEMU start to the agent, to READY; "
                                     "device_add to bound; the upgrade's dnf transaction; boot into B to bound)")
            for name, doc in systemd_docs.items():
                terminalreporter.write_line(f"{name:16s} {json.dumps(doc['timings'])}")


class Scenarios:
    """Starts every selected scenario at once on a small pool (longest first); get() waits."""

    def __init__(self, selected: list[str], table: dict):
        self.table = table
        self.started = time.monotonic()
        harness.preflight()
        self.build = harness.ensure_build()  # once, before the guests (a cold cache builds here)
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="e2e")
        self.futures: dict[str, Future] = {}
        self.failed: set[str] = set()  # scenarios a test failed on: their results are kept
        # another scenario's base first (its dependents wait for it), the dependents last, the rest
        # longest first
        bases = {getattr(table[n].scenario, "base", None) for n in selected} - {None}
        selected = list(dict.fromkeys([*sorted(bases), *selected]))

        def order(n):
            depends = getattr(table[n].scenario, "base", None) is not None
            return (0 if n in bases else 2 if depends else 1, -table[n].timeout_hint)

        for name in sorted(selected, key=order):
            self.futures[name] = self.pool.submit(self._run, name)

    def _run(self, name: str) -> harness.Run:
        t = time.monotonic()
        try:
            scn = self.table[name].scenario
            if isinstance(scn, harness.Scenario):
                run = harness.run_scenario(scn, keep=True)
            else:
                import systemd_guest
                base = self.get(scn.base) if scn.base else None  # it was submitted first
                run = systemd_guest.run_systemd(scn, keep=True, base=base)
            _DOCS[name] = run.doc
            return run
        finally:
            _TIMINGS[name] = time.monotonic() - t

    def get(self, name: str) -> harness.Run:
        if name not in self.futures:  # not selected up front (e.g. called from another test)
            self.futures[name] = self.pool.submit(self._run, name)
        return self.futures[name].result()

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)
        _TIMINGS["(module)"] = time.monotonic() - self.started
        for name, f in self.futures.items():
            if name in self.failed or f.cancelled() or f.exception() is not None:
                continue  # a failed run's HarnessError named its directory
            run = f.result()
            if run.results_dir:
                shutil.rmtree(run.results_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def scenarios(request):
    """Every selected scenario of every e2e module, started at once (scenario names are unique
    across the modules)."""
    table, names = {}, []
    for item in request.session.items:
        module = item.module
        if hasattr(module, "SCENARIOS") and hasattr(module, "TESTS"):
            table.update(module.SCENARIOS)
            name = module.TESTS.get(item.originalname)
            if name:
                names.append(name)
    s = Scenarios(list(dict.fromkeys(names)), table)
    yield s
    s.close()


@pytest.fixture
def scenario(request, scenarios):
    """scenario(name) -> harness.Run; its results directory stays if this test does not pass."""
    used: list[str] = []

    def get(name: str) -> harness.Run:
        used.append(name)
        return scenarios.get(name)

    yield get
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.passed:
        scenarios.failed.update(used)
