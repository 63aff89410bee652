"""The engine as its fronts use it: the CLI and the daemon (and through it D-Bus) ask the same
questions here and get the same documents back (the Contract's JSON shapes, docs/contract.md).

No transport code: nothing here prints, parses options or touches a bus.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable

from .. import config as config_mod
from ..devices import Device
from ..errors import InvalidInput, KmodguardError
from ..paths import Paths
from . import environment
from .diagnosis import NEEDS_ACTION, Diagnoser, Verdict

if TYPE_CHECKING:  # annotations only: status and explain never plan (the module is 1 ms of their start)
    from .plan import Plan

Judged = list[tuple[Device, Verdict]]


class Engine:
    """Paths, policy, environment and a Diagnoser for one kernel, made once per question."""

    def __init__(self, paths: Paths, policy: config_mod.Config | None = None,
                 env: environment.Environment | None = None, meanwhile: Callable[[], object] = lambda: None,
                 online: bool = False):
        """`meanwhile` runs while the environment is probed (status enumerates devices there).
        online: the package manager may reach the repositories to tell which package holds a
        module's firmware (fix); otherwise it answers from its cache only (status, explain)."""
        self.paths = paths
        self.policy = policy if policy is not None else config_mod.load(paths.config_dir)
        pending = environment.start_detect(paths) if env is None else (lambda: env)
        self.meanwhile_result = meanwhile()
        self.env = pending()
        self.online = online
        self._firmware_backend = None
        self._firmware_failed: KmodguardError | None = None
        self.diagnoser = Diagnoser(paths, self.policy, self.env)
        self.diagnoser.firmware_lookup = self._firmware_lookup
        self.diagnoser.repository_lookup = self._repository_lookup

    def _repository_lookup(self):
        """The repositories' driver announcements (modalias() provides and supplements), matched
        by libkmod; cached in STATE_DIR per repository metadata revision, so that a status with
        an unknown device (every host bridge) does not ask the package manager each time."""
        from ..backends import driver_announcements
        from .repository import RepositoryDrivers, load_cached, save_cached

        if self._firmware_backend is None:
            self._firmware_backend = self.backend()
        backend = self._firmware_backend
        revision = getattr(backend, "metadata_revision", lambda: None)()
        items = load_cached(self.paths.state_dir, revision) if revision else None
        if items is None:
            found = driver_announcements(backend, cache_only=not self.online)
            items = found.items
            if revision and not found.note:
                save_cached(self.paths.state_dir, revision, items)
        drivers = RepositoryDrivers(items, kver=self.paths.kver) if items else None
        return drivers if drivers and drivers.announcements else None

    def _firmware_lookup(self, names: list[str]):
        """Which packages hold these firmware files: the policy's package manager, asked lazily
        (only a module whose firmware is all absent costs a query)."""
        from ..backends import firmware_lookup

        if self._firmware_failed is not None:  # asked once: `explain -` may need hundreds of modules' firmware
            raise self._firmware_failed
        try:
            if self._firmware_backend is None:
                self._firmware_backend = self.backend()
            return firmware_lookup(self._firmware_backend, names, cache_only=not self.online)
        except KmodguardError as exc:  # becomes the need's note
            self._firmware_failed = exc
            raise

    # --- judging ---------------------------------------------------------------------------

    def judge(self, devices: Iterable[Device]) -> Judged:
        judged = [(d, self.diagnoser.diagnose(d)) for d in devices]
        self.diagnoser.remember()
        return judged

    def index_json(self) -> dict:
        idx = self.diagnoser.index
        return {
            "dir": str(idx.dir),
            "packages": [{"package": p.name, "version": p.version, "modules": p.module_count} for p in idx.packages],
            "errors": [{"package": name, "message": e.message} for name, e in idx.errors.items()],
        }

    def status_document(self, judged: Judged, daemon: dict | None) -> dict:
        return {
            "kernel": self.paths.kver,
            "environment": {**self.env.as_json(), "index": self.index_json()},
            "daemon": daemon,
            "devices": [device_json(d, v) for d, v in judged],
            "backing_off": self.backing_off(judged),
        }

    def backing_off(self, judged: Judged) -> list[dict]:
        """Devices that still need a driver and wait out a back-off after a failed fix: `fix`
        without device names leaves them out until then ([{"id", "until", ...}])."""
        from .state import Backoff

        return Backoff(self.paths.state_dir).backing_off([d.id for d, v in judged if v.verdict in NEEDS_ACTION])

    def explain_document(self, modaliases: list[str]) -> tuple[dict, list[Verdict]]:
        results, verdicts = self.explain_results(modaliases)
        return ({"kernel": self.paths.kver, "results": [{"modalias": m, **body} for m, body in results]}, verdicts)

    def explain_results(self, modaliases: list[str]) -> tuple[list[tuple[str, dict]], list[Verdict]]:
        """(modalias, its verdict's as_json) for each, and the verdicts. Modaliases with the same
        matches share one Verdict (Diagnoser._same_matches), and then one as_json dict, made once."""
        verdicts = self.diagnoser.explain_all(modaliases)  # the Diagnoser checks each (InvalidInput)
        self.diagnoser.remember()
        bodies: dict[int, dict] = {}  # id(verdict): every verdict stays alive in `verdicts`
        for v in verdicts:
            if id(v) not in bodies:
                bodies[id(v)] = v.as_json()
        return [(m, bodies[id(v)]) for m, v in zip(modaliases, verdicts)], verdicts

    # --- planning ----------------------------------------------------------------------------

    def select(self, refs: list[str], *, honour_backoff: bool = True, missing_ok: bool = False) -> list[Device]:
        """The devices named (ids or syspaths), or every device with a modalias; named devices
        are taken even while they back off after failures, the others are not. missing_ok: a
        named device that is gone (unplugged since) is left out instead of refused."""
        from ..devices import enumerate_devices, find_device

        if refs:
            devices = []
            for ref in refs:
                device = find_device(ref)
                if device is None and not missing_ok:
                    raise InvalidInput(f"no device {ref!r}", hint="'kmodguard status' lists device ids")
                if device is not None:
                    devices.append(device)
            return devices
        devices = enumerate_devices()
        if not honour_backoff:
            return devices
        from .state import Backoff

        backoff = Backoff(self.paths.state_dir)
        return [d for d in devices if not backoff.waiting(d.id)]

    def without_backing_off(self, judged: Judged) -> Judged:
        """judged without the devices that wait out a back-off: what select leaves out unless told
        otherwise, for a caller that judged every device once (the plan and the back-off lines)."""
        from .state import Backoff

        backoff = Backoff(self.paths.state_dir)
        return [(d, v) for d, v in judged if not backoff.waiting(d.id)]

    def plan(self, judged: Judged, *, boot_critical: bool = True) -> Plan:
        """One plan for these devices. boot_critical=False skips the (sysfs-walking) question of
        which devices are needed before the real root is mounted: the daemon's triage uses it."""
        from .. import initramfs
        from .plan import make_plan

        packages = {p.name: p for p in self.diagnoser.index.packages}
        unsupported = initramfs.unsupported(self.paths) if boot_critical else None

        def decide(modules, critical, install):
            by_package = any(packages[p].rebuilds_initramfs for p in install if p in packages)
            return initramfs.decide(modules, critical, self.policy.initramfs, by_package, unsupported)

        if not boot_critical:
            return make_plan(self.paths.kver, judged, self.policy, blocked=self.env.why_not)
        return make_plan(self.paths.kver, judged, self.policy, blocked=self.env.why_not,
                         boot_critical=lambda d: initramfs.boot_critical(d.syspath, self.paths),
                         decide_initramfs=decide)

    def backend(self, name: str | None = None):
        from ..backends import choose

        return choose(name or self.policy.backend, self.env.package_manager, self.paths.root,
                      self.policy.timeouts.package_manager, lock_wait=self.policy.timeouts.lock_wait,
                      firmware_packages=self.policy.firmware_packages, cache_dir=self.paths.state_dir)

    def with_sizes(self, plan: Plan, backend, progress: Callable[[str], None]) -> Plan:
        """The plan with download and installed sizes, when the repository metadata tells them."""
        if not plan.install:
            return plan
        try:
            offers = {o.request: o for o in backend.query([p.request for p in plan.install])}
        except KmodguardError as exc:
            progress(f"could not ask the repositories for sizes: {exc.message}")
            return plan
        return plan._replace(install=tuple(
            p._replace(download_size=offers[p.request].download_size,
                       installed_size=offers[p.request].installed_size) if p.request in offers else p
            for p in plan.install))

    def auto_eligible(self, actions) -> list[str]:
        """Ids of the devices mode `auto` acts on: the plan can act on them (install or load), their
        bus is in auto_buses, they are not backing off after a failure, and this system may install.
        `actions`: DeviceAction-like objects (id, subsystem, action)."""
        if self.env.why_not:
            return []
        from .state import Backoff

        backoff = Backoff(self.paths.state_dir)
        return [a.id for a in actions if a.action in ("install", "load")
                and a.subsystem in self.policy.auto_buses and not backoff.waiting(a.id)]

    # --- fixing ------------------------------------------------------------------------------

    def run_fix(self, plan: Plan, backend, progress: Callable[[str], None], *, request: dict | None = None):
        """Carry out the plan (engine.remediate), then record how it ended in STATE_DIR/last-fix.json
        whatever happened, and put the devices of a fix that failed before probing on back-off.
        Returns (exit code, document); a KmodguardError is re-raised after it is recorded."""
        from . import fixing, state
        from .remediate import Remediation

        started = time.time()
        acting = [d.id for d in plan.devices if d.action in ("install", "load")]
        # the record is written before the lock is let go (the lock nests when the caller, a fix
        # for a daemon's request, holds it already): whoever takes the lock next sees the record
        try:
            lock = state.RemediationLock(self.paths.state_dir).__enter__()
        except KmodguardError as exc:  # Busy: another fix runs; this one never started
            fixing.failed(self.paths.state_dir, request, acting, exc, started)
            raise
        try:
            report = Remediation(self.paths, self.policy, backend, progress).run(plan)
            doc = report.as_json()
            state.record_fix(self.paths.state_dir, fixing.fix_record(request, acting, exit_code=report.exit_code,
                                                                     started=started, report=doc))
        except KmodguardError as exc:
            fixing.failed(self.paths.state_dir, request, acting, exc, started)
            raise
        finally:
            lock.__exit__(None, None, None)
        return report.exit_code, doc


def device_json(d: Device, v: Verdict) -> dict:
    return {"id": d.id, "syspath": d.syspath, "subsystem": d.subsystem, "modalias": d.modalias,
            "driver": d.driver, **v.as_json(), **({"pci": d.pci.as_json()} if d.pci else {})}


def needs_action(verdicts: Iterable[Verdict]) -> bool:
    return any(v.verdict in NEEDS_ACTION for v in verdicts)
