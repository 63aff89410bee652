"""FakePackageKitForTests: a TEST STAND-IN for packagekitd, served on a private dbus-daemon.

The real packagekitd runs in the tests with Debian's apt backend (packagekitd.py,
test_contract_packagekit.py). What it cannot do here, this stand-in does: answer as Fedora's
PackageKit (dnf backend) would, with exact-version provides ('kernel-modules-uname-r = KVER') in
WhatProvides and sizes in GetDetails, and fail on demand (a scriptlet error, an install that never
ends, not-found as an error). It serves the slice of PackageKit's D-Bus API (PackageKit 1.x: org.freedesktop.PackageKit and
org.freedesktop.PackageKit.Transaction) that kmodguard's PackageKit backend uses, over a real bus
through the real D-Bus library. Everything else in the tests is real: the dbus-daemon, the library,
kmodguard's backend.

Behaviour, as packagekitd documents it:
- CreateTransaction() returns a new transaction object; each transaction runs one method; methods
  return at once and results arrive as signals (Package, Details, ErrorCode, ItemProgress, property
  changes of Status and Percentage) ending with Finished(exit, runtime_ms).
- filters and transaction flags are bitfields (1 << enum value); ONLY_TRUSTED is 1 << 1.
- The catalogue is in memory (FakePackage). Packages can be untrusted (refused with
  ErrorCode(missing-gpg-signature) when ONLY_TRUSTED is set; installed otherwise, where real
  PackageKit would first ask polkit), behave "fail" (the transaction fails with a scriptlet error)
  or "hang" (the install never finishes until Cancel()).
- not_found_as_error=True answers a fruitless WhatProvides/Resolve with ErrorCode(package-not-found),
  as some backends do, instead of an empty success.
- lock_held=True keeps install transactions in status waiting-for-lock until released or cancelled.
- Every call is recorded in `calls`; cancelled transactions in `cancelled`.

Not modelled: polkit, dependencies, downloads, the transaction queue, the Offline interface.
"""

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass

from kmodguard.dbus import (DBusError, MessageBus, PropertyAccess, RequestNameReply, ServiceInterface, Variant,
                            dbus_property, method, signal)

BUS_NAME = "org.freedesktop.PackageKit"
PK_PATH = "/org/freedesktop/PackageKit"

# pk-enum.h
FILTER_INSTALLED = 1 << 2
FILTER_NOT_INSTALLED = 1 << 3
FLAG_ONLY_TRUSTED = 1 << 1
INFO_INSTALLED, INFO_AVAILABLE, INFO_DOWNLOADING, INFO_INSTALLING, INFO_FINISHED = 1, 2, 10, 12, 18
EXIT_SUCCESS, EXIT_FAILED, EXIT_CANCELLED = 1, 2, 3
STATUS_WAIT, STATUS_SETUP, STATUS_QUERY, STATUS_INFO, STATUS_DOWNLOAD, STATUS_INSTALL = 1, 2, 4, 5, 8, 9
STATUS_FINISHED, STATUS_CANCEL, STATUS_WAITING_FOR_LOCK = 18, 19, 30
ERROR_PACKAGE_NOT_FOUND = 8
ERROR_PACKAGE_ALREADY_INSTALLED = 9
ERROR_TRANSACTION_CANCELLED = 17
ERROR_MISSING_GPG_SIGNATURE = 31
ERROR_PACKAGE_FAILED_TO_INSTALL = 58
ROLE_RESOLVE, ROLE_GET_DETAILS, ROLE_INSTALL_PACKAGES, ROLE_WHAT_PROVIDES = 20, 4, 11, 27

FAIL_MESSAGE = "Error in POSTTRANS scriptlet in rpm package {nevra}: exit status 1"


@dataclass
class FakePackage:
    package_id: str  # 'name;version;arch;repo'
    provides: tuple[str, ...] = ()
    summary: str = ""
    size: int = 0  # installed size, bytes
    download_size: int = 0
    installed: bool = False
    trusted: bool = True
    behaviour: str = "ok"  # "ok" | "fail" | "hang"

    @property
    def name(self) -> str:
        return self.package_id.split(";")[0]

    @property
    def nevra(self) -> str:
        name, version, arch, _repo = self.package_id.split(";")
        return f"{name}-{version}.{arch}"


class _Daemon(ServiceInterface):
    def __init__(self, fake: "FakePackageKitForTests"):
        super().__init__(BUS_NAME)
        self.fake = fake

    @method()
    def CreateTransaction(self) -> "o":
        return self.fake._new_transaction()

    @dbus_property(access=PropertyAccess.READ)
    def VersionMajor(self) -> "u":
        return 1

    @dbus_property(access=PropertyAccess.READ)
    def VersionMinor(self) -> "u":
        return 2

    @dbus_property(access=PropertyAccess.READ)
    def BackendName(self) -> "s":
        return "kmodguard-test-stand-in"


class _Transaction(ServiceInterface):
    def __init__(self, fake: "FakePackageKitForTests", path: str):
        super().__init__("org.freedesktop.PackageKit.Transaction")
        self.fake = fake
        self.path = path
        self._role = 0
        self._status = STATUS_WAIT
        self._percentage = 101
        self._started = False
        self._finished = False
        self._cancel = asyncio.Event()
        self._start = time.monotonic()

    # --- properties ---------------------------------------------------------------------------
    @dbus_property(access=PropertyAccess.READ)
    def Role(self) -> "u":
        return self._role

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "u":
        return self._status

    @dbus_property(access=PropertyAccess.READ)
    def Percentage(self) -> "u":
        return self._percentage

    @dbus_property(access=PropertyAccess.READ)
    def AllowCancel(self) -> "b":
        return not self._finished

    # --- signals ------------------------------------------------------------------------------
    @signal()
    def Package(self, info, package_id, summary) -> "uss":
        return [info, package_id, summary]

    @signal()
    def Details(self, data) -> "a{sv}":
        return data

    @signal()
    def ErrorCode(self, code, details) -> "us":
        return [code, details]

    @signal()
    def ItemProgress(self, item, status, percentage) -> "suu":
        return [item, status, percentage]

    @signal()
    def Finished(self, exit_, runtime) -> "uu":
        return [exit_, runtime]

    @signal()
    def Destroy(self):
        return None

    # --- methods ------------------------------------------------------------------------------
    @method()
    def SetHints(self, hints: "as"):
        self.fake._record(self.path, "SetHints", list(hints))

    @method()
    def Cancel(self):
        self.fake._record(self.path, "Cancel")
        if self._finished:
            raise DBusError("org.freedesktop.PackageKit.Transaction.CannotCancel", "the transaction has finished")
        self.fake.cancelled.append(self.path)
        self._cancel.set()

    @method()
    def WhatProvides(self, filter_: "t", values: "as"):
        self._begin("WhatProvides", ROLE_WHAT_PROVIDES, filter_, list(values))
        self._spawn(self._search(filter_, lambda p: any(v in p.provides or v == p.name for v in values)))

    @method()
    def Resolve(self, filter_: "t", packages: "as"):
        self._begin("Resolve", ROLE_RESOLVE, filter_, list(packages))
        self._spawn(self._search(filter_, lambda p: p.name in packages))

    @method()
    def GetDetails(self, package_ids: "as"):
        self._begin("GetDetails", ROLE_GET_DETAILS, list(package_ids))
        self._spawn(self._details(list(package_ids)))

    @method()
    def InstallPackages(self, transaction_flags: "t", package_ids: "as"):
        self._begin("InstallPackages", ROLE_INSTALL_PACKAGES, transaction_flags, list(package_ids))
        self.fake.install_flags.append(transaction_flags)
        self._spawn(self._install(transaction_flags, list(package_ids)))

    # --- the work, after the method has returned ----------------------------------------------
    def _begin(self, member, role, *args):
        self.fake._record(self.path, member, *args)
        if self._started:
            raise DBusError("org.freedesktop.PackageKit.Transaction.TransactionInUse",
                            "a transaction runs one method")
        self._started = True
        self._role = role

    def _spawn(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self.fake._tasks.add(task)
        task.add_done_callback(self.fake._tasks.discard)

    def _set(self, status=None, percentage=None):
        changed = {}
        if status is not None and status != self._status:
            self._status = changed["Status"] = status
        if percentage is not None and percentage != self._percentage:
            self._percentage = changed["Percentage"] = percentage
        if changed:
            self.emit_properties_changed(changed)

    def _finish(self, exit_, error=None):
        if error is not None:
            self.ErrorCode(*error)
        self._set(STATUS_FINISHED, 100 if exit_ == EXIT_SUCCESS else None)
        self._finished = True
        self.Finished(exit_, int((time.monotonic() - self._start) * 1000))
        self.Destroy()

    async def _search(self, filter_, matches):
        await asyncio.sleep(0)
        self._set(STATUS_QUERY, 0)
        found = False
        for p in self.fake.catalogue:
            if filter_ & FILTER_INSTALLED and not p.installed:
                continue
            if filter_ & FILTER_NOT_INSTALLED and p.installed:
                continue
            if matches(p):
                self.Package(INFO_INSTALLED if p.installed else INFO_AVAILABLE, p.package_id, p.summary)
                found = True
        if not found and self.fake.not_found_as_error:
            return self._finish(EXIT_FAILED, (ERROR_PACKAGE_NOT_FOUND, "Nothing provides the search terms"))
        self._finish(EXIT_SUCCESS)

    async def _details(self, ids):
        await asyncio.sleep(0)
        self._set(STATUS_INFO, 0)
        for pid in ids:
            p = self.fake.find(pid)
            if p is None:
                return self._finish(EXIT_FAILED, (ERROR_PACKAGE_NOT_FOUND, f"{pid} was not found"))
            self.Details({"package-id": Variant("s", pid), "summary": Variant("s", p.summary),
                          "license": Variant("s", "GPL-2.0-only"), "group": Variant("u", 0),
                          "description": Variant("s", p.summary), "url": Variant("s", "https://example.invalid"),
                          "size": Variant("t", p.size), "download-size": Variant("t", p.download_size)})
        self._finish(EXIT_SUCCESS)

    async def _install(self, flags, ids):
        await asyncio.sleep(0)
        while self.fake.lock_held:
            self._set(STATUS_WAITING_FOR_LOCK)
            if await self._cancelled(0.05):
                return
        self._set(STATUS_SETUP, 0)
        packages = []
        for pid in ids:  # the whole transaction is checked before anything is installed
            p = self.fake.find(pid)
            if p is None:
                return self._finish(EXIT_FAILED, (ERROR_PACKAGE_NOT_FOUND, f"{pid} was not found"))
            if p.installed:
                return self._finish(EXIT_FAILED, (ERROR_PACKAGE_ALREADY_INSTALLED, f"{p.nevra} is already installed"))
            if not p.trusted and flags & FLAG_ONLY_TRUSTED:
                return self._finish(EXIT_FAILED, (ERROR_MISSING_GPG_SIGNATURE,
                                                  f"The package {p.nevra} is not signed"))
            packages.append(p)
        for n, p in enumerate(packages):
            self._set(STATUS_DOWNLOAD, 10 + 40 * n // len(packages))
            self.Package(INFO_DOWNLOADING, p.package_id, p.summary)
            self.ItemProgress(p.package_id, STATUS_DOWNLOAD, 50)
            self.ItemProgress(p.package_id, STATUS_DOWNLOAD, 100)
        for n, p in enumerate(packages):
            self._set(STATUS_INSTALL, 50 + 50 * n // len(packages))
            self.Package(INFO_INSTALLING, p.package_id, p.summary)
            if p.behaviour == "fail":
                return self._finish(EXIT_FAILED, (ERROR_PACKAGE_FAILED_TO_INSTALL, FAIL_MESSAGE.format(nevra=p.nevra)))
            if p.behaviour == "hang":
                self.ItemProgress(p.package_id, STATUS_INSTALL, 30)
                await self._cancel.wait()
                await self._cancelled(0)
                return
            p.installed = True
            self.ItemProgress(p.package_id, STATUS_INSTALL, 100)
            self.Package(INFO_FINISHED, p.package_id, p.summary)
        self._finish(EXIT_SUCCESS)

    async def _cancelled(self, wait: float) -> bool:
        if not self._cancel.is_set():
            try:
                await asyncio.wait_for(self._cancel.wait(), wait)
            except asyncio.TimeoutError:
                return False
        self._set(STATUS_CANCEL)
        self._finish(EXIT_CANCELLED, (ERROR_TRANSACTION_CANCELLED, "The task was stopped successfully"))
        return True


class FakePackageKitForTests:
    """Test stand-in for packagekitd: owns org.freedesktop.PackageKit on the given bus, served from a
    thread with its own asyncio loop (the code under test runs its own loop in the test's thread)."""

    def __init__(self, catalogue: list[FakePackage], *, not_found_as_error: bool = False):
        self.catalogue = catalogue
        self.not_found_as_error = not_found_as_error  # some backends answer a fruitless search with an error
        self.lock_held = False
        self.calls: list[tuple] = []  # (transaction path, member, *args)
        self.install_flags: list[int] = []
        self.cancelled: list[str] = []
        self._ids = itertools.count(1)
        self._tasks: set = set()
        self._loop = None
        self._bus = None
        self._thread = None

    def find(self, package_id: str) -> FakePackage | None:
        return next((p for p in self.catalogue if p.package_id == package_id), None)

    def package(self, name: str) -> FakePackage:
        return next(p for p in self.catalogue if p.name == name)

    def members(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[1] == name]

    def _record(self, path, member, *args):
        self.calls.append((path, member, *args))

    def _new_transaction(self) -> str:
        path = f"/{next(self._ids)}_kmgtest"
        self._bus.export(path, _Transaction(self, path))
        return path

    # --- life cycle ---------------------------------------------------------------------------
    def start(self, address: str, timeout: float = 10) -> "FakePackageKitForTests":
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve():
            self._bus = await MessageBus(bus_address=address).connect()
            self._bus.export(PK_PATH, _Daemon(self))
            reply = await self._bus.request_name(BUS_NAME)
            if reply != RequestNameReply.PRIMARY_OWNER:
                raise RuntimeError(f"could not own {BUS_NAME}: {reply}")
            ready.set()
            await self._bus.wait_for_disconnect()

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(serve())
            except BaseException as e:  # reported to the starting thread
                failure.append(e)
                ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="FakePackageKitForTests", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"the PackageKit stand-in did not start: {failure}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._bus is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._bus.disconnect)
        if self._thread is not None:
            self._thread.join(10)
