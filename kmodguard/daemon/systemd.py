"""What the daemon tells systemd, through systemd-python: sd_notify and the watchdog (the journal's
MESSAGE_IDs and fields are kmodguard.journal's: the CLI logs them too).

Without systemd-python (or without systemd) every call here is a quiet no-op: the daemon then
runs in the foreground and logs to stderr.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

try:
    from systemd import daemon as _sd
except ImportError:  # systemd-python is optional outside systemd
    _sd = None


def notify(**fields: str | int) -> None:
    """sd_notify(READY=1, STATUS=..., WATCHDOG=1, STOPPING=1) when NOTIFY_SOCKET is set."""
    if _sd is None or not os.environ.get("NOTIFY_SOCKET"):
        return
    message = "\n".join(f"{key}={value}" for key, value in fields.items())
    try:
        _sd.notify(message)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


def watchdog_period() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def booted() -> bool:
    """systemd is PID 1 (sd_booted)."""
    return os.path.isdir("/run/systemd/system")
