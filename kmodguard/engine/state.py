"""Small persistent state: the remediation lock, per-device back-off, fix requests and results,
and the daemon's snapshot.

Remediation itself converges from the system (rpm database, sysfs, initramfs contents); these
files only remember what a person or the daemon asked for and how it ended:

  STATE_DIR/fix.lock          one remediation at a time (flock; released when its holder dies)
  STATE_DIR/backoff.json      failures per device, so that a failing device is not retried in a storm
  STATE_DIR/fix-request.json  a fix the daemon asked for, pending: no fix has taken it yet
  STATE_DIR/fix-request.taken.json
                              the same request once a fix took it: renamed under the fix lock before
                              the fix acts, and left there until a daemon has reported its end
  STATE_DIR/last-fix.json     the report of the last fix that ran to its end (written under the lock)
  RUNTIME_DIR/state.json      the daemon's world-readable snapshot (attached to `status` as "daemon")

and three caches, which only save work (read_cache/write_cache; a bad one is a miss):

  STATE_DIR/repository-drivers.json  the repositories' driver announcements (engine/repository.py)
  STATE_DIR/installed-firmware.json  the installed modules' firmware lists (engine/remembered.py)
  STATE_DIR/verified-index.json      the checksums the index's files had when checked (engine/remembered.py)

So a daemon's request is always in exactly one of these states: pending (fix-request.json), being
run (taken, and the lock is held), done (taken, lock free, last-fix.json carries its id: a daemon
reports it once, then removes the taken file), or interrupted (taken, lock free, no record of it:
its fix was killed; a daemon hands it back as pending and runs it once more).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from pathlib import Path

from ..errors import Busy, InvalidInput, KmodguardError
from ..fsutil import make_dir, read_capped, write_atomic


BACKOFF_FIRST = 300.0  # seconds after the first failure
BACKOFF_MAX = 86400.0


# Locks this process holds: lock path -> [fd, depth]. A process that holds the lock and takes
# it again (the fix takes it to consume its request, then the remediation takes it) nests.
_HELD: dict[str, list] = {}


class RemediationLock:
    """One remediation at a time, machine-wide (flock on STATE_DIR/fix.lock; released if we die).

    Re-entrant within one process. wait: seconds to wait for another holder before Busy (0: none)."""

    def __init__(self, state_dir: Path, wait: float = 0.0):
        self.path = Path(state_dir) / "fix.lock"
        self.key = os.path.abspath(self.path)
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self):
        held = _HELD.get(self.key)
        if held is not None:
            held[1] += 1
            self.fd = held[0]
            return self
        make_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise Busy(f"another kmodguard fix is running (pid {holder})",
                           hint="wait for it to finish; 'kmodguard status' shows its result") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _HELD[self.key] = [fd, 1]
        return self

    def __exit__(self, *exc):
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            os.close(held[0])


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

    def backing_off(self, ids, now: float | None = None) -> list[dict]:
        """Those of these devices that wait before the next automatic try: [{"id", "until",
        "failures", "reason"}], "until" in UTC as ISO 8601."""
        now = now or time.time()
        out = []
        for device_id in ids:
            if self.waiting(device_id, now):
                entry = self.entries[device_id]
                until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(entry.get("next", 0))))
                out.append({"id": device_id, "until": until, "failures": int(entry.get("failures", 0)),
                            "reason": str(entry.get("reason") or "")})
        return out

    def failed(self, device_id: str, reason: str) -> None:
        entry = self.entries.get(device_id) if isinstance(self.entries.get(device_id), dict) else {}
        failures = int(entry.get("failures", 0)) + 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
        self.entries[device_id] = {"failures": failures, "last": time.time(), "next": time.time() + delay,
                                   "reason": reason}

    def succeeded(self, device_id: str) -> None:
        self.entries.pop(device_id, None)

    def save(self) -> None:
        make_dir(self.path.parent)
        # world-readable, as the daemon's snapshot is: `kmodguard status` by anyone names them
        write_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True).encode(), 0o644)


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


def read_cache(path: Path, cap: int) -> dict | None:
    """A cache in STATE_DIR as a JSON object, or None: absent, over cap, not a regular file (a link
    is not followed), not a JSON object. A bad cache is only a miss."""
    try:
        doc = json.loads(read_capped(path, cap, follow=False))
    except (KmodguardError, OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def write_cache(path: Path, doc: dict) -> bool:
    """Best effort and not durable (a cache): False when it could not be written; a user's status
    cannot write STATE_DIR, and need not."""
    path = Path(path)
    if not os.access(path.parent, os.W_OK):
        return False
    try:
        write_atomic(path, json.dumps(doc, separators=(",", ":")).encode(), durable=False)
    except OSError:
        return False
    return True


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
    import secrets  # here, not at the top: status and explain never make a request (hmac, OpenSSL: ms)

    request = {"id": secrets.token_hex(8), "kernel": kernel, "devices": list(devices), "requested_by": requested_by,
               "overrides": dict(overrides or {}), "created": time.time()}
    make_dir(state_dir)
    write_atomic(Path(state_dir) / REQUEST_FILE, json.dumps(request, indent=1).encode(), 0o600)
    return request


def _read_trusted(path: Path) -> dict | None:
    """A request's JSON, read only from a regular file owned by root that neither group nor others
    may write: a fix runs as root what it says. None: no such file. InvalidInput: refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            _refuse(path, "it is a symbolic link")
        if isinstance(exc, PermissionError):
            raise
        return None
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            _refuse(path, "it is not a regular file")
        if st.st_uid != 0:
            _refuse(path, f"it is owned by uid {st.st_uid}, not root")
        if st.st_mode & 0o022:
            _refuse(path, f"group or others may write it (mode {stat.S_IMODE(st.st_mode):04o})")
        try:
            doc = json.loads(f.read(1 << 20).decode("utf-8"))
        except (OSError, ValueError):
            return {}
    return doc if isinstance(doc, dict) else {}


def _refuse(path: Path, why: str):
    import logging  # here, not at the top: status reads this module and never logs (logging is 3 ms of it)

    logging.getLogger(__name__).warning("refused the fix request %s: %s", path, why)
    raise InvalidInput(f"refused the fix request {path}: {why}",
                       hint="a fix request must be a regular file owned by root, writable by root only")


def read_request(path: Path) -> dict:
    """A fix request file, checked: who may have written it, and its shape, which is the only
    thing trusted from it."""
    doc = _read_trusted(path)
    if not doc:
        raise InvalidInput(f"{path} is not a kmodguard fix request (unreadable or not JSON)")
    devices, overrides = doc.get("devices"), doc.get("overrides", {})
    if (not isinstance(doc.get("id"), str) or not isinstance(devices, list) or not isinstance(doc.get("kernel"), str)
            or not all(isinstance(d, str) and d for d in devices) or not isinstance(overrides, dict)):
        raise InvalidInput(f"{path} is not a kmodguard fix request (needs id, kernel, devices, overrides)")
    return doc


TAKEN_FILE = "fix-request.taken.json"


def pending_request(state_dir: Path) -> dict | None:
    """The request no fix has taken yet, if any."""
    return _checked(Path(state_dir) / REQUEST_FILE)


def taken_request(state_dir: Path) -> dict | None:
    """The request a fix took (running, done but not yet reported, or interrupted), if any."""
    return _checked(Path(state_dir) / TAKEN_FILE)


def _checked(path: Path) -> dict | None:
    if not os.path.lexists(path):
        return None
    try:
        return read_request(path)
    except InvalidInput:
        return None


def take_request(state_dir: Path, path: Path) -> dict | None:
    """Consume the request at `path`: read, check and rename it to STATE_DIR/fix-request.taken.json
    in one step. Call it holding the RemediationLock, before acting on the request: a request is
    then pending, or taken by exactly one fix. None: no request there (another fix took it)."""
    path = Path(path)
    try:
        request = read_request(path)
    except InvalidInput:
        if not path.exists():
            return None
        raise
    taken = Path(state_dir) / TAKEN_FILE
    make_dir(state_dir)
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return None
    except OSError:  # another file system: copy, then remove
        write_atomic(taken, json.dumps(request, indent=1).encode(), 0o600)
        path.unlink(missing_ok=True)
    from ..fsutil import fsync_dir

    fsync_dir(taken.parent)
    return request


def requeue(state_dir: Path, request: dict) -> dict:
    """Hand a taken request whose fix was killed back as pending (same id), marked as a resume.
    Call it holding the RemediationLock."""
    requested_by = str(request.get("requested_by"))
    again = {**request, "requested_by": requested_by if requested_by.startswith("resume of ")
             else f"resume of {requested_by}"}
    write_atomic(Path(state_dir) / REQUEST_FILE, json.dumps(again, indent=1).encode(), 0o600)
    (Path(state_dir) / TAKEN_FILE).unlink(missing_ok=True)
    return again


def finish_request(state_dir: Path, request_id: str) -> None:
    """The end of this request was reported: forget it, pending or taken (only if it is that one)."""
    for name in (REQUEST_FILE, TAKEN_FILE):
        path = Path(state_dir) / name
        current = _read_json(path)
        if current is not None and current.get("id") == request_id:
            path.unlink(missing_ok=True)


def record_fix(state_dir: Path, record: dict) -> None:
    make_dir(state_dir)
    write_atomic(Path(state_dir) / LAST_FIX_FILE, json.dumps(record, indent=1).encode(), 0o644)


def last_fix(state_dir: Path) -> dict | None:
    return _read_json(Path(state_dir) / LAST_FIX_FILE)


# --- the daemon's snapshot ---------------------------------------------------------------------


def write_snapshot(path: Path, doc: dict) -> None:
    make_dir(Path(path).parent)
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
