"""Small persistent state under STATE_DIR: the remediation lock and per-device back-off.

Remediation itself converges from the system (rpm database, sysfs, initramfs contents); this
file only remembers failures, so that a device that keeps failing is not retried in a storm.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from ..errors import Busy

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
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
