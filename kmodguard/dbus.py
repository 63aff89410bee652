"""The one place where kmodguard imports a D-Bus library.

kmodguard uses dbus-next (asyncio API). dbus-fast is its maintained fork with the same API: to
switch, change ``_LIB`` below and the dependency in pyproject.toml; nothing else in kmodguard
imports the library directly (tests check this).

Importing this module costs about 90 ms (it pulls in asyncio): import it lazily, only on the
paths that really talk to a bus (the daemon, the PackageKit backend), never from a command that
needs no bus.
"""

from __future__ import annotations

import importlib

_LIB = "dbus_next"  # "dbus_fast" for dbus-fast: the one line to change

_root = importlib.import_module(_LIB)
_aio = importlib.import_module(f"{_LIB}.aio")
_service = importlib.import_module(f"{_LIB}.service")
_constants = importlib.import_module(f"{_LIB}.constants")
_introspection = importlib.import_module(f"{_LIB}.introspection")

LIBRARY = _LIB

# kmodguard's own names on the bus (units/org.kmodguard.Daemon1.xml documents the interface)
BUS_NAME = INTERFACE = "org.kmodguard.Daemon1"
OBJECT_PATH = "/org/kmodguard/Daemon1"
ERROR_PREFIX = "org.kmodguard.Error."

# connections and messages
MessageBus = _aio.MessageBus  # asyncio flavour
Message = _root.Message
Variant = _root.Variant
BusType = _constants.BusType
MessageType = _constants.MessageType
MessageFlag = _constants.MessageFlag
NameFlag = _constants.NameFlag
RequestNameReply = _constants.RequestNameReply
PropertyAccess = _constants.PropertyAccess
ErrorType = _constants.ErrorType

# errors
DBusError = _root.DBusError
InvalidAddressError = _root.InvalidAddressError
AuthError = _root.AuthError

# serving an interface
ServiceInterface = _service.ServiceInterface
method = _service.method
signal = _service.signal
dbus_property = _service.dbus_property

# introspection data (client proxies built without a round trip)
IntrospectionNode = _introspection.Node


def parse_introspection(xml: str):
    """An introspection Node from XML (lets a client build a proxy without calling Introspect)."""
    return _introspection.Node.parse(xml)


class _WaitWhenFull:
    """The connection's socket as the library's writer sees it, with one fix: a send that would
    block (the kernel's send buffer is full, e.g. after a burst of 256 signals) counts as 0 bytes
    sent, so the writer waits until the socket is writable, as it does after a partial send.
    dbus-next 0.2.3 (and dbus-fast 5) instead drop the connection without closing it, leaving a
    service that owns its name and never answers again (altdesktop/python-dbus-next#153)."""

    def __init__(self, sock):
        self._sock = sock

    def send(self, data, *flags):
        try:
            return self._sock.send(data, *flags)
        except BlockingIOError:
            return 0

    def sendmsg(self, buffers, ancdata=(), *rest):
        if ancdata:  # file descriptors must go with the first byte: no retry trick for them
            return self._sock.sendmsg(buffers, ancdata, *rest)
        try:
            return self._sock.sendmsg(buffers, ancdata, *rest)
        except BlockingIOError:
            return 0

    def __getattr__(self, name):
        return getattr(self._sock, name)


async def connect(bus_address: str | None = None, *, system: bool = True):
    """Connect to a bus: the given address, else the system (or session) bus.

    With no address the library reads DBUS_SYSTEM_BUS_ADDRESS (DBUS_SESSION_BUS_ADDRESS for the
    session bus) and falls back to the well-known system socket.
    """
    bus_type = BusType.SYSTEM if system else BusType.SESSION
    bus = await MessageBus(bus_address=bus_address, bus_type=bus_type).connect()
    writer = getattr(bus, "_writer", None)
    if writer is not None and not isinstance(writer.sock, _WaitWhenFull):
        writer.sock = _WaitWhenFull(writer.sock)
    return bus


def quiet_answered_errors(loop) -> None:
    """Install a loop exception handler that drops the DBusError a method handler raised once the
    library has answered the caller with it, and passes everything else on.

    dbus-next's asyncio method dispatch sends a DBusError raised by a method as the error reply,
    then lets the same exception escape from its reply callback (SendReply.__exit__ drops the
    "handled" answer of _exit), so the loop's default handler logs "Exception in callback" with a
    whole traceback for every refused or invalid call: a local user could fill the journal."""
    previous = loop.get_exception_handler()

    def handler(loop, context):
        callback = getattr(context.get("handle"), "_callback", None)
        if isinstance(context.get("exception"), DBusError) and \
                (getattr(callback, "__module__", None) or "").startswith(_LIB + "."):
            return  # already the caller's error reply
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


__all__ = [
    "LIBRARY", "BUS_NAME", "INTERFACE", "OBJECT_PATH", "ERROR_PREFIX", "MessageBus", "Message", "Variant", "BusType", "MessageType", "MessageFlag", "NameFlag",
    "RequestNameReply", "PropertyAccess", "ErrorType", "DBusError", "InvalidAddressError", "AuthError",
    "ServiceInterface", "method", "signal", "dbus_property", "IntrospectionNode", "parse_introspection",
    "connect", "quiet_answered_errors",
]
