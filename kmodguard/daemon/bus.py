"""The daemon on the system bus: org.kmodguard.Daemon1 (units/org.kmodguard.Daemon1.xml documents it).

Reading (GetStatus, Explain, Plan, properties) is open to every caller. Fix and Reload change the
system: root passes, anyone else must be allowed by polkit (org.kmodguard.fix, org.kmodguard.reload);
without polkit, root only. Every method goes through one exception funnel: kmodguard's errors
become org.kmodguard.Error.<Name>, anything else org.kmodguard.Error.Failed with a plain message,
and never a Python traceback (dbus-next sends one by default).
"""

# No `from __future__ import annotations`: dbus-next reads the D-Bus signatures from the annotations.

import asyncio
import contextvars
import functools
import json
import logging

from .. import dbus as D
from ..errors import InvalidInput, KmodguardError, NotAuthorized, error_names
from .service import Daemon, Held, Publisher

log = logging.getLogger(__name__)

BUS_NAME, INTERFACE, OBJECT_PATH, ERROR_PREFIX = D.BUS_NAME, D.INTERFACE, D.OBJECT_PATH, D.ERROR_PREFIX
ACTION_FIX = "org.kmodguard.fix"
ACTION_RELOAD = "org.kmodguard.reload"
POLKIT = ("org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
          "org.freedesktop.PolicyKit1.Authority")
POLKIT_TIMEOUT = 120.0  # an authentication dialog may take a person a while
ALLOW_USER_INTERACTION = 1

# Bounds on what any local user may send and what the daemon sends back: a reply larger than the
# bus's message limit (32 MiB for dbus-daemon) makes the bus drop the daemon's connection.
MAX_ITEMS = 4096  # modaliases or device ids per Explain, Plan or Fix call
MAX_STRING = 4096  # bytes per string (the kernel never writes a longer modalias)
MAX_OPTIONS = 64  # keys in an a{sv} of options
MAX_REPLY = 8 * 1024 * 1024  # bytes of JSON per reply, well under the bus limit
MAX_MESSAGE = 1024  # characters of an error message sent back (it may quote the caller's input)
QUOTE = 64  # characters of a caller's string quoted in an error message

# The method call being served: dbus-next hands a method its arguments only, so a message
# handler that runs just before the dispatch records the call (asyncio tasks copy the context).
_CALL: contextvars.ContextVar = contextvars.ContextVar("kmodguard_dbus_call")


def _remember_call(message) -> None:
    if message.message_type == D.MessageType.METHOD_CALL and message.interface == INTERFACE:
        _CALL.set(message)
    return None  # not handled: dbus-next dispatches it to the interface


def _quote(text: str) -> str:
    """A caller's string as an error message quotes it: bounded, control characters escaped."""
    shown = text[:QUOTE].encode("unicode_escape").decode("ascii")
    return repr(shown) + (f"... ({len(text.encode('utf-8', 'replace'))} bytes)" if len(text) > QUOTE else "")


def _bounded_message(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "... (message truncated)"


def _strings(values, what: str) -> list[str]:
    """The caller's list of strings, refused (InvalidInput) beyond MAX_ITEMS or MAX_STRING bytes."""
    values = list(values)
    if len(values) > MAX_ITEMS:
        raise InvalidInput(f"{len(values)} {what} in one call: at most {MAX_ITEMS}")
    for i, value in enumerate(values):
        size = len(value.encode("utf-8", "replace"))
        if size > MAX_STRING:
            raise InvalidInput(f"{what} {i + 1} ({_quote(value)}) is {size} bytes: at most {MAX_STRING} "
                               f"bytes per string (the kernel never writes more than {MAX_STRING})")
    return values


def _reply(document) -> str:
    text = json.dumps(document)
    if len(text) > MAX_REPLY:
        raise KmodguardError(f"the reply would be {len(text)} bytes: at most {MAX_REPLY}; ask about fewer devices")
    return text


def _funnel(fn):
    """Errors to named D-Bus errors; no traceback ever reaches a caller."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except D.DBusError:
            raise
        except KmodguardError as exc:
            raise D.DBusError(ERROR_PREFIX + exc.name, _bounded_message(str(exc))) from None
        except Exception:
            log.exception("D-Bus method %s failed", fn.__name__)
            raise D.DBusError(ERROR_PREFIX + "Failed",
                              f"kmodguard failed inside {fn.__name__}; the journal of kmodguard.service says why") from None

    return wrapper


def _options(options: dict) -> dict:
    """a{sv} to plain values; the configuration schema validates them (config.with_overrides)."""
    if len(options) > MAX_OPTIONS:
        raise InvalidInput(f"{len(options)} options in one call: at most {MAX_OPTIONS}")
    out = {}
    for key, value in options.items():
        _strings([key], "option name")
        plain = value.value
        if isinstance(plain, str):
            _strings([plain], f"option {_quote(key)}")
        elif not isinstance(plain, (bool, int, float)):
            raise InvalidInput(f"option {_quote(key)} must be a string, a number or a boolean")
        out[key] = plain
    return out


class DaemonInterface(D.ServiceInterface):
    def __init__(self, daemon: Daemon, bus):
        super().__init__(INTERFACE)
        self.daemon = daemon
        self.bus = bus

    # --- authorization ---------------------------------------------------------------------------

    async def _call(self, destination, path, interface, member, signature="", body=(), timeout=25.0):
        reply = await asyncio.wait_for(self.bus.call(D.Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=list(body))), timeout)
        if reply.message_type == D.MessageType.ERROR:
            raise D.DBusError(reply.error_name, (reply.body or [""])[0])
        return reply.body

    async def authorize(self, action: str) -> str:
        """Root passes; others ask polkit. Returns who the caller is (for the record). A refusal is
        one line in the log (method, caller, why), never a traceback: any local user can call."""
        message = _CALL.get(None)
        caller = {"uid": None}
        try:
            return await self._decide(action, message, caller)
        except NotAuthorized as exc:
            log.warning("refused %s from %s (uid %s): %s", message.member if message else "a call",
                        message.sender if message else "an unknown sender", caller["uid"], exc.message)
            raise

    async def _decide(self, action: str, message, caller: dict) -> str:
        if message is None:
            raise NotAuthorized("cannot tell who is calling")
        sender = message.sender
        (uid,) = await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                  "GetConnectionUnixUser", "s", [sender])
        caller["uid"] = uid
        if uid == 0:
            return "root"
        interactive = bool(message.flags & D.MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        subject = ["system-bus-name", {"name": D.Variant("s", sender)}]
        try:
            ((allowed, _challenge, _details),) = await self._call(
                *POLKIT, "CheckAuthorization", "(sa{sv})sa{ss}us",
                [subject, action, {}, ALLOW_USER_INTERACTION if interactive else 0, ""], timeout=POLKIT_TIMEOUT)
        except D.DBusError as exc:
            if exc.type in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"):
                raise NotAuthorized(f"only root may do this here: polkit is not running (action {action})") from None
            raise NotAuthorized(f"polkit could not decide on {action}: {exc.text}") from None
        except asyncio.TimeoutError:
            raise NotAuthorized(f"polkit did not answer within {POLKIT_TIMEOUT:.0f} s (action {action})") from None
        if not allowed:
            raise NotAuthorized(f"uid {uid} is not allowed to do this (polkit action {action})",
                                hint="ask an administrator, or run the command with sudo")
        return f"uid {uid}"

    # --- methods -------------------------------------------------------------------------------------

    @D.method()
    @_funnel
    async def GetStatus(self) -> 's':
        return _reply(self.daemon.status_document())

    @D.method()
    @_funnel
    async def Explain(self, modaliases: 'as') -> 's':
        return _reply(self.daemon.explain_document(_strings(modaliases, "modaliases")))

    @D.method()
    @_funnel
    async def Plan(self, devices: 'as', options: 'a{sv}') -> 's':
        return _reply(self.daemon.plan_document(_strings(devices, "device ids"), _options(options)))

    @D.method()
    @_funnel
    async def Fix(self, devices: 'as', options: 'a{sv}') -> 'is':
        devices = _strings(devices, "device ids")
        overrides = _options(options)
        who = await self.authorize(ACTION_FIX)
        ids = self.daemon.needing_ids(devices)
        record = await self.daemon.fix(ids, who, overrides)
        error = record.get("error")
        if error:  # the fix ran and ended in an error: its own name (PackageUnavailable, Busy, ...)
            name = error.get("name") if error.get("name") in error_names() else "Failed"
            text = error.get("message", "") + (f"\n{error['hint']}" if error.get("hint") else "")
            raise D.DBusError(ERROR_PREFIX + name, _bounded_message(text))
        return [int(record.get("exit_code") or 0), _reply(record.get("report") or {})]

    @D.method()
    @_funnel
    async def Reload(self):
        await self.authorize(ACTION_RELOAD)
        self.daemon.reload()

    # --- signals ---------------------------------------------------------------------------------

    @D.signal()
    def DeviceNeedsDriver(self, held) -> 'ssssss':
        c = held.candidate
        return [held.device.id, held.device.modalias, held.verdict.verdict, c.package if c else "",
                held.module or "", held.verdict.reason]

    @D.signal()
    def DeviceResolved(self, device_id, verdict) -> 'ss':
        return [device_id, verdict]

    @D.signal()
    def FixProgress(self, request_id, message) -> 'ss':
        return [request_id, message]

    @D.signal()
    def RemediationFinished(self, request_id, exit_code, record) -> 'sis':
        return [request_id, exit_code, json.dumps(record)]

    # --- properties ------------------------------------------------------------------------------

    @D.dbus_property(access=D.PropertyAccess.READ)
    def Mode(self) -> 's':
        return self.daemon.policy.mode

    @D.dbus_property(access=D.PropertyAccess.READ)
    def Since(self) -> 't':
        return int(self.daemon.since * 1_000_000)

    @D.dbus_property(access=D.PropertyAccess.READ)
    def NeedsDriver(self) -> 'as':
        return sorted(self.daemon.held)

    @D.dbus_property(access=D.PropertyAccess.READ)
    def FixRunning(self) -> 'b':
        return self.daemon.fix_running

    @D.dbus_property(access=D.PropertyAccess.READ)
    def LastResult(self) -> 's':
        return json.dumps(self.daemon.last_fix) if self.daemon.last_fix else ""


class BusPublisher(Publisher):
    """Turns the daemon's news into signals and PropertiesChanged."""

    def __init__(self, interface: DaemonInterface):
        self.interface = interface
        self._last = None

    def needs_driver(self, held: Held) -> None:
        self.interface.DeviceNeedsDriver(held)

    def resolved(self, device_id: str, verdict: str) -> None:
        self.interface.DeviceResolved(device_id, verdict)

    def fix_progress(self, request_id: str, message: str) -> None:
        self.interface.FixProgress(request_id, message)

    def fix_finished(self, request_id: str, exit_code: int, record: dict) -> None:
        self.interface.RemediationFinished(request_id, exit_code, record)

    def changed(self) -> None:
        d = self.interface.daemon
        now = {"Mode": d.policy.mode, "NeedsDriver": sorted(d.held), "FixRunning": d.fix_running,
               "LastResult": json.dumps(d.last_fix) if d.last_fix else ""}
        if self._last is not None:
            delta = {k: v for k, v in now.items() if self._last.get(k) != v}
            if delta:
                self.interface.emit_properties_changed(delta)
        self._last = now


async def serve(daemon: Daemon, address: str | None = None):
    """Export the interface and own the name; returns the bus connection (None when there is no bus)."""
    try:
        bus = await D.connect(address)
    except (OSError, D.AuthError, D.InvalidAddressError, ValueError) as exc:
        log.warning("no system bus (%s): running without D-Bus; 'kmodguard fix' then runs locally", exc)
        return None
    interface = DaemonInterface(daemon, bus)
    bus.add_message_handler(_remember_call)
    bus.export(OBJECT_PATH, interface)
    try:
        reply = await bus.request_name(BUS_NAME, D.NameFlag.DO_NOT_QUEUE)
    except D.DBusError as exc:
        log.warning("cannot own %s on the system bus (%s): running without D-Bus "
                    "(is the D-Bus policy file installed?)", BUS_NAME, exc.text)
        bus.disconnect()
        return None
    if reply != D.RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise KmodguardError(f"another process owns {BUS_NAME}: is a kmodguard daemon already running?")
    daemon.publisher = BusPublisher(interface)
    daemon.bus_name = BUS_NAME
    return bus


__all__ = ["serve", "DaemonInterface", "BUS_NAME", "OBJECT_PATH", "INTERFACE"]
