"""PackageKit's D-Bus API as kmodguard uses it (PackageKit 1.x: org.freedesktop.PackageKit and
org.freedesktop.PackageKit.Transaction): the names, the enums of pk-enum.h, the members kmodguard
calls (so proxies need no Introspect round trip), and one transaction's signals collected until
Finished. No policy here: what an outcome means to kmodguard is backends/packagekit.py's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .. import dbus as _dbus
from . import Progress

log = logging.getLogger("kmodguard.backends.packagekit")

PK_NAME = "org.freedesktop.PackageKit"
PK_PATH = "/org/freedesktop/PackageKit"
PK_IFACE = "org.freedesktop.PackageKit"
TX_IFACE = "org.freedesktop.PackageKit.Transaction"
PROPS_IFACE = "org.freedesktop.DBus.Properties"

# PackageKit's enums (pk-enum.h). Filters and transaction flags travel as bitfields: 1 << value.
FILTER_NONE = 1 << 1
FILTER_INSTALLED = 1 << 2
FILTER_NOT_INSTALLED = 1 << 3
FILTER_NEWEST = 1 << 16
FILTER_ARCH = 1 << 18
TRANSACTION_FLAG_ONLY_TRUSTED = 1 << 1

INFO_INSTALLED = 1
INFO_AVAILABLE = 2
INFO_DOWNLOADING = 10
INFO_INSTALLING = 12
INFO_FINISHED = 18

EXIT_SUCCESS = 1
EXIT_FAILED = 2
EXIT_CANCELLED = 3
EXIT_KEY_REQUIRED = 4
EXIT_EULA_REQUIRED = 5
EXIT_KILLED = 6
EXIT_MEDIA_CHANGE_REQUIRED = 7
EXIT_NEED_UNTRUSTED = 8
EXIT_CANCELLED_PRIORITY = 9
EXIT_NAMES = {0: "unknown", 1: "success", 2: "failed", 3: "cancelled", 4: "key-required", 5: "eula-required",
              6: "killed", 7: "media-change-required", 8: "need-untrusted", 9: "cancelled-priority",
              10: "skip-transaction", 11: "repair-required"}

STATUS_WAIT = 1
STATUS_WAITING_FOR_LOCK = 30
STATUS_NAMES = {0: "unknown", 1: "waiting", 2: "setting up", 3: "running", 4: "querying", 5: "getting information",
                6: "removing", 7: "refreshing cache", 8: "downloading", 9: "installing", 10: "updating",
                11: "cleaning up", 12: "obsoleting", 13: "resolving dependencies", 14: "checking signatures",
                15: "testing changes", 16: "committing changes", 17: "requesting data", 18: "finished",
                19: "cancelling", 20: "downloading repository information", 21: "downloading package lists",
                27: "loading cache", 30: "waiting for the package manager lock", 31: "waiting for authentication",
                35: "copying files", 36: "running hooks"}
WAITING = (STATUS_WAIT, STATUS_WAITING_FOR_LOCK)

ERROR_GPG_FAILURE = 5
ERROR_PACKAGE_NOT_FOUND = 8
ERROR_TRANSACTION_CANCELLED = 17
ERROR_CANNOT_GET_LOCK = 26
ERROR_BAD_GPG_SIGNATURE = 30
ERROR_MISSING_GPG_SIGNATURE = 31
ERROR_NOT_AUTHORIZED = 48
ERROR_CANNOT_INSTALL_REPO_UNSIGNED = 50
ERROR_NOT_SUPPORTED = 3
ERROR_PROVIDE_TYPE_NOT_SUPPORTED = 62
ERROR_NAMES = {0: "unknown", 1: "oom", 2: "no-network", 3: "not-supported", 4: "internal-error", 5: "gpg-failure",
               6: "package-id-invalid", 7: "package-not-installed", 8: "package-not-found",
               9: "package-already-installed", 10: "package-download-failed", 13: "dep-resolution-failed",
               16: "transaction-error", 17: "transaction-cancelled", 18: "no-cache", 19: "repo-not-found",
               26: "cannot-get-lock", 30: "bad-gpg-signature", 31: "missing-gpg-signature",
               35: "file-conflicts", 36: "package-conflicts", 37: "repo-not-available", 40: "package-corrupt",
               43: "no-more-mirrors-to-try", 46: "no-space-on-device", 48: "not-authorized",
               50: "cannot-install-repo-unsigned", 56: "package-failed-to-configure",
               58: "package-failed-to-install", 61: "package-database-changed", 62: "provide-type-not-supported",
               63: "install-root-invalid", 64: "cannot-fetch-sources", 65: "cancelled-priority",
               66: "unfinished-transaction", 67: "lock-required"}

# The members kmodguard uses, as packagekitd (1.x) declares them: proxies need no Introspect round trip.
INTROSPECTION = f"""<node>
  <interface name="{PK_IFACE}">
    <method name="CreateTransaction"><arg type="o" name="object_path" direction="out"/></method>
  </interface>
  <interface name="{TX_IFACE}">
    <property name="Status" type="u" access="read"/>
    <property name="Percentage" type="u" access="read"/>
    <method name="SetHints"><arg type="as" name="hints" direction="in"/></method>
    <method name="Cancel"/>
    <method name="GetDetails"><arg type="as" name="package_ids" direction="in"/></method>
    <method name="InstallPackages">
      <arg type="t" name="transaction_flags" direction="in"/><arg type="as" name="package_ids" direction="in"/>
    </method>
    <method name="Resolve">
      <arg type="t" name="filter" direction="in"/><arg type="as" name="packages" direction="in"/>
    </method>
    <method name="WhatProvides">
      <arg type="t" name="filter" direction="in"/><arg type="as" name="values" direction="in"/>
    </method>
    <method name="RefreshCache"><arg type="b" name="force" direction="in"/></method>
    <signal name="Details"><arg type="a{{sv}}" name="data"/></signal>
    <signal name="ErrorCode"><arg type="u" name="code"/><arg type="s" name="details"/></signal>
    <signal name="Finished"><arg type="u" name="exit"/><arg type="u" name="runtime"/></signal>
    <signal name="Package">
      <arg type="u" name="info"/><arg type="s" name="package_id"/><arg type="s" name="summary"/>
    </signal>
    <signal name="Packages"><arg type="a(uss)" name="packages"/></signal>
    <signal name="ItemProgress">
      <arg type="s" name="id"/><arg type="u" name="status"/><arg type="u" name="percentage"/>
    </signal>
  </interface>
  <interface name="{PROPS_IFACE}">
    <method name="Get">
      <arg type="s" name="interface_name" direction="in"/><arg type="s" name="property_name" direction="in"/>
      <arg type="v" name="value" direction="out"/>
    </method>
    <signal name="PropertiesChanged">
      <arg type="s" name="interface_name"/><arg type="a{{sv}}" name="changed_properties"/>
      <arg type="as" name="invalidated_properties"/>
    </signal>
  </interface>
</node>"""


@dataclass(frozen=True)
class PkPackage:
    info: int
    package_id: str
    summary: str = ""

    @property
    def name(self) -> str:
        return self.package_id.split(";")[0]

    @property
    def nevra(self) -> str:
        """'kernel-modules;6.1.0-56.fc42;x86_64;fedora' -> 'kernel-modules-6.1.0-56.fc42.x86_64'."""
        name, version, arch, _data = (self.package_id.split(";") + ["", "", ""])[:4]
        return f"{name}-{version}.{arch}" if arch else f"{name}-{version}"


INFO_VERB = {INFO_INSTALLED: "installed", INFO_AVAILABLE: "available", INFO_DOWNLOADING: "downloading",
              INFO_INSTALLING: "installing", INFO_FINISHED: "finished"}


class Transaction:
    """One transaction object: its signals, collected until Finished."""

    def __init__(self, bus, path: str, progress: Progress | None):
        obj = bus.get_proxy_object(PK_NAME, path, introspection())
        self.path = path
        self.iface = obj.get_interface(TX_IFACE)
        self.props = obj.get_interface(PROPS_IFACE)
        self.progress = progress
        self.packages: list[PkPackage] = []
        self.details: list[dict] = []
        self.errors: list[tuple[int, str]] = []
        self.exit: int | None = None
        self.runtime: int | None = None
        self.status: int | None = None
        self.percentage: int | None = None
        self.finished = asyncio.get_running_loop().create_future()
        self._last_message = None
        self._handlers = [("package", self._on_package), ("packages", self._on_packages),
                          ("details", self._on_details), ("error_code", self._on_error_code),
                          ("finished", self._on_finished), ("item_progress", self._on_item_progress)]
        for name, fn in self._handlers:
            getattr(self.iface, f"on_{name}")(fn)
        self.props.on_properties_changed(self._on_properties_changed)

    def close(self) -> None:
        for name, fn in self._handlers:
            getattr(self.iface, f"off_{name}")(fn)
        self.props.off_properties_changed(self._on_properties_changed)

    # signal handlers (dbus-next calls them with the signal's arguments)
    def _on_package(self, info, package_id, summary):
        self.packages.append(PkPackage(info, package_id, summary))
        if self.progress and info in (INFO_DOWNLOADING, INFO_INSTALLING):
            self._tell(f"PackageKit: {INFO_VERB[info]} {PkPackage(info, package_id).nevra}")

    def _on_packages(self, packages):
        for info, package_id, summary in packages:
            self._on_package(info, package_id, summary)

    def _on_details(self, data):
        self.details.append({k: (v.value if isinstance(v, _dbus.Variant) else v) for k, v in data.items()})

    def _on_error_code(self, code, details):
        log.info("PackageKit %s: error %s: %s", self.path, ERROR_NAMES.get(code, code), details)
        self.errors.append((code, details))

    def _on_finished(self, exit_, runtime):
        self.exit, self.runtime = exit_, runtime
        if not self.finished.done():
            self.finished.set_result(exit_)

    def _on_item_progress(self, item, status, percentage):
        if self.progress and percentage <= 100:
            name = PkPackage(0, item).nevra if ";" in item else item
            self._tell(f"PackageKit: {STATUS_NAMES.get(status, 'working')} {name} {percentage}%")

    def _on_properties_changed(self, interface, changed, invalidated):
        if interface != TX_IFACE:
            return
        if "Status" in changed:
            self.status = changed["Status"].value
        if "Percentage" in changed:
            self.percentage = changed["Percentage"].value
            if self.progress and self.percentage <= 100:
                self._tell(f"PackageKit: {self.percentage}% ({STATUS_NAMES.get(self.status, 'working')})")

    def _tell(self, message: str) -> None:
        if message == self._last_message:
            return
        self._last_message = message
        try:
            self.progress(message)
        except Exception:  # a broken progress callback must not break the transaction
            log.exception("progress callback failed")


_NODE = None


def introspection():
    global _NODE
    if _NODE is None:
        _NODE = _dbus.parse_introspection(INTROSPECTION)
    return _NODE
