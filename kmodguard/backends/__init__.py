"""Package managers behind one small protocol.

A backend never sees device data: requests come from the index (the exact-version provide,
e.g. 'kernel-modules-uname-r = 6.11.4-301.fc41.x86_64') and package names pass the allow-list
before a backend is asked. Every subprocess gets an argument list, LC_ALL=C and a timeout.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

Progress = Callable[[str], None]


class Offer(NamedTuple):
    """What the repositories say about one request."""

    request: str
    available: bool
    nevra: str | None = None  # what would be installed
    download_size: int | None = None  # bytes, when the metadata tells
    installed_size: int | None = None


class InstallResult(NamedTuple):
    installed: tuple[str, ...]  # the requests now satisfied
    log: str  # the package manager's output, for the journal
    transaction_id: str | None = None  # e.g. dnf history id, when known


class FirmwareLookup(NamedTuple):
    """Which packages the repositories say hold firmware files (names as modinfo gives them)."""

    providers: dict  # firmware name -> tuple of package names holding it (any compression)
    versions: dict  # package name -> its version in the repositories ("" when not told)
    note: str | None = None  # why the answer may be incomplete (no file lists in the cache, ...)


class Announcement(NamedTuple):
    """A repository package that says it drives devices matching a modalias pattern."""

    package: str
    version: str  # the package's version in the repositories (EVR)
    pattern: str  # e.g. 'pci:v000010DEd*sv*sd*bc03sc*i*'
    how: str  # provides | supplements
    flavour: str = ""  # SUSE: 'kernel-default' when it supplements only that kernel flavour


class Announcements(NamedTuple):
    items: tuple  # of Announcement
    note: str | None = None


class Backend(Protocol):
    name: str

    def is_installed(self, request: str) -> bool:
        """Is the request satisfied by the package database right now (convergence checks)?"""

    def query(self, requests: list[str]) -> list[Offer]:
        """Availability and sizes; never installs. Raises KmodguardError on failure."""

    def install(self, requests: list[str], *, comment: str, timeout: float, lock_wait: float,
                progress: Progress) -> InstallResult:
        """One transaction for all requests; signature checks on. Raises PackageUnavailable when
        a request is in no repository, Busy when the package lock stayed held past lock_wait,
        KmodguardError on any other failure (message says what to do)."""

    def refresh(self, timeout: float | None = None) -> None:
        """Fetch fresh repository metadata, once, before a request is called unavailable. Raises
        SignatureRefused when a repository's signature is refused, KmodguardError when unreachable."""

    # For `kmodguard index fetch` (dnf, dnf5 and apt have them):

    def provides(self, request: str) -> list[str]:
        """What the repository's package for the request provides (kmod(NAME.ko), ...): metadata only."""

    def download(self, requests: list[str], destdir, timeout: float) -> list:
        """Download (never install) the packages into destdir; returns the package files."""

    # For a module's firmware (dnf, dnf5, zypper and apt have it; see firmware_lookup for the others):

    def firmware_providers(self, names: list[str], *, cache_only: bool) -> FirmwareLookup:
        """The packages whose file lists hold /usr/lib/firmware/NAME (.xz, .zst) for each name;
        cache_only: from the package manager's cache, never the network (status, explain)."""


def query_fresh(backend: Backend, requests: list[str], progress: Progress) -> list[Offer]:
    """The backend's offers; when one is missing, the metadata refreshed once (a cloud image's
    lists are often empty or stale) and asked again: "not available" is said only after that."""
    offers = backend.query(requests)
    refresh = getattr(backend, "refresh", None)  # every backend here has one; a caller's own may not
    if refresh is not None and not all(o.available for o in offers):
        progress(f"{backend.name}: refreshing the repository metadata")
        refresh()
        offers = backend.query(requests)
    return offers


def driver_announcements(backend, *, cache_only: bool) -> Announcements:
    """backend.driver_announcements (modalias() provides and supplements in the repository
    metadata), or an answer that says plainly this backend cannot tell."""
    method = getattr(backend, "driver_announcements", None)
    if method is None:
        return Announcements((), f"kmodguard cannot yet read driver announcements (modalias) from {backend.name}'s "
                                 "repositories")
    return method(cache_only=cache_only)


def firmware_lookup(backend, names: list[str], *, cache_only: bool) -> FirmwareLookup:
    """backend.firmware_providers, or an answer that says plainly this backend cannot tell."""
    method = getattr(backend, "firmware_providers", None)
    if method is None:
        return FirmwareLookup({}, {}, f"kmodguard cannot yet ask {backend.name} which package holds firmware: "
                                      f"install the firmware package by hand ({BY_HAND.get(backend.name, BY_HAND[''])})")
    return method(names, cache_only=cache_only)


# how a person finds the firmware package where kmodguard cannot ask
BY_HAND = {
    "apt": "'apt-file search /lib/firmware/NAME' names it; Debian keeps firmware in firmware-* packages of "
           "the non-free-firmware component, which may need enabling in the APT sources",
    # zypper's metadata has no full file lists (libzypp reads primary.xml only): its search cannot name it
    "zypper": "SUSE keeps firmware in kernel-firmware-* packages named after the hardware's maker "
              "('zypper search kernel-firmware'; 'rpm -qlp PACKAGE.rpm' lists a downloaded one's files)",
    "": "the distribution's firmware packages hold /lib/firmware/NAME",
}


def choose(name: str, package_manager: str | None, root=None, timeout: float = 900.0,
           lock_wait: float = 300.0, firmware_packages: tuple[str, ...] = (), cache_dir=None) -> Backend:
    """The backend by policy name ("auto": the distribution's own package manager).
    firmware_packages: the allow-list a backend checks bare package names against again;
    cache_dir: where a backend may keep answers that only its configuration changes (STATE_DIR)."""
    from pathlib import Path

    from ..errors import KmodguardError

    root = Path(root or "/")
    if name == "auto":
        name = {"dnf5": "dnf5", "dnf": "dnf", "zypper": "zypper", "apt-get": "apt"}.get(package_manager or "", "")
        if not name:
            raise KmodguardError("no supported package manager found (dnf, dnf5, zypper, apt-get, PackageKit)",
                                 hint="set 'backend' in /etc/kmodguard/kmodguard.toml")
    if name in ("dnf", "dnf5"):
        from .dnf import DnfBackend

        return DnfBackend(name, root, timeout=timeout, firmware_packages=firmware_packages)
    if name == "packagekit":
        from .packagekit import PackageKitBackend

        return PackageKitBackend(call_timeout=timeout)
    if name == "apt":
        from .apt import AptBackend

        return AptBackend(root, timeout=timeout, firmware_packages=firmware_packages, cache_dir=cache_dir)
    if name == "zypper":
        from .zypper import ZypperBackend

        return ZypperBackend(root, timeout=timeout, lock_wait=lock_wait, firmware_packages=firmware_packages)
    raise KmodguardError(f"unknown package backend {name!r}")
