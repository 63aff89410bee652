"""Small persistent state: the remediation lock, per-device back-off, fix requests and results,
and the daemon's snapshot.

Remediation itself converges from the system (rpm database, sysfs, initramfs contents); these
files only remember what a person or the daemon asked for and how it ended:

  STATE_DIR/fix.lock          one remediation at a time (flock; released when its holder dies)
  STATE_DIR/backoff.json      failures per device, so that a failing device is not retried in a storm
  STATE_DIR/fix-request.json  a fix the daemon asked for; removed when it has run to its end, so a
                              request still there with the lock free is an interrupted fix to resume
  STATE_DIR/last-fix.json     the report of the last fix that ran to its end
  RUNTIME_DIR/state.json      the daemon's world-readable snapshot (attached to `status` as "daemon")
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from pathlib import Path

from ..errors import Busy, InvalidInput
from ..fsutil import write_atomic

BACKOFF_FIRST = 300.0  # seconds after the first failure
BACKOFF_MAX = 86400.0


class RemediationLock:
    """One remediation at a time, machine-wide (flock on STATE_DIR/fix.lock; released if we die)."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "fix.lock"
        self.fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise Busy(f"another kmodguard fix is running (pid {holder})",
                       hint="wait for it to finish; 'kmodguard status' shows its result") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class Backoff:
    """Failures per device id, with an exponential delay before the next automatic try."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "backoff.json"
        try:
            data = json.loads(self.path.read_text())
            self.entries = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def waiting(self, device_id: str, now: float | None = None) -> float:
        """Seconds until the device may be tried again automatically (0: now)."""
        entry = self.entries.get(device_id)
        if not isinstance(entry, dict):
            return 0.0
        return max(0.0, float(entry.get("next", 0)) - (now or time.time()))

    def failed(self, device_id: str, reason: str) -> None:
        entry = self.entries.get(device_id) if isinstance(self.entries.get(device_id), dict) else {}
        failures = int(entry.get("failures", 0)) + 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
        self.entries[device_id] = {"failures": failures, "last": time.time(), "next": time.time() + delay,
                                   "reason": reason}

    def succeeded(self, device_id: str) -> None:
        self.entries.pop(device_id, None)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True).encode(), 0o600)


def lock_held(state_dir: Path) -> bool:
    """Is a remediation running right now (someone holds STATE_DIR/fix.lock)?"""
    try:
        fd = os.open(Path(state_dir) / "fix.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# --- fix requests and results ------------------------------------------------------------------

REQUEST_FILE = "fix-request.json"
LAST_FIX_FILE = "last-fix.json"


def write_request(state_dir: Path, kernel: str, devices: list[str], requested_by: str,
                  overrides: dict | None = None) -> dict:
    """Record a fix the daemon wants run (by the oneshot unit or a child process); returns it."""
    request = {"id": secrets.token_hex(8), "kernel": kernel, "devices": list(devices), "requested_by": requested_by,
               "overrides": dict(overrides or {}), "created": time.time()}
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(state_dir) / REQUEST_FILE, json.dumps(request, indent=1).encode(), 0o600)
    return request


def read_request(path: Path) -> dict:
    """A fix request file, checked: its shape is the only thing trusted from it."""
    doc = _read_json(path)
    if doc is None:
        raise InvalidInput(f"{path} is not a kmodguard fix request (unreadable or not JSON)")
    devices, overrides = doc.get("devices"), doc.get("overrides", {})
    if (not isinstance(doc.get("id"), str) or not isinstance(devices, list) or not isinstance(doc.get("kernel"), str)
            or not all(isinstance(d, str) and d for d in devices) or not isinstance(overrides, dict)):
        raise InvalidInput(f"{path} is not a kmodguard fix request (needs id, kernel, devices, overrides)")
    return doc


def pending_request(state_dir: Path) -> dict | None:
    """The request of a fix that did not run to its end, if any."""
    path = Path(state_dir) / REQUEST_FILE
    if not path.exists():
        return None
    try:
        return read_request(path)
    except InvalidInput:
        return None


def finish_request(state_dir: Path, request_id: str) -> None:
    """The fix for this request ran to its end: forget the request (only if it is still that one)."""
    path = Path(state_dir) / REQUEST_FILE
    current = _read_json(path)
    if current is not None and current.get("id") == request_id:
        path.unlink(missing_ok=True)


def record_fix(state_dir: Path, record: dict) -> None:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(state_dir) / LAST_FIX_FILE, json.dumps(record, indent=1).encode(), 0o644)


def last_fix(state_dir: Path) -> dict | None:
    return _read_json(Path(state_dir) / LAST_FIX_FILE)


# --- the daemon's snapshot ---------------------------------------------------------------------


def write_snapshot(path: Path, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # compact: json's C encoder (indent= takes the pure-Python one, 10x slower on a big snapshot)
    write_atomic(Path(path), json.dumps(doc, separators=(",", ":")).encode(), 0o644, durable=False)  # in /run


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's (root's) process: alive
    return True


def read_snapshot(path: Path) -> dict | None:
    """The daemon's snapshot, or None when no daemon runs (no file, or its writer is gone)."""
    doc = _read_json(path)
    return doc if doc is not None and _alive(doc.get("pid")) else None
