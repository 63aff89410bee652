"""The command line as a client of a running daemon (only `fix` needs it: reading needs no bus)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Callable

from ..errors import Busy, InvalidInput, KmodguardError, NotAuthorized, PackageUnavailable, SignatureRefused
from .output import safe

MAX_PROGRESS = 500  # characters of one progress line relayed from the daemon

ERRORS = {"NotAuthorized": NotAuthorized, "PackageUnavailable": PackageUnavailable, "Busy": Busy,
          "InvalidInput": InvalidInput, "SignatureRefused": SignatureRefused}


def _error(exc) -> KmodguardError:
    from ..dbus import ERROR_PREFIX

    name = exc.type[len(ERROR_PREFIX):] if exc.type.startswith(ERROR_PREFIX) else None
    message, _, hint = (exc.text or "").partition("\n")
    if exc.type == "org.freedesktop.DBus.Error.AccessDenied":
        return NotAuthorized(f"the system bus refused the call: {message}",
                             hint="is the D-Bus policy org.kmodguard.Daemon1.conf installed?")
    if name is None:
        return KmodguardError(f"the kmodguard daemon could not be asked: {exc.type}: {message}")
    return ERRORS.get(name, KmodguardError)(message, hint=hint or None)


async def _fix(devices: list[str], options: dict, progress: Callable[[str], None]) -> tuple[int, dict]:
    from .. import dbus as D
    from ..dbus import BUS_NAME, INTERFACE, OBJECT_PATH

    bus = await D.connect(os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or None)
    try:
        # Progress is taken from the daemon only: the unique name that owns org.kmodguard.Daemon1
        # now. Any local user may emit a signal named FixProgress; and what is printed from it is
        # escaped (no terminal control characters reach the user's terminal).
        owner = await bus.call(D.Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                         interface="org.freedesktop.DBus", member="GetNameOwner", signature="s",
                                         body=[BUS_NAME]))
        if owner.message_type == D.MessageType.ERROR:
            raise _error(D.DBusError(owner.error_name, (owner.body or [""])[0]))
        daemon = owner.body[0]

        def on_message(message):
            if (message.message_type == D.MessageType.SIGNAL and message.sender == daemon
                    and message.path == OBJECT_PATH and message.interface == INTERFACE
                    and message.member == "FixProgress" and message.signature == "ss"):
                progress(f"daemon: {safe(message.body[1], limit=MAX_PROGRESS)}")

        bus.add_message_handler(on_message)
        await bus.call(D.Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                 interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                                 body=[f"type='signal',sender='{daemon}',path='{OBJECT_PATH}',"
                                       f"interface='{INTERFACE}',member='FixProgress'"]))
        reply = await bus.call(D.Message(
            destination=daemon, path=OBJECT_PATH, interface=INTERFACE, member="Fix", signature="asa{sv}",
            body=[devices, {k: D.Variant("s", v) for k, v in options.items()}],
            flags=D.MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION))
        if reply.message_type == D.MessageType.ERROR:
            raise _error(D.DBusError(reply.error_name, (reply.body or [""])[0]))
        code, report = reply.body
        return code, json.loads(report)
    finally:
        bus.disconnect()


def fix(devices: list[str], options: dict, progress: Callable[[str], None]) -> tuple[int, dict]:
    """Ask the daemon to fix; returns (exit code, report). Errors come back as kmodguard's own."""
    progress("the kmodguard daemon runs: asking it to do the fix")
    try:
        return asyncio.run(_fix(devices, options, progress))
    except (OSError, ValueError) as exc:
        raise KmodguardError(f"cannot reach the kmodguard daemon on the system bus: {exc}",
                             hint="as root, 'kmodguard fix --local' fixes without the daemon") from None
