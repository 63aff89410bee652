"""PackageKit (org.freedesktop.PackageKit on the system bus), for hosts where packagekitd owns the
package database.

Flow, following PackageKit's D-Bus API (org.freedesktop.PackageKit.Transaction.xml, PackageKit 1.x):

1. ``CreateTransaction()`` on /org/freedesktop/PackageKit gives a transaction object. A transaction
   runs ONE method; its results come back as signals (``Package``, ``Details``, ``ErrorCode``,
   ``ItemProgress``, property changes) until ``Finished(exit, runtime)``.
2. Each request ('kernel-modules-uname-r = 6.1.0-56.fc42.x86_64', or a bare package name) is turned
   into a package_id ('name;version;arch;data') with ``WhatProvides(filter, [request])``; a bare
   name that nothing provides is tried with ``Resolve`` too. One transaction per request, because
   ``Package`` signals do not say which value they answer.
3. ``GetDetails(package_ids)`` gives sizes when the backend knows them (``query`` only).
4. A new transaction runs ``InstallPackages(ONLY_TRUSTED, package_ids)``: signature checks stay on;
   an unsigned package fails the transaction and kmodguard never retries without the flag.
5. ``refresh`` runs ``RefreshCache(false)`` (apt: `apt-get update`), once, when a request is in no
   repository the daemon's cache knows: a cloud image's lists are often empty or stale.

Synchronous on the outside (the engine is synchronous): every public method runs its own asyncio
loop and its own bus connection, and bounds every wait with the caller's timeout. On timeout the
running transaction is cancelled with ``Cancel()``. Requests come from the caller (the index and the
allow-list), never from device data; they are checked for shape before they go on the bus.

PackageKit has no transaction comment: the ``comment`` is logged with the transaction path and
heads the returned log; the package manager's history names PackageKit as the tool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from .. import dbus as _dbus
from ..errors import Busy, KmodguardError, NotAuthorized, PackageUnavailable, SignatureRefused
from . import InstallResult, Offer, Progress
from ._rpmdb import split_request
from .packagekit_api import (
    ERROR_BAD_GPG_SIGNATURE, ERROR_CANNOT_GET_LOCK, ERROR_CANNOT_INSTALL_REPO_UNSIGNED, ERROR_GPG_FAILURE,
    ERROR_MISSING_GPG_SIGNATURE, ERROR_NAMES, ERROR_NOT_AUTHORIZED, ERROR_NOT_SUPPORTED,
    ERROR_PACKAGE_NOT_FOUND, ERROR_PROVIDE_TYPE_NOT_SUPPORTED, ERROR_TRANSACTION_CANCELLED, EXIT_CANCELLED,
    EXIT_CANCELLED_PRIORITY, EXIT_KEY_REQUIRED, EXIT_KILLED, EXIT_NAMES, EXIT_NEED_UNTRUSTED, EXIT_SUCCESS,
    FILTER_ARCH, FILTER_INSTALLED, FILTER_NEWEST, INFO_INSTALLED, INFO_VERB, PK_IFACE, PK_NAME, PK_PATH,
    PkPackage, TRANSACTION_FLAG_ONLY_TRUSTED, TX_IFACE, Transaction, WAITING, introspection,
)

log = logging.getLogger(__name__)

UNTRUSTED_ERRORS = (ERROR_GPG_FAILURE, ERROR_BAD_GPG_SIGNATURE, ERROR_MISSING_GPG_SIGNATURE,
                    ERROR_CANNOT_INSTALL_REPO_UNSIGNED)
# PackageKit's apt backend reports a refused Release signature as cannot-fetch-sources, with apt's text
APT_SIGNATURE_TEXTS = ("GPG error", "is not signed", "NO_PUBKEY", "signatures were invalid")
DENIED_DBUS_ERRORS = ("org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.PackageKit.Denied",
                      "org.freedesktop.PackageKit.Transaction.Denied",
                      "org.freedesktop.PackageKit.Transaction.RefusedByPolicy",
                      "org.freedesktop.PackageKit.Transaction.NotAuthorized")
ABSENT_DBUS_ERRORS = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
                      "org.freedesktop.DBus.Error.Spawn.ServiceNotFound", "org.freedesktop.DBus.Error.NoReply")

RESOLVE_FILTER = FILTER_NEWEST | FILTER_ARCH
CANCEL_GRACE = 10.0  # seconds to wait for a cancelled transaction to say Finished (apt's lock loop: ~8 s)

UNAVAILABLE_HINT = ("the package for the running kernel has left the repositories (this happens after newer "
                    "kernels are published); either install it from a local package file, or update the kernel, "
                    "reboot into it, and run kmodguard again")
UNTRUSTED_HINT = ("kmodguard asks PackageKit for trusted (signed) packages only and never turns that off: "
                  "import the repository's signing key or fix the repository, then run kmodguard again")

class PackageKitBackend:
    """The Backend protocol (kmodguard.backends) over PackageKit's D-Bus API.

    bus_address: a D-Bus address; None means the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured).
    """

    name = "packagekit"

    def __init__(self, bus_address: str | None = None, *, call_timeout: float = 300.0):
        self.bus_address = bus_address
        self.call_timeout = call_timeout

    # --- the protocol ------------------------------------------------------------------------

    def is_installed(self, request: str) -> bool:
        split_request(request)
        return _run_sync(lambda: self._is_installed(request, time.monotonic() + self.call_timeout))

    def query(self, requests: list[str], timeout: float | None = None) -> list[Offer]:
        for r in requests:
            split_request(r)
        deadline = time.monotonic() + (self.call_timeout if timeout is None else timeout)
        return _run_sync(lambda: self._query(list(requests), deadline))

    def install(self, requests: list[str], *, comment: str, timeout: float, lock_wait: float,
                progress: Progress) -> InstallResult:
        for r in requests:
            split_request(r)
        if not requests:
            return InstallResult((), "nothing to install")
        deadline = time.monotonic() + timeout
        return _run_sync(lambda: self._install(list(requests), comment, deadline, timeout, lock_wait,
                                               progress or (lambda _msg: None)))

    def refresh(self, timeout: float | None = None) -> None:
        """RefreshCache(force=false): packagekitd fetches the repositories' metadata. SignatureRefused
        when a repository's signature is refused; KmodguardError when one is unreachable."""
        deadline = time.monotonic() + (self.call_timeout if timeout is None else timeout)
        _run_sync(lambda: self._refresh(deadline))

    # --- asyncio side ------------------------------------------------------------------------

    async def _is_installed(self, request: str, deadline: float) -> bool:
        async with _Session(self.bus_address, deadline) as session:
            found = await session.resolve(request, FILTER_INSTALLED)
            return any(p.info == INFO_INSTALLED for p in found)

    async def _query(self, requests: list[str], deadline: float) -> list[Offer]:
        async with _Session(self.bus_address, deadline) as session:
            chosen: dict[str, PkPackage | None] = {}
            for request in requests:
                found = await session.resolve(request, RESOLVE_FILTER)
                installed = [p for p in found if p.info == INFO_INSTALLED]
                chosen[request] = (installed or found or [None])[0]
            ids = sorted({p.package_id for p in chosen.values() if p is not None})
            sizes = await session.details(ids) if ids else {}
            offers = []
            for request in requests:
                pkg = chosen[request]
                if pkg is None:
                    offers.append(Offer(request, False))
                    continue
                dl, inst = sizes.get(pkg.package_id, (None, None))
                offers.append(Offer(request, True, pkg.nevra, dl, inst))
            return offers

    async def _refresh(self, deadline: float) -> None:
        async with _Session(self.bus_address, deadline) as session:
            tx = await session.transaction()
            await session.call(tx, "set_hints", ["interactive=false", "background=false"], optional=True)
            await session.run(tx, "refresh_cache", False, what="refreshing the repository metadata")

    async def _install(self, requests: list[str], comment: str, deadline: float, timeout: float,
                       lock_wait: float, progress: Progress) -> InstallResult:
        async with _Session(self.bus_address, deadline, timeout) as session:
            to_install: dict[str, PkPackage] = {}
            satisfied, missing = [], []
            for request in requests:
                found = await session.resolve(request, RESOLVE_FILTER)
                if any(p.info == INFO_INSTALLED for p in found):
                    satisfied.append(request)
                elif found:
                    if len({p.package_id for p in found}) > 1:
                        log.info("PackageKit offers several packages for %r: %s; taking the first", request,
                                 ", ".join(p.package_id for p in found))
                    to_install[request] = found[0]
                else:
                    missing.append(request)
            if missing:
                raise PackageUnavailable(f"no repository has {', '.join(missing)} (asked PackageKit)",
                                         hint=UNAVAILABLE_HINT)
            lines = [f"# {comment}"] + [f"already installed: {r}" for r in satisfied]
            if not to_install:
                return InstallResult(tuple(requests), "\n".join(lines))
            ids = list(dict.fromkeys(p.package_id for p in to_install.values()))
            progress(f"PackageKit: installing {', '.join(p.nevra for p in to_install.values())}")
            tx = await session.transaction(progress)
            log.info("PackageKit transaction %s (%s): InstallPackages(only-trusted, %s)", tx.path, comment, ids)
            await session.call(tx, "set_hints", ["interactive=false", "background=false"], optional=True)
            await session.run(tx, "install_packages", TRANSACTION_FLAG_ONLY_TRUSTED, ids,
                              what="install", lock_wait=lock_wait)
            lines += [f"{INFO_VERB.get(p.info, 'package')}: {p.package_id}" for p in tx.packages]
            lines.append(f"PackageKit transaction {tx.path} finished: {EXIT_NAMES.get(tx.exit, tx.exit)} "
                         f"({tx.runtime} ms)")
            output = "\n".join(lines)
            log.info("PackageKit output:\n%s", output)
            return InstallResult(tuple(requests), output, tx.path)


class _Session:
    """A bus connection and a deadline shared by every transaction of one public call."""

    def __init__(self, bus_address: str | None, deadline: float, timeout: float | None = None):
        self.bus_address = bus_address
        self.deadline = deadline
        self.timeout = timeout if timeout is not None else max(0.0, deadline - time.monotonic())
        self.bus = None
        self.pk = None

    async def __aenter__(self) -> "_Session":
        try:
            self.bus = await asyncio.wait_for(_dbus.connect(self.bus_address), self._remaining("connecting"))
        except asyncio.TimeoutError:
            raise self._timeout_error("connecting to the system bus") from None
        except (OSError, _dbus.InvalidAddressError, _dbus.AuthError, ValueError) as e:
            where = self.bus_address or "the system bus"
            raise KmodguardError(f"cannot connect to {where}: {e}",
                                 hint="is dbus running? PackageKit needs the system bus") from None
        self.pk = self.bus.get_proxy_object(PK_NAME, PK_PATH, introspection()).get_interface(PK_IFACE)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.bus is not None:
            self.bus.disconnect()

    # --- time -----------------------------------------------------------------------------------

    def _remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._timeout_error(what)
        return left

    def _timeout_error(self, what: str, cancelled: str = "") -> KmodguardError:
        return KmodguardError(f"PackageKit did not finish within {self.timeout:.0f} s and was stopped "
                              f"({what}{cancelled})",
                              hint="PackageKit's own log (journalctl -u packagekit) tells what it was doing; "
                                   "raise timeouts.package_manager in /etc/kmodguard if the repositories are slow")

    # --- calls ----------------------------------------------------------------------------------

    async def call(self, target, member: str, *args, optional: bool = False):
        """A method call bounded by the deadline; D-Bus errors become kmodguard errors."""
        iface = target.iface if isinstance(target, Transaction) else target
        try:
            return await asyncio.wait_for(getattr(iface, f"call_{member}")(*args), self._remaining(member))
        except asyncio.TimeoutError:
            raise self._timeout_error(f"answering {member}") from None
        except _dbus.DBusError as e:
            if optional:
                log.info("PackageKit: %s refused (%s: %s); going on", member, e.type, e.text)
                return None
            raise _dbus_error(member, e) from None

    async def transaction(self, progress: Progress | None = None) -> Transaction:
        path = await self.call(self.pk, "create_transaction")
        return Transaction(self.bus, path, progress)

    async def run(self, tx: Transaction, member: str, *args, what: str, lock_wait: float | None = None) -> None:
        """Start the transaction's method and wait for Finished; raise on any outcome but success."""
        try:
            await self.call(tx, member, *args)
            if lock_wait is not None and tx.status is None:
                try:
                    value = await asyncio.wait_for(tx.props.call_get(TX_IFACE, "Status"), self._remaining(what))
                    if tx.status is None:
                        tx.status = value.value
                except _dbus.DBusError:
                    pass
            lock_deadline = None if lock_wait is None else time.monotonic() + lock_wait
            while not tx.finished.done():
                now = time.monotonic()
                if now >= self.deadline:
                    await self._cancel(tx)
                    raise self._timeout_error(what, "; the transaction was cancelled")
                if lock_deadline is not None and tx.status in WAITING:
                    if now >= lock_deadline:
                        await self._cancel(tx)
                        raise Busy(f"PackageKit waited {lock_wait:.0f} s for the package manager lock; "
                                   "the transaction was cancelled",
                                   hint="another package manager is running (cloud-init, dnf-automatic?); "
                                        "run 'kmodguard fix' again when it is done")
                elif lock_deadline is not None:
                    lock_deadline = now + lock_wait  # only an uninterrupted wait counts
                await asyncio.wait([tx.finished], timeout=min(0.1, self.deadline - now))
        except asyncio.CancelledError:
            if not tx.finished.done():
                await self._cancel(tx, grace=1.0)
            raise
        finally:
            tx.close()
        _check(tx, what)

    async def _cancel(self, tx: Transaction, grace: float = CANCEL_GRACE) -> None:
        log.warning("PackageKit: cancelling transaction %s", tx.path)
        try:
            await asyncio.wait_for(tx.iface.call_cancel(), grace)
            await asyncio.wait_for(asyncio.shield(tx.finished), grace)
        except (asyncio.TimeoutError, _dbus.DBusError) as e:
            log.warning("PackageKit: transaction %s did not confirm the cancel within %.0f s (%s); packagekitd "
                        "ends it by itself ('pkcon get-transactions' lists it until then)", tx.path, grace,
                        getattr(e, "text", None) or "no answer")

    # --- the steps ------------------------------------------------------------------------------

    async def resolve(self, request: str, filter_: int) -> list[PkPackage]:
        """Packages that provide the request (WhatProvides; Resolve too for a bare name), deduplicated."""
        name, version = split_request(request)
        found: list[PkPackage] = []
        tx = await self.transaction()
        try:
            await self.run(tx, "what_provides", filter_, [request], what=f"looking up {request!r}")
            found = tx.packages
        except KmodguardError as e:
            code = tx.errors[0][0] if tx.errors else None
            if code == ERROR_PACKAGE_NOT_FOUND:
                pass  # nothing provides it: the caller decides what that means
            elif version is None and code in (ERROR_NOT_SUPPORTED, ERROR_PROVIDE_TYPE_NOT_SUPPORTED):
                log.info("PackageKit WhatProvides(%r): %s; trying Resolve", request, e.message)
            else:
                raise
        if not found and version is None:
            tx = await self.transaction()
            try:
                await self.run(tx, "resolve", filter_, [name], what=f"resolving {name!r}")
            except PackageUnavailable:
                return []
            found = [p for p in tx.packages if p.name == name]
        seen: dict[str, PkPackage] = {}
        for p in found:
            if p.info == INFO_INSTALLED or p.package_id not in seen:
                seen[p.package_id] = p
        return list(seen.values())

    async def details(self, package_ids: list[str]) -> dict[str, tuple[int | None, int | None]]:
        """package_id -> (download size, installed size), as far as the backend tells (else empty)."""
        tx = await self.transaction()
        try:
            await self.run(tx, "get_details", package_ids, what="getting package details")
        except KmodguardError as e:
            if tx.exit is None or isinstance(e, (Busy, NotAuthorized)):
                raise  # a timeout or a refusal, not "no details"
            log.info("PackageKit GetDetails failed (%s); sizes unknown", e.message)
            return {}
        sizes = {}
        for d in tx.details:
            pid = d.get("package-id")
            if isinstance(pid, str):
                sizes[pid] = (_size(d.get("download-size")), _size(d.get("size")))
        return sizes


def _size(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _check(tx: Transaction, what: str) -> None:
    """Success, or the error PackageKit reported, as a kmodguard error carrying PackageKit's message."""
    if tx.exit == EXIT_SUCCESS:
        return
    code, details = tx.errors[0] if tx.errors else (None, "")
    exit_name = EXIT_NAMES.get(tx.exit, str(tx.exit))
    said = f"{details} ({ERROR_NAMES.get(code, code)})" if code is not None else f"exit {exit_name}"
    message = f"PackageKit {what} failed: {said}"
    if code == ERROR_PACKAGE_NOT_FOUND:
        raise PackageUnavailable(message, hint=UNAVAILABLE_HINT)
    if code == ERROR_CANNOT_GET_LOCK:
        raise Busy(message, hint="another package manager holds the lock; run 'kmodguard fix' again later")
    if code == ERROR_NOT_AUTHORIZED:
        raise NotAuthorized(message, hint="PackageKit's polkit rules refused this caller")
    refused = _signature_lines(tx.errors)
    if refused:
        raise SignatureRefused(f"PackageKit {what} failed: a repository's signature was refused: {refused}",
                               hint=UNTRUSTED_HINT)
    if code in UNTRUSTED_ERRORS or tx.exit in (EXIT_NEED_UNTRUSTED, EXIT_KEY_REQUIRED):
        raise SignatureRefused(message, hint=UNTRUSTED_HINT)
    if tx.exit in (EXIT_CANCELLED, EXIT_CANCELLED_PRIORITY, EXIT_KILLED) or code == ERROR_TRANSACTION_CANCELLED:
        raise KmodguardError(f"PackageKit {what} was cancelled from outside kmodguard: {said}",
                             hint="run 'kmodguard fix' again")
    raise KmodguardError(message, hint="PackageKit's log (journalctl -u packagekit) has the details")


def _signature_lines(errors: list[tuple[int, str]]) -> str:
    """apt's own lines about a refused signature, from PackageKit's error details (its apt
    backend passes apt's whole output, warnings included)."""
    lines = [line[3:] if line[:3] in ("E: ", "W: ") else line
             for _code, details in errors for line in details.splitlines()]
    found = [line for line in dict.fromkeys(lines) if any(text in line for text in APT_SIGNATURE_TEXTS)]
    return "; ".join(found[:2])


def _dbus_error(member: str, e) -> KmodguardError:
    if e.type in DENIED_DBUS_ERRORS:
        return NotAuthorized(f"PackageKit refused {member}: {e.text}",
                             hint="run kmodguard as root, or allow it in PackageKit's polkit rules")
    if e.type in ABSENT_DBUS_ERRORS:
        return KmodguardError(f"PackageKit is not available on the system bus: {e.text}",
                              hint="install and enable PackageKit, or set 'backend' to dnf in /etc/kmodguard")
    return KmodguardError(f"PackageKit {member} failed: {e.text} ({e.type})")


def _run_sync(make_coro):
    """Run a coroutine to completion from synchronous code, even when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = asyncio.run(make_coro())
        except BaseException as e:  # handed back to the caller's thread below
            outcome["error"] = e

    worker = threading.Thread(target=target, name="kmodguard-packagekit")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


__all__ = ["PackageKitBackend", "PkPackage", "TRANSACTION_FLAG_ONLY_TRUSTED", "FILTER_INSTALLED"]
