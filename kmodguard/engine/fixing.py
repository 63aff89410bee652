"""One fix workflow, whoever asks for it: `kmodguard fix`, `check --apply-policy`, the daemon's
request (kmodguard-fix.service or its child process), a D-Bus Fix.

The fronts parse, authorize, relay and print; what a fix is and how it is remembered is here:

- the record of a fix that ran to its end or stopped (STATE_DIR/last-fix.json): one shape,
  built by `fix_record` only;
- the back-off of devices a fix did not serve (STATE_DIR/backoff.json): written by
  `back_off` only (engine/remediate.py records each probed device's outcome the same way);
- a request the daemon wrote: `run_request` waits for the fix lock, takes the request, judges its
  devices again and runs it, recording how it ended whatever happens;
- the policy's mode applied to the devices that need a driver now (`apply_mode`): offer
  (journal entries with their MESSAGE_IDs, the MOTD) or auto (fix the devices auto may fix).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from .. import config as config_mod
from ..errors import ExitCode, InvalidInput, KmodguardError
from ..paths import Paths
from . import state

Progress = Callable[[str], None]
STILL_NEEDS = "still needs a driver after kmodguard fix"


def fix_record(request: dict | None, devices: list[str], *, exit_code: int, started: float | None = None,
               **rest) -> dict:
    """The record of one fix: the request it served (id, who asked), its devices, how it ended;
    `rest`: report, error and hint (KmodguardError.as_json()), nothing_to_do."""
    request = request or {}
    record = {"id": request.get("id"), "requested_by": request.get("requested_by", "cli"), "devices": list(devices)}
    if started is not None:
        record["started"] = started
    return {**record, "finished": time.time(), "exit_code": int(exit_code), **rest}


def back_off(state_dir: Path, device_ids, why: str, *, unless_waiting: bool = False) -> None:
    """Devices a fix did not serve wait before the next try (no retry storm)."""
    backoff = state.Backoff(state_dir)
    for device_id in device_ids:
        if not (unless_waiting and backoff.waiting(device_id)):
            backoff.failed(device_id, why)
    backoff.save()


def failed(state_dir: Path, request: dict | None, devices: list[str], exc: KmodguardError,
           started: float | None = None) -> None:
    """A fix that stopped before its devices were probed: they back off, the failure is recorded."""
    back_off(state_dir, devices, exc.message)
    state.record_fix(state_dir, fix_record(request, devices, exit_code=exc.exit_code, started=started,
                                           **exc.as_json()))


def run_request(paths: Paths, request_path: Path, backend: str | None, progress: Progress, *,
                kver_asked: bool = False) -> tuple[int, dict | None]:
    """The fix a daemon asked for. Under the fix lock (waited for, up to timeouts.lock_wait: a fix
    already running goes first) the request is taken, renamed to fix-request.taken.json, before
    anything is done; its record is written before the lock is let go. So a request is pending,
    being run (lock held), or done: a daemon starting meanwhile never runs it twice. Returns
    (exit code, the fix's report), or (0, None) when another fix took the request."""
    from ..errors import Busy

    lock = state.RemediationLock(paths.state_dir, wait=config_mod.load(paths.config_dir).timeouts.lock_wait)
    try:
        lock.__enter__()
    except Busy as exc:  # still pending: a daemon may run it later; this try's end is recorded
        pending = state.pending_request(paths.state_dir) if Path(request_path) == \
            paths.state_dir / state.REQUEST_FILE else None
        if pending is not None:
            state.record_fix(paths.state_dir, fix_record(pending, pending["devices"], exit_code=exc.exit_code,
                                                         **exc.as_json()))
        raise
    try:
        request = state.take_request(paths.state_dir, Path(request_path))
        if request is None:
            progress(f"no fix request at {request_path}: another fix took it; nothing to do")
            return ExitCode.OK, None
        return _run_taken(paths, request, backend, progress, kver_asked)
    finally:
        lock.__exit__(None, None, None)


def _run_taken(paths: Paths, request: dict, backend: str | None, progress: Progress,
               kver_asked: bool) -> tuple[int, dict]:
    from .api import Engine

    where = f"request {request['id']}"
    try:
        if request["kernel"] != paths.kver:
            if kver_asked:
                raise InvalidInput(f"{where} is a fix for kernel {request['kernel']}, not {paths.kver}")
            paths = paths.with_kver(request["kernel"])  # the daemon judged that kernel's devices
        policy = config_mod.with_overrides(config_mod.load(paths.config_dir), request["overrides"],
                                           where=f"{where}: overrides")
        engine = Engine(paths, policy, online=True)
        devices = engine.select(request["devices"], missing_ok=True) if request["devices"] else []
        plan = engine.plan(engine.judge(devices))
    except KmodguardError as exc:  # taken, so recorded: the daemon reports how it ended
        state.record_fix(paths.state_dir, fix_record(request, request["devices"], exit_code=exc.exit_code,
                                                     **exc.as_json()))
        raise
    if plan.blocked or not plan.needs_action:
        report = {**plan.as_json(), "steps": [], "outcomes": []}
        state.record_fix(paths.state_dir, fix_record(request, request["devices"], exit_code=ExitCode.OK,
                                                     report=report, nothing_to_do=True))
        return ExitCode.OK, report
    return engine.run_fix(plan, engine.backend(backend), progress, request=request)


def leftover(state_dir: Path, report: Callable[[dict], None]) -> dict | None:
    """Take over what a previous daemon left, holding the fix lock for a moment (Busy if a fix
    holds it): a taken request whose fix ran to its end unreported is reported (`report(record)`,
    under the lock, as a fix of this daemon's); a taken request without its record was killed and
    is handed back as pending. Returns the pending request to resume, if any."""
    with state.RemediationLock(state_dir):
        taken, record = state.taken_request(state_dir), state.last_fix(state_dir)
        if taken is not None and record is not None and record.get("id") == taken["id"]:
            report(record)
        elif taken is not None:
            state.requeue(state_dir, taken)
        return state.pending_request(state_dir)


def outcome(state_dir: Path, request: dict, exit_status: int | None, runner: str) -> dict:
    """A daemon's request after its runner ended: the fix's own record (STATE_DIR/last-fix.json), or,
    when the fix left none (killed, or it failed before recording), a failure naming the runner."""
    record = state.last_fix(state_dir)
    if record is not None and record.get("id") == request["id"]:
        return record
    return fix_record(request, request["devices"], exit_code=exit_status or 1, error={
        "name": "Failed", "message": f"the fix ({runner}) ended with status {exit_status} without a report; "
                                     "see the journal"})


def apply_mode(engine, plan, need, progress: Progress, daemon_fix: Callable | None) -> dict:
    """What the policy's mode says to do about the devices that need a driver now (`need`: the
    (device, verdict) pairs), as the daemon does: offer writes their journal entries (MESSAGE_ID
    needs-driver) and, when no daemon keeps it, the MOTD; auto fixes the devices auto may fix,
    through the running daemon when there is one (`daemon_fix(ids, options, progress)`), else here
    (root only). Returns what was done: {"action", "detail", "exit_code"?, "report"?}."""
    import os

    from ..journal import fields
    from .offer import Offer, motd_text, write_motd

    log = logging.getLogger("kmodguard.check")
    mode = engine.policy.mode
    if mode == "off":
        return {"action": "none", "detail": "mode off"}
    for d, v in need:
        first = v.candidates[0] if v.candidates else None
        log.warning("%s needs a driver: %s: %s", d.id, v.verdict, v.reason,
                    extra=fields("needs-driver", device=d.syspath, modalias=d.modalias,
                                 package=first.package if first else None,
                                 module=first.module if first else None, kmodguard_verdict=v.verdict))
    daemon = state.read_snapshot(engine.paths.snapshot)
    ids = engine.auto_eligible(plan.devices)
    if mode == "offer" or not ids:
        if daemon is None:  # the daemon keeps the MOTD when it runs
            actions = {a.id: a for a in plan.devices}
            offers = [Offer(d.id, actions[d.id].module, actions[d.id].package,
                            v.candidates[0].version if v.candidates else None)
                      for d, v in need if actions.get(d.id) and actions[d.id].action in ("install", "load")]
            write_motd(engine.paths.motd, motd_text(offers))
        return {"action": "offer", "detail": f"{len(need)} device(s) announced"
                + ("" if mode == "offer" else "; none that mode auto may fix (bus, back-off or this system)")}
    if daemon and daemon.get("bus") and daemon_fix is not None:
        code, doc = daemon_fix(ids, {}, progress)
        return {"action": "fix", "detail": f"the daemon fixed {', '.join(ids)} (exit {code})", "exit_code": code,
                "report": doc}
    if os.geteuid() != 0:
        from ..errors import NotAuthorized

        raise NotAuthorized("mode auto fixes devices: run 'kmodguard check --apply-policy' as root")
    fix_plan = engine.plan(engine.judge(engine.select(ids)))
    code, doc = engine.run_fix(fix_plan, engine.backend(), progress)
    return {"action": "fix", "detail": f"fixed {', '.join(ids)} (exit {code})", "exit_code": code, "report": doc}
