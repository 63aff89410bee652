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


def choose(name: str, package_manager: str | None, root=None, timeout: float = 900.0,
           lock_wait: float = 300.0) -> Backend:
    """The backend by policy name ("auto": the distribution's own package manager)."""
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

        return DnfBackend(name, root, timeout=timeout)
    if name == "packagekit":
        from .packagekit import PackageKitBackend

        return PackageKitBackend(call_timeout=timeout)
    if name == "apt":
        from .apt import AptBackend

        return AptBackend(root, timeout=timeout)
    if name == "zypper":
        from .zypper import ZypperBackend

        return ZypperBackend(root, timeout=timeout, lock_wait=lock_wait)
    raise KmodguardError(f"unknown package backend {name!r}")
