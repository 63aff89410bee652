"""What the daemon tells systemd, through systemd-python: sd_notify, the watchdog, journal fields.

Without systemd-python (or without systemd) every call here is a quiet no-op: the daemon then
runs in the foreground and logs to stderr.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# MESSAGE_ID= of each kind of journal event (journalctl MESSAGE_ID=... finds them all).
MESSAGE_IDS = {
    "needs-driver": "c167d616d03446fb8fe127f7a6b46fa6",  # a device needs a package or a module
    "resolved": "0d56fb3196074acfb06230fc845abecb",  # a device no longer needs one (bound, gone, ignored)
    "fix-started": "9c94234644bc400cbdf097810b10c56b",
    "fix-finished": "d122649fd7854f629fea458b7bce3c1e",
    "started": "e9a8c2903ea14b54998876412b60905f",  # the daemon judged the devices at start (coldplug)
    "unindexed": "5286700606504ef88575b02c65f313d2",  # a device kmodguard cannot judge: no index
    # a new kernel's initramfs lacks the driver of a device needed to mount the root (check --kver)
    "initramfs-lacks-driver": "1e8150f94bc64906ac691f12b369fc7f",
}

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


def fields(kind: str, **values) -> dict:
    """The `extra=` of a log call: MESSAGE_ID for the kind and the given fields, upper-cased
    (systemd's JournalHandler sends them as journal fields; stderr ignores them)."""
    out = {"MESSAGE_ID": MESSAGE_IDS[kind], "KMODGUARD_EVENT": kind}
    out.update({key.upper(): str(value) for key, value in values.items() if value is not None})
    return out
