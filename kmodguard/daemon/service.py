"""The daemon: coldplug at start, udev events afterwards, verdicts at once, one fix per burst.

Everything runs on one asyncio loop in one thread (libkmod contexts are not thread-safe). The
devices of the events read in one go are judged as soon as the monitor is drained. A device no
installed module matches (missing, unknown, ...) is announced at once: nothing udev does can
change that verdict. A device an installed module matches (loadable) waits up to
`timeouts.settle` seconds for udev to load that module, a wait its `bind` event ends early. In
auto mode the fix waits until udev has been quiet for `timeouts.settle`, so an SR-IOV
`sriov_numvfs` write of 64 VFs is still ONE plan and ONE package transaction. The fix itself runs
out of process (runner.py); the daemon converges from the system after it.

Fronts subscribe through `Publisher` (the D-Bus interface is one); the daemon imports no bus code.
What a fix is, its record, back-off and a previous daemon's leftovers are engine/fixing.py's.

Over 400 lines on purpose: the daemon is one state machine (the devices held, the settle and fix
windows, the fix queue, the take-over, the snapshot it publishes), whose invariants are read
together.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import os
import signal
import time
from typing import NamedTuple

import pyudev

from .. import config as config_mod
from ..devices import Device, from_udev, udev_context
from ..engine import fixing, state
from ..engine.api import Engine, Judged, device_json
from ..engine.diagnosis import NEEDS_ACTION, Verdict
from ..engine.offer import Offer, motd_text, write_motd
from ..errors import Busy, InvalidInput, KmodguardError
from ..paths import Paths
from . import runner as runners
from . import systemd
from .. import journal
from .monitor import UdevWatch

log = logging.getLogger("kmodguard.daemon")

MAX_BATCH_EXTRA = 5.0  # a burst that never goes quiet is still fixed this long after its window
EVENT_LOG = 64  # recent events kept in the snapshot


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


class Held(NamedTuple):
    """A device the daemon holds as needing a package or a module."""

    device: Device
    verdict: Verdict
    action: str  # the plan's: install | load | refused | none
    since: float

    @property
    def id(self) -> str:
        return self.device.id

    @property
    def subsystem(self) -> str:
        return self.device.subsystem

    @property
    def candidate(self):
        return self.verdict.candidates[0] if self.verdict.candidates else None

    @property
    def module(self) -> str | None:
        if self.candidate:
            return self.candidate.module
        usable = [m for m in self.verdict.installed_modules if m not in self.verdict.blacklisted]
        return usable[0] if usable else None

    def as_json(self) -> dict:
        return {**device_json(self.device, self.verdict), "action": self.action, "since": _iso(self.since),
                "package": self.candidate.package if self.candidate else None, "module": self.module}


class Publisher:
    """What a front (D-Bus) hears about. Every method is a no-op here."""

    def needs_driver(self, held: Held) -> None: ...
    def resolved(self, device_id: str, verdict: str) -> None: ...
    def fix_progress(self, request_id: str, message: str) -> None: ...
    def fix_finished(self, request_id: str, exit_code: int, record: dict) -> None: ...
    def changed(self) -> None: ...


class Daemon:
    def __init__(self, paths: Paths, policy: config_mod.Config):
        self.paths = paths
        self.policy = policy
        self.publisher: Publisher = Publisher()
        self.bus_name: str | None = None
        self.since = time.time()
        self.engine: Engine | None = None
        self._fingerprint = None
        self.held: dict[str, Held] = {}
        self.pending: dict[str, float] = {}  # syspath -> time of its first event not judged yet
        self._binds: set[str] = set()  # syspaths of the pending bind events
        self._removed: set[str] = set()  # syspaths whose last pending event is a remove
        self._judge_soon: asyncio.Handle | None = None
        # loadable devices given time to bind: syspath -> (loop deadline, time of their first event)
        self.waiting: dict[str, tuple[float, float]] = {}
        self._wait_timer: asyncio.TimerHandle | None = None
        self._burst_started = 0.0  # loop time of the first event of the burst the next fix gathers
        self._fix_window: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self.decisions = 0
        self.fixes = 0
        self.events: collections.deque = collections.deque(maxlen=EVENT_LOG)
        self.last_fix: dict | None = state.last_fix(paths.state_dir)
        self.fix_running = False
        self._fix_lock = asyncio.Lock()
        self._fix_task: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._noted: set[str] = set()  # unindexed devices already told about
        self._seen: dict[str, str] = {}  # device id -> its last verdict
        self._status_sent: str | None = None
        self.runner = None
        self.watch: UdevWatch | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Watch, then scan (an event between the two is judged twice, never lost), then resume."""
        self.loop = asyncio.get_running_loop()
        self.runner = await runners.choose(self.paths.as_environment())
        self.watch = UdevWatch(self.loop, self.on_event, self.rescan)
        self._resume()  # before the first decision: an interrupted fix goes first
        self.decide(None)
        log.info("watching %s events; %d device(s) need a driver; mode %s; fixes run as %s",
                 self.watch.source, len(self.held), self.policy.mode, self.runner.name,
                 extra=journal.fields("started"))
        systemd.notify(READY=1, STATUS=self.status_line())

    async def run(self) -> None:
        """Until SIGTERM/SIGINT; SIGHUP reloads the configuration and the indexes."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await self.start()
        period = systemd.watchdog_period()
        if period:
            self._watchdog(period)
        await self._stop.wait()
        systemd.notify(STOPPING=1, STATUS="stopping")
        log.info("stopping")
        self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.watch:
            self.watch.close()
        for timer in (self._judge_soon, self._wait_timer, self._fix_window, self._retry_timer):
            if timer:
                timer.cancel()
        # The snapshot speaks for a running daemon only; the MOTD would go stale unattended.
        for path in (self.paths.snapshot, self.paths.motd):
            try:
                path.unlink()
            except OSError:
                pass

    def _on_sighup(self) -> None:
        try:
            self.reload()
        except KmodguardError:
            pass  # reload() said why; the previous configuration stays in force

    def reload(self) -> None:
        """SIGHUP / D-Bus Reload: re-read the policy and the indexes, judge everything again."""
        systemd.notify(RELOADING=1)
        try:
            self.policy = config_mod.load(self.paths.config_dir)
        except KmodguardError as exc:
            log.error("configuration not reloaded, keeping the previous one: %s", exc.message)
            systemd.notify(READY=1, STATUS=self.status_line())
            raise
        self.engine = None
        log.info("configuration and indexes reloaded (mode %s)", self.policy.mode)
        self.decide(None)
        systemd.notify(READY=1, STATUS=self.status_line())

    def _watchdog(self, period: float) -> None:
        systemd.notify(WATCHDOG=1)
        self.loop.call_later(period, self._watchdog, period)

    # --- events --------------------------------------------------------------------------------

    def on_event(self, action: str, syspath: str, properties: dict) -> None:
        """Gather the event; the devices of every event read in one go are judged right after."""
        device_id = os.path.basename(syspath) if properties.get("SUBSYSTEM") == "pci" else syspath
        if "MODALIAS" not in properties and device_id not in self.held and syspath not in self.waiting:
            return  # class devices (net, block, ...) and the like: they never bind a driver
        self.pending.setdefault(syspath, time.time())
        if action == "bind":
            self._binds.add(syspath)
        if action == "remove":
            self._removed.add(syspath)  # gone, even while its sysfs directory is being taken down
        else:
            self._removed.discard(syspath)
        if self._judge_soon is None:
            # after the monitor's drain: a burst read at once is judged at once
            self._judge_soon = self.loop.call_soon(self._judge_pending)
        if self.policy.mode == "auto":
            self._extend_fix_window()

    def _judge_pending(self) -> None:
        self._judge_soon = None
        burst, self.pending = self.pending, {}
        binds, self._binds = self._binds, set()
        removed, self._removed = self._removed, set()
        if burst:
            self.decide(burst, binds, removed)

    def _extend_fix_window(self) -> None:
        """The fix of a burst starts once udev has been quiet for the settle window (bounded)."""
        now = self.loop.time()
        if self._fix_window is None:
            self._burst_started = now
        else:
            self._fix_window.cancel()
        settle = self.policy.timeouts.settle
        self._fix_window = self.loop.call_at(min(now + settle, self._burst_started + settle + MAX_BATCH_EXTRA),
                                             self._close_fix_window)

    def _close_fix_window(self) -> None:
        self._fix_window = None
        if self.pending:  # events read but not judged yet: judge them first
            self._judge_pending()
        now = self.loop.time()
        if any(d <= now for d, _ in self.waiting.values()):
            self._wait_over()
        last = max((d for d, _ in self.waiting.values()), default=None)
        cap = self._burst_started + self.policy.timeouts.settle + MAX_BATCH_EXTRA
        if last is not None and last < cap:
            # loadable devices of the burst may still bind, or be announced: the fix waits for them
            self._fix_window = self.loop.call_at(last, self._close_fix_window)
            return
        if self.policy.mode == "auto":
            self._maybe_fix()

    def _arm_wait(self) -> None:
        """One timer, for the earliest end of a loadable device's wait."""
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        if self.waiting:
            self._wait_timer = self.loop.call_at(min(d for d, _ in self.waiting.values()), self._wait_over)

    def _wait_over(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        now = self.loop.time()
        due = {s: t for s, (d, t) in self.waiting.items() if d <= now}
        if due:
            self.decide(due)
        else:
            self._arm_wait()

    def rescan(self) -> None:
        """Events were lost: judge every device again (a coldplug)."""
        self.pending.clear()
        self._binds.clear()
        self._removed.clear()
        self.waiting.clear()
        self._arm_wait()
        self.decide(None)

    # --- deciding ------------------------------------------------------------------------------

    def current_engine(self) -> Engine:
        """An Engine that sees the system as it is now: made again when the installed module tree,
        its modprobe.d, or the indexes changed (a package was installed, depmod ran, an index was
        rebuilt); otherwise the same one with its verdict memo cleared."""
        fingerprint = self._fingerprint_now()
        engine = self.engine
        if (engine is None or fingerprint != self._fingerprint
                or (engine.diagnoser.installed is not None and engine.diagnoser.installed.resources_changed())):
            engine = self.engine = Engine(self.paths, self.policy)
            self._fingerprint = fingerprint
        else:
            engine.diagnoser.new_round()
        return engine

    def _fingerprint_now(self):
        def stat(path):
            try:
                st = os.stat(path)
                return st.st_ino, st.st_mtime_ns
            except OSError:
                return None

        kdir = self.paths.index_root / self.paths.kver
        try:
            index = tuple(sorted((e.name, os.readlink(e) if e.is_symlink() else stat(e.path)) for e in os.scandir(kdir)))
        except OSError:
            index = None
        return index, stat(self.paths.installed_modules / "modules.dep.bin")

    def decide(self, burst: dict[str, float] | None, binds: set[str] = frozenset(),
               removed: set[str] = frozenset()) -> None:
        """Judge the devices of a burst (None: every device), publish what changed, act on policy.

        A device of a burst that an installed module matches (loadable), and that was not
        loadable already, is held back until its settle window ends or a bind event (`binds`)
        arrives: udev may be loading that module. Every other verdict is published at once.
        A device whose last event is a remove (`removed`) is gone."""
        engine = self.current_engine()
        context = udev_context()
        if burst is None:
            from ..devices import enumerate_devices

            devices = enumerate_devices(context)
            present = {d.id for d in devices}
            gone = [i for i in self.held if i not in present]
            self._seen = {i: v for i, v in self._seen.items() if i in present}
        else:
            devices, gone = [], []
            for syspath in burst:
                device = None if syspath in removed else self._device_at(context, syspath)
                if device is not None:
                    devices.append(device)
                else:
                    gone.append(os.path.basename(syspath) if os.path.basename(syspath) in self.held else syspath)
        judged = engine.judge(devices)
        if self.waiting:
            present = {d.syspath for d in devices}
            for syspath in [s for s in self.waiting if s not in present and (burst is None or s in burst)]:
                del self.waiting[syspath]  # gone while it waited
        judged = self._hold_back_loadable(judged, burst, binds)
        actions = {a.id: a.action for a in engine.plan(judged, boot_critical=False).devices}
        self.decisions += 1
        now = time.time()
        for device_id in gone:
            self._seen.pop(device_id, None)
            if self.held.pop(device_id, None) is not None:
                self._resolved(device_id, "removed", now)
        for device, verdict in judged:
            before = self.held.get(device.id)
            if verdict.verdict in NEEDS_ACTION:
                held = Held(device, verdict, actions.get(device.id, "none"), before.since if before else now)
                self.held[device.id] = held
                if before is None or before.verdict.verdict != verdict.verdict or before.module != held.module:
                    self._needs_driver(held)
            else:
                if before is not None:
                    self.held.pop(device.id)
                    self._resolved(device.id, verdict.verdict, now)
                if verdict.verdict == "unindexed" and device.id not in self._noted and self.policy.mode != "off":
                    self._noted.add(device.id)
                    log.warning("%s: %s", device.id, verdict.reason, extra=journal.fields(
                        "unindexed", device=device.syspath, modalias=device.modalias))
            # the event log keeps what a reader wants: every device of a burst, and from a full
            # rescan only news (not the same dozens of bound or ignored CPUs after every fix)
            previous = self._seen.get(device.id)
            self._seen[device.id] = verdict.verdict
            if burst is not None or (previous != verdict.verdict
                                     and (previous is not None or verdict.verdict in NEEDS_ACTION)):
                self.events.append({"t": now, "kind": "verdict", "device": device.id, "modalias": device.modalias,
                                    "verdict": verdict.verdict, "reason": verdict.reason,
                                    "uevent_t": burst.get(device.syspath) if burst else None,
                                    "decision": self.decisions})
        self.publish()
        if self.policy.mode == "auto":
            self._maybe_fix()

    def _hold_back_loadable(self, judged: Judged, burst: dict[str, float] | None, binds: set[str]) -> Judged:
        """The devices to publish now. A device of a burst that just became loadable waits
        (self.waiting) until its settle window ends or its bind event arrives, unannounced; a
        full scan (burst None) starts no wait but keeps the running ones."""
        now = self.loop.time()
        out = []
        for device, verdict in judged:
            syspath = device.syspath
            waiting = self.waiting.get(syspath)
            if verdict.verdict == "loadable" and syspath not in binds:
                before = self.held.get(device.id)
                if waiting is None and burst is not None and (before is None or before.verdict.verdict != "loadable"):
                    self.waiting[syspath] = (now + self.policy.timeouts.settle, burst[syspath])
                    continue
                if waiting is not None and waiting[0] > now:
                    continue
            if waiting is not None:
                del self.waiting[syspath]
                if burst is not None:
                    burst[syspath] = waiting[1]  # the event log tells when its first event came
            out.append((device, verdict))
        self._arm_wait()
        return out

    @staticmethod
    def _device_at(context: pyudev.Context, syspath: str) -> Device | None:
        try:
            return from_udev(pyudev.Devices.from_sys_path(context, syspath))
        except (pyudev.DeviceNotFoundError, OSError):
            return None

    def _needs_driver(self, held: Held) -> None:
        if self.policy.mode == "off":
            return
        what = (f"{held.module or 'the driver'} in {held.candidate.package} {held.candidate.version}" if held.candidate
                else f"installed module {held.module}")  # no module: a repository announces the package
        log.warning("%s needs a driver: %s (%s): %s", held.device.id, held.verdict.verdict, what, held.verdict.reason,
                    extra=journal.fields("needs-driver", device=held.device.syspath, modalias=held.device.modalias,
                                         package=held.candidate.package if held.candidate else None,
                                         module=held.module, kmodguard_verdict=held.verdict.verdict))
        self.publisher.needs_driver(held)

    def _resolved(self, device_id: str, verdict: str, t: float) -> None:
        log.info("%s no longer needs a driver: %s", device_id, verdict,
                 extra=journal.fields("resolved", device=device_id, kmodguard_verdict=verdict))
        self.events.append({"t": t, "kind": "resolved", "device": device_id, "verdict": verdict})
        self.publisher.resolved(device_id, verdict)

    # --- fixing ----------------------------------------------------------------------------------

    def _auto_candidates(self) -> list[str]:
        return self.engine.auto_eligible(self.held.values()) if self.engine is not None else []

    def _maybe_fix(self) -> None:
        if self._fix_task is not None:
            return  # the running fix judges every device again when it ends
        if self._fix_window is not None:
            return  # a burst is still arriving: its window's close fixes it as one
        wanted = self._auto_candidates()
        if wanted:
            self._fix_task = self.loop.create_task(self._fixing(self._auto_fix(wanted)))
        else:
            self._arm_retry()

    async def _fixing(self, work) -> None:
        """Run a fix task; then judge everything again and, in auto mode, go on with what is left."""
        try:
            await work
        except KmodguardError as exc:
            log.error("%s", exc.message)
        except Exception:  # never let a task die silently
            log.exception("a fix task failed")
        finally:
            self._fix_task = None
        if self.policy.mode == "auto":
            self._maybe_fix()

    async def _auto_fix(self, device_ids: list[str]) -> None:
        try:
            await self.fix(device_ids, "auto", {})
        except KmodguardError as exc:
            log.error("automatic fix of %s failed: %s", ", ".join(device_ids), exc.message)
            self.decide(None)
        # No retry storm: a device the fix did not serve waits out a back-off before the next try.
        fixing.back_off(self.paths.state_dir, [i for i in device_ids if i in self.held], fixing.STILL_NEEDS,
                        unless_waiting=True)

    def _arm_retry(self) -> None:
        """One timer for the earliest back-off to expire (auto mode), so a failed device is tried
        again without an event; nothing is armed when nothing waits."""
        if self._retry_timer:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self.policy.mode != "auto":
            return
        backoff = state.Backoff(self.paths.state_dir)
        waits = [backoff.waiting(i) for i, h in self.held.items() if h.action in ("install", "load")]
        waits = [w for w in waits if w > 0]
        if waits:
            self._retry_timer = self.loop.call_later(min(waits) + 1, self.decide, None)

    async def fix(self, device_ids: list[str], requested_by: str, overrides: dict) -> dict:
        """Run one fix out of process and return its record (STATE_DIR/last-fix.json). Fixes queue:
        one at a time. Afterwards every device is judged again (an install changes many verdicts)."""
        config_mod.with_overrides(self.policy, overrides)  # refuse bad options before anything runs
        async with self._fix_lock:
            request = state.write_request(self.paths.state_dir, self.paths.kver, device_ids, requested_by, overrides)
            record = await self._run_request(request)
        self.decide(None)
        return record

    async def _run_request(self, request: dict) -> dict:
        """Run the pending request (STATE_DIR/fix-request.json) through the runner, report its end."""
        rid = request["id"]
        self.fix_running = True
        self.events.append({"t": time.time(), "kind": "fix-started", "request": rid, "devices": request["devices"],
                            "requested_by": request.get("requested_by")})
        self.publish()
        log.info("fixing %s (requested by %s, request %s)", ", ".join(request["devices"]) or "nothing",
                 request.get("requested_by"), rid,
                 extra=journal.fields("fix-started", kmodguard_request=rid, device=" ".join(request["devices"])))
        path = self.paths.state_dir / state.REQUEST_FILE
        try:
            code = await self.runner.run(path, lambda message: self.publisher.fix_progress(rid, message))
            # the request may have been taken by a fix started before this daemon: that one's record counts
            await self._wait_for_fix_lock()
        finally:
            self.fix_running = False
        record = fixing.outcome(self.paths.state_dir, request, code, self.runner.name)
        self._finished(record)
        return record

    def _finished(self, record: dict) -> None:
        """Report a fix's end, once: event, journal (MESSAGE_ID), signal; then forget its request."""
        rid = record.get("id")
        self.fixes += 1
        self.last_fix = record
        outcomes = (record.get("report") or {}).get("outcomes", [])
        self.events.append({"t": time.time(), "kind": "fix-finished", "request": rid,
                            "exit_code": record.get("exit_code"),
                            "outcomes": {o["id"]: o["outcome"] for o in outcomes}})
        level = logging.INFO if record.get("exit_code") == 0 else logging.WARNING
        summary = ("; ".join(f"{o['id']}: {o['outcome']}" for o in outcomes)
                   or (record.get("error") or {}).get("message") or "nothing to do")
        log.log(level, "fix %s finished (exit %s): %s", rid, record.get("exit_code"), summary,
                extra=journal.fields("fix-finished", kmodguard_request=rid,
                                     kmodguard_exit_code=record.get("exit_code")))
        self.publisher.fix_finished(rid, int(record.get("exit_code") or 0), record)
        if rid:
            state.finish_request(self.paths.state_dir, rid)  # reported: a later daemon leaves it alone

    def _finished_unwatched(self, record: dict) -> None:
        log.info("the fix of request %s ended while no daemon watched it", record.get("id"))
        self._finished(record)

    async def _wait_for_fix_lock(self) -> None:
        """Until no fix holds STATE_DIR/fix.lock (polled: a thread blocked in flock would hold up
        the daemon's exit; this happens only while a fix runs)."""
        while state.lock_held(self.paths.state_dir):
            await asyncio.sleep(0.25)

    def _resume(self) -> None:
        """At start, before the first decision: take over what a previous daemon left (a restart
        while its fix ran, a kill, a crash, a power cut). See _take_over."""
        sd = self.paths.state_dir
        if state.lock_held(sd) or state.pending_request(sd) is not None or state.taken_request(sd) is not None:
            self._fix_task = self.loop.create_task(self._fixing(self._take_over()))

    async def _take_over(self) -> None:
        """A fix holds the lock: wait for it, start no other. Then, holding the lock for a moment,
        read where the request is: taken and recorded, the fix ran to its end without a daemon to
        report it (this one reports it, as its own); taken and not recorded, its fix was killed
        (handed back as pending); pending: resumed, once. A resumed fix converges, doing only what
        is still missing."""
        sd = self.paths.state_dir
        async with self._fix_lock:  # D-Bus Fix calls queue behind this
            if state.lock_held(sd):
                running = state.taken_request(sd) or state.pending_request(sd)
                log.info("a fix is still running (request %s): waiting for it",
                         running["id"] if running else "unknown")
                self.fix_running = True
                self.publish()
                try:
                    await self._wait_for_fix_lock()
                finally:
                    self.fix_running = False
            while True:
                try:
                    pending = fixing.leftover(sd, self._finished_unwatched)
                    break
                except Busy:  # a fix took the lock in between (one started by the previous daemon)
                    await self._wait_for_fix_lock()
            if pending is not None:
                log.warning("resuming the interrupted fix of %s (request %s)", ", ".join(pending["devices"]),
                            pending["id"])
                await self._run_request(pending)
        self.decide(None)

    # --- what the world sees ---------------------------------------------------------------------

    def status_line(self) -> str:
        needing = list(self.held.values())
        if self.fix_running:
            return f"fixing; {len(needing)} device(s) need a driver"
        if not needing:
            return f"mode {self.policy.mode}: every device with a modalias is served or left alone on purpose"
        counts = collections.Counter(h.verdict.verdict for h in needing)
        parts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
        return f"mode {self.policy.mode}: {len(needing)} device(s) need a driver ({parts})"

    def snapshot(self) -> dict:
        return {
            "pid": os.getpid(),
            "mode": self.policy.mode,
            "since": _iso(self.since),
            "kernel": self.paths.kver,
            "bus": self.bus_name,
            "settle": self.policy.timeouts.settle,
            "needs_driver": sorted(self.held),
            "devices": [self.held[i].as_json() for i in sorted(self.held)],
            "decisions": self.decisions,
            "fixes": self.fixes,
            "fix_running": self.fix_running,
            "last_fix": self.last_fix,
            "events": list(self.events),
            "updated": _iso(time.time()),
        }

    def publish(self) -> None:
        """Snapshot, MOTD, systemd STATUS=, and the fronts."""
        try:
            state.write_snapshot(self.paths.snapshot, self.snapshot())
        except OSError as exc:
            log.error("cannot write the snapshot %s: %s", self.paths.snapshot, exc)
        self._motd()
        line = self.status_line()
        if line != self._status_sent:  # systemd wants news, not a copy per event
            systemd.notify(STATUS=line)
            self._status_sent = line
        self.publisher.changed()

    def _motd(self) -> None:
        offers = [Offer(h.device.id, h.module, h.candidate.package if h.candidate else None,
                        h.candidate.version if h.candidate else None)
                  for h in self.held.values() if h.action in ("install", "load")]
        write_motd(self.paths.motd, motd_text(offers) if self.policy.mode != "off" else None)

    # --- what the fronts ask ---------------------------------------------------------------------

    def status_document(self) -> dict:
        from ..devices import enumerate_devices

        engine = self.current_engine()
        return engine.status_document(engine.judge(enumerate_devices()), self.snapshot())

    def explain_document(self, modaliases: list[str]) -> dict:
        if not modaliases:
            raise InvalidInput("give at least one modalias")
        return self.current_engine().explain_document(modaliases)[0]

    def plan_document(self, refs: list[str], overrides: dict) -> dict:
        policy = config_mod.with_overrides(self.policy, overrides)
        engine = Engine(self.paths, policy, self.current_engine().env)
        return engine.plan(engine.judge(self._select(engine, refs))).as_json()

    def _select(self, engine: Engine, refs: list[str]) -> list[Device]:
        if refs:
            return engine.select(refs)
        return [h.device for h in self.held.values()]

    def needing_ids(self, refs: list[str]) -> list[str]:
        """The devices a Fix call acts on, as `kmodguard fix` chooses them: those named (checked to
        exist), else every device held as needing a driver whose plan can act on it and that is
        not backing off after a failure."""
        if refs:
            return [d.id for d in self.current_engine().select(refs)]
        backoff = state.Backoff(self.paths.state_dir)
        return [i for i, h in self.held.items() if h.action in ("install", "load") and not backoff.waiting(i)]

