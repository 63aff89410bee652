"""Carry out a plan: install, depmod, load, re-probe, verify, initramfs. Converges from the system.

Every step first asks the system whether it is still needed (rpm database, libkmod's view of the
module tree, sysfs, the initramfs contents), so a run killed at any point followed by a new run
does only what is still missing: no second transaction, no half-built initramfs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple

from .. import process
from ..backends import Backend, Progress, query_fresh
from ..config import Config
from ..errors import ExitCode, KmodError, KmodguardError, PackageUnavailable
from ..kmod import Context
from ..paths import Paths
from .plan import Plan
from .state import Backoff, RemediationLock

log = logging.getLogger(__name__)

KMSG_PATTERNS = ("firmware", "Unknown symbol", "disagrees about version", "probe", "failed", "error", "-ENODEV")


class Step(NamedTuple):
    step: str
    result: str  # done | skipped | failed
    detail: str
    seconds: float

    def as_json(self) -> dict:
        return {"step": self.step, "result": self.result, "detail": self.detail, "seconds": round(self.seconds, 3)}


class Outcome(NamedTuple):
    id: str
    syspath: str
    outcome: str  # now-bound | still-unbound | failed | skipped
    driver: str | None
    reason: str
    firmware_failed: tuple[str, ...] = ()  # firmware files the kernel log says could not be loaded

    def as_json(self) -> dict:
        return dict(self._asdict())


class FixReport(NamedTuple):
    plan: Plan
    steps: tuple[Step, ...]
    devices: tuple[Outcome, ...]

    @property
    def exit_code(self) -> int:
        if any(o.outcome in ("still-unbound", "failed") for o in self.devices):
            return ExitCode.STILL_UNBOUND
        if any(s.result == "failed" for s in self.steps):
            return ExitCode.ERROR  # e.g. the initramfs could not be rebuilt (the old one is kept)
        return ExitCode.OK

    def as_json(self) -> dict:
        return {**self.plan.as_json(), "steps": [s.as_json() for s in self.steps],
                "outcomes": [o.as_json() for o in self.devices]}


def unavailable_hint(backend: Backend) -> str:
    """What to do when the exact version left the repositories, in the backend's own commands."""
    from ..backends import dnf

    return getattr(backend, "unavailable_hint", dnf.UNAVAILABLE_HINT)


def _driver(syspath: str) -> str | None:
    link = os.path.join(syspath, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


class Remediation:
    def __init__(self, paths: Paths, config: Config, backend: Backend, progress: Progress):
        self.paths, self.config, self.backend, self.progress = paths, config, backend, progress
        self.steps: list[Step] = []
        self.sizes: dict = {}  # request -> Offer, from the repositories, when asked

    def _step(self, name: str, result: str, detail: str, started: float) -> None:
        step = Step(name, result, detail, time.monotonic() - started)
        self.steps.append(step)
        log.info("step %s: %s: %s", name, result, detail, extra={"KMODGUARD_STEP": name})

    def run(self, plan: Plan) -> FixReport:
        with RemediationLock(self.paths.state_dir):
            outcomes = self._run_locked(plan)
        plan = plan._replace(install=tuple(
            p._replace(download_size=self.sizes[p.request].download_size,
                       installed_size=self.sizes[p.request].installed_size) if p.request in self.sizes else p
            for p in plan.install))
        return FixReport(plan, tuple(self.steps), tuple(outcomes))

    def _run_locked(self, plan: Plan) -> list[Outcome]:
        acting = [d for d in plan.devices if d.action in ("install", "load")]
        # 1. install, in one transaction, only what the rpm database does not have yet
        t = time.monotonic()
        self.progress("step install: checking the package database")
        pending = [p.request for p in plan.install if not self.backend.is_installed(p.request)]
        if not plan.install:
            self._step("install", "skipped", "nothing to install", t)
        elif not pending:
            self._step("install", "skipped", "already installed: " + ", ".join(p.request for p in plan.install), t)
        else:
            offers = query_fresh(self.backend, pending, self.progress)
            self.sizes = {o.request: o for o in offers}
            gone = [o.request for o in offers if not o.available]
            if gone:
                self._step("install", "failed", f"in no repository: {', '.join(gone)}", t)
                raise PackageUnavailable(f"no repository has {', '.join(gone)}", hint=unavailable_hint(self.backend))
            self._before_transaction(plan)
            comment = f"kmodguard: driver packages for {', '.join(d.id for d in acting)}"
            result = self.backend.install(pending, comment=comment, timeout=self.config.timeouts.package_manager,
                                          lock_wait=self.config.timeouts.lock_wait, progress=self.progress)
            self._step("install", "done", "installed " + ", ".join(result.installed), t)

        # 2. depmod, unless the package's scriptlet already did
        t = time.monotonic()
        self.progress("step depmod: checking the module index")
        unresolved = self._unresolved(plan.load)
        if unresolved:
            self._depmod()
            still = self._unresolved(plan.load)
            if still:
                self._step("depmod", "failed", f"not in {self.paths.installed_modules}: {', '.join(still)}", t)
            else:
                self._step("depmod", "done", f"indexed {', '.join(unresolved)}", t)
        else:
            self._step("depmod", "skipped", "the module index already has every module", t)

        # a repository's driver package names no module: the installed tree now says which one
        announced = {a.id for a in acting if a.module is None}
        acting = self._announced_modules(acting)
        # plan.load has every module to load (a built-in driver is not one: its device is only re-probed)
        to_load = list(dict.fromkeys([*plan.load, *(a.module for a in acting if a.id in announced and a.module)]))

        # 3. load
        t = time.monotonic()
        self.progress(f"step load: {', '.join(to_load) or 'nothing'}")
        load_errors: dict[str, str] = {}
        if to_load and self.paths.installed_modules.is_dir():
            ctx = Context(self.paths.installed_modules, self.paths.modprobe_dirs)
            for module in to_load:
                try:
                    ctx.load(module)
                except KmodError as exc:
                    load_errors[module] = _load_error(exc)
        self._step("load", "failed" if load_errors else ("done" if to_load else "skipped"),
                   "; ".join(f"{m}: {e}" for m, e in load_errors.items()) or ", ".join(to_load), t)

        # 4. re-probe each device and check that it is bound
        t = time.monotonic()
        self.progress("step probe: re-probing the devices")
        built_in = {a.module for a in acting if a.module and a.module not in to_load}
        outcomes = [self._probe(d, load_errors, d.module in built_in) for d in acting]
        bound = sum(o.outcome == "now-bound" for o in outcomes)
        self._step("probe", "done" if bound == len(outcomes) else "failed", f"{bound}/{len(outcomes)} bound", t)

        # 5. initramfs
        self._initramfs(plan)

        backoff = Backoff(self.paths.state_dir)
        for o in outcomes:
            log.log(logging.INFO if o.outcome == "now-bound" else logging.WARNING, "%s: %s: %s", o.id, o.outcome,
                    o.reason, extra={"DEVICE": o.syspath, "KMODGUARD_OUTCOME": o.outcome})
            backoff.succeeded(o.id) if o.outcome == "now-bound" else backoff.failed(o.id, o.reason)
        backoff.save()
        return outcomes

    # --- helpers ---------------------------------------------------------------------------

    def _announced_modules(self, acting: list) -> list:
        """Each device whose package a repository announced: the module that matches it in the
        installed tree now (depmod first when nothing does yet), blacklists honoured."""
        if not any(a.module is None and a.action == "install" for a in acting):
            return acting
        mdir = self.paths.installed_modules

        def match() -> dict[str, str | None]:
            if not (mdir / "modules.dep.bin").exists():
                return {}
            ctx = Context(mdir, self.paths.modprobe_dirs)
            black = ctx.blacklist()
            return {a.id: next((n for n in ctx.lookup(a.modalias) if n not in black), None)
                    for a in acting if a.module is None}

        found = match()
        if not all(found.get(a.id) for a in acting if a.module is None):
            self._depmod()
            found = match()
        return [a._replace(module=found.get(a.id)) if a.module is None else a for a in acting]

    def _unresolved(self, modules) -> list[str]:
        mdir = self.paths.installed_modules
        if not (mdir / "modules.dep.bin").exists():
            return list(modules)
        ctx = Context(mdir, [])
        return [m for m in modules if not any(path for _, path in ctx.lookup_paths(m))]

    def _depmod(self) -> None:
        mdir = self.paths.installed_modules
        args = [shutil.which("depmod") or "/sbin/depmod", "-a"]
        if mdir.parent.name == "modules" and mdir.parent.parent.name == "lib":
            base = mdir.parent.parent.parent
            if base != Path("/"):
                args += ["-b", str(base)]
        args.append(mdir.name)
        res = process.run(args, 300, "depmod")
        if res.returncode != 0:
            raise KmodguardError(f"depmod failed: {res.stderr.strip()}")

    def _probe(self, action, load_errors: dict[str, str], built_in: bool = False) -> Outcome:
        driver = _driver(action.syspath)
        if driver:
            return Outcome(action.id, action.syspath, "now-bound", driver, f"bound to {driver}")
        if action.module is None:
            return Outcome(action.id, action.syspath, "failed", None,
                           f"{action.package} is installed, but no module in the module tree matches the device "
                           "(its repository metadata announced it for it)")
        if action.module in load_errors:
            return Outcome(action.id, action.syspath, "failed", None,
                           f"{action.module} could not be loaded: {load_errors[action.module]}")
        probe = self.paths.sysfs / "bus" / action.subsystem / "drivers_probe"
        try:
            probe.write_text(os.path.basename(action.syspath))
        except OSError as exc:
            log.debug("drivers_probe for %s: %s", action.syspath, exc)
        deadline = time.monotonic() + self.config.timeouts.settle
        while time.monotonic() < deadline:
            driver = _driver(action.syspath)
            if driver:
                return Outcome(action.id, action.syspath, "now-bound", driver, f"bound to {driver}")
            time.sleep(0.05)
        needles = [action.module, os.path.basename(action.syspath)]
        firmware = firmware_failures(self.paths.kmsg, needles)
        state = "is built in" if built_in else "is loaded"
        if firmware:
            return Outcome(action.id, action.syspath, "still-unbound", None,
                           f"{action.module} {state} but did not bind: the kernel could not load its firmware "
                           f"{', '.join(firmware)}; install the package that has it ('kmodguard explain' names "
                           "it when the repositories do), then run 'kmodguard fix' again", firmware)
        why = kernel_reason(self.paths.kmsg, needles)
        return Outcome(action.id, action.syspath, "still-unbound", None,
                       f"{action.module} {state} but did not bind" + (f": the kernel says {why!r}" if why else
                                                                       "; see 'dmesg'"))

    def _before_transaction(self, plan: Plan) -> None:
        """When the drivers belong in the initramfs: write the dracut drop-in first, so that a
        package's own dracut run (Fedora's kernel-modules %posttrans) already includes them, and
        keep a snapshot of the image, which that scriptlet rewrites in place."""
        if not plan.initramfs.rebuild:
            return
        from .. import initramfs

        initramfs.persist_drivers(plan.initramfs.drivers, self.paths)
        initramfs.snapshot(self.paths.kver, self.paths)

    def _initramfs(self, plan: Plan) -> None:
        t = time.monotonic()
        decision = plan.initramfs
        if not decision.rebuild:
            self._step("initramfs", "skipped", decision.reason, t)
            return
        from .. import initramfs

        kver, drivers = self.paths.kver, list(decision.drivers)
        self.progress("step initramfs: " + decision.reason)
        initramfs.persist_drivers(drivers, self.paths)  # idempotent; so that later kernels keep them
        try:
            missing = initramfs.missing_from_image(kver, drivers, self.paths)
        except KmodguardError as exc:  # the package's dracut run left an unreadable image
            log.warning("the initramfs of %s is unreadable (%s): restoring the snapshot", kver, exc.message)
            initramfs.restore(kver, self.paths)
            missing = drivers
        if not missing:
            by = "the package's own scriptlet" if decision.by == "package" else "an earlier run"
            self._step("initramfs", "done", f"already inside (put there by {by}): {', '.join(drivers)}", t)
            return
        try:
            initramfs.rebuild(kver, drivers, self.paths, self.config.timeouts.dracut)
        except KmodguardError as exc:
            self._step("initramfs", "failed", f"{exc.message}; the previous image is unchanged", t)
            return
        self._step("initramfs", "done", "rebuilt with " + ", ".join(drivers), t)


def _load_error(exc: KmodError) -> str:
    if exc.errno == errno.ENOSYS:
        return "this kernel cannot load modules (built without module support)"
    if exc.errno == errno.EPERM:
        return "not permitted (root is needed; or module loading is locked down / Secure Boot refused it)"
    if exc.errno == errno.EKEYREJECTED:  # "Key was rejected by service": Secure Boot / module.sig_enforce
        return ("the kernel rejected the module's signature (Key was rejected by service): Secure Boot or "
                "module.sig_enforce allows only modules signed by a trusted key; install the distribution's signed "
                "module package, or enroll the signing key ('mokutil --import KEY.der', then reboot)")
    if exc.errno == errno.ENOEXEC:
        return "the module does not fit this kernel (wrong version or a bad file)"
    return os.strerror(exc.errno)


# The firmware loader's own words (drivers/base/firmware_loader/main.c): a file it did not find.
FIRMWARE_FAILED = re.compile(r"Direct firmware load for (\S+) failed|firmware: failed to load (\S+)")


def firmware_failures(kmsg: Path, needles: list[str], tail: int = 400) -> tuple[str, ...]:
    """The firmware files the kernel log says this module or device could not load, oldest first."""
    needles = [n for n in needles if n]
    found = []
    for line in _kmsg_lines(kmsg, tail):
        m = FIRMWARE_FAILED.search(line)
        if m and any(n in line for n in needles):
            found.append(m[1] or m[2])
    return tuple(dict.fromkeys(found))


def kernel_reason(kmsg: Path, needles: list[str], tail: int = 400) -> str | None:
    """The last kernel log line about this module or device that says why it failed, if any."""
    needles = [n for n in needles if n]
    for line in reversed(_kmsg_lines(kmsg, tail)):
        if any(n in line for n in needles) and any(p in line for p in KMSG_PATTERNS):
            return line.strip()
    return None


def _kmsg_lines(kmsg: Path, tail: int) -> list[str]:
    """The last `tail` messages of the kernel log (empty when it cannot be read)."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    lines: list[str] = []
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:  # EPIPE: records overwritten while reading
                if exc.errno == errno.EPIPE:
                    continue
                break
            if not record:
                break
            # /dev/kmsg gives one record a read ("PRIO,SEQ,USEC,FLAGS;message", then " KEY=value"
            # lines); a saved log read as a file gives many at once.
            for line in record.decode(errors="replace").splitlines():
                if line and not line.startswith(" "):
                    lines.append(line.split(";", 1)[1] if ";" in line.split(" ", 1)[0] else line)
            lines = lines[-tail:]
    finally:
        os.close(fd)
    return lines
