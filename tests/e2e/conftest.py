"""Fixtures of the end-to-end tests: the scenarios run two at a time (two guests with -smp 1 on two
cores), the selected ones only, and each test waits for its own; results directories are removed
when the test passed and named in the failure otherwise."""

from __future__ import annotations

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


class Scenarios:
    """Starts every selected scenario at once on a small pool (longest first); get() waits."""

    def __init__(self, selected: list[str], table: dict[str, harness.Scenario]):
        self.table = table
        self.started = time.monotonic()
        harness.preflight()
        self.build = harness.ensure_build()  # once, before the guests (a cold cache builds here)
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="e2e")
        self.futures: dict[str, Future] = {}
        for name in sorted(selected, key=lambda n: -table[n].timeout_hint):
            self.futures[name] = self.pool.submit(self._run, name)

    def _run(self, name: str) -> harness.Run:
        t = time.monotonic()
        try:
            return harness.run_scenario(self.table[name].scenario, keep=True)
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


@pytest.fixture(scope="module")
def scenarios(request):
    table = request.module.SCENARIOS
    names = [table_name for item in request.session.items if item.module is request.module
             for table_name in [request.module.TESTS.get(item.originalname)] if table_name]
    s = Scenarios(list(dict.fromkeys(names)), table)
    yield s
    s.close()


@pytest.fixture
def scenario(request, scenarios):
    """scenario(name) -> harness.Run; its results directory is removed if the test passes."""
    runs: list[harness.Run] = []

    def get(name: str) -> harness.Run:
        run = scenarios.get(name)
        runs.append(run)
        return run

    yield get
    rep = getattr(request.node, "rep_call", None)
    for run in runs:
        if run.results_dir and rep is not None and rep.passed:
            shutil.rmtree(run.results_dir, ignore_errors=True)
