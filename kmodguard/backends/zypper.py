"""zypper, for SUSE's kernel-default on kernel-default-base systems.

The request is SUSE's exact version, `kernel-default = VERSION-RELEASE`; kernel-default replaces
kernel-default-base of the same version (it obsoletes it), which zypper's solver does by itself.
Another root: `--root ROOT`, and ZYPP_LOCKFILE_ROOT=ROOT so that the zypp lock is the root's
(ROOT/run/zypp.pid), not this machine's. kmodguard waits for that lock itself, within lock_wait:
zypper 1.14 waits on a held lock without end and ignores SIGTERM meanwhile.
"""

from __future__ import annotations

import fcntl
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ..errors import Busy, KmodguardError, PackageUnavailable, SignatureRefused
from . import InstallResult, Offer, Progress
from ._run import last_line, run
from ._rpmdb import rpm_provides
from .. import requests as req

# zypper's documented exit codes
ZYPPER_EXIT_ZYPP_LOCKED = 7
ZYPPER_EXIT_INF_CAP_NOT_FOUND = 104
# what zypper prints when it refuses a repository's or a package's signature
SIGNATURE_REFUSED = ("Signature verification failed", "is signed with an unknown key", "Package is not signed")

UNAVAILABLE_HINT = ("kmodguard refreshed the repositories ('zypper refresh') and none has it: the package for the "
                    "running kernel has left the repositories (this happens after newer kernels are published). "
                    "Either install it from a local package file ('zypper install ./kernel-default-VERSION.rpm'), "
                    "or update the kernel ('zypper update kernel-default-base'), reboot into it, and run kmodguard "
                    "again")


class ZypperBackend:
    name = "zypper"
    unavailable_hint = UNAVAILABLE_HINT

    def __init__(self, root: Path = Path("/"), timeout: float = 900.0, lock_wait: float = 300.0):
        self.root = Path(root)
        self.timeout = timeout  # for queries and refreshes; an install gets its own
        self.lock_wait = lock_wait  # every zypper command takes the zypp lock, queries too

    def _base(self) -> list[str]:
        return ["zypper", "--non-interactive", *(["--root", str(self.root)] if self.root != Path("/") else [])]

    def _env(self, lock_wait: float = 0) -> dict:
        env = {"ZYPP_LOCK_TIMEOUT": str(int(lock_wait))}
        if self.root != Path("/"):
            env["ZYPP_LOCKFILE_ROOT"] = str(self.root)
        return env

    def install_argv(self, requests: list[str]) -> list[str]:
        """zypper parses with getopt_long: '--' ends its options."""
        return self._base() + ["install", "--no-recommends", "--",
                               *req.checked(requests, (req.UNAME_R, req.NAME_VERSION), "zypper")]

    def is_installed(self, request: str) -> bool:
        return rpm_provides(self.root, request)

    def _lock_holder(self) -> int | None:
        """The pid holding the zypp lock of the root (a record lock on run/zypp.pid, or a live pid in it)."""
        path = self.root / "run/zypp.pid"
        try:
            with open(path, "rb") as f:
                try:
                    fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.lockf(f, fcntl.LOCK_UN)
                    locked = False
                except OSError:
                    locked = True
                text = f.read(32).strip()
        except OSError:
            return None
        pid = int(text) if text.isdigit() else None
        if pid is not None and pid != os.getpid() and os.path.exists(f"/proc/{pid}"):
            return pid
        return (pid or -1) if locked else None

    def wait_for_lock(self, lock_wait: float, progress: Progress) -> None:
        deadline = time.monotonic() + lock_wait
        told = False
        while (holder := self._lock_holder()) is not None:
            if time.monotonic() >= deadline:
                raise Busy(f"the zypp lock ({self.root / 'run/zypp.pid'}, pid {holder}) stayed held for "
                           f"{lock_wait:.0f} s",
                           hint="another package manager is running; run 'kmodguard fix' again when it is done")
            if not told:
                progress(f"waiting for the zypp lock (pid {holder}, up to {lock_wait:.0f} s)")
                told = True
            time.sleep(0.5)

    def refresh(self, timeout: float | None = None) -> None:
        self.wait_for_lock(self.lock_wait, lambda m: None)
        res = run(self._base() + ["refresh"], timeout or self.timeout, "zypper refresh", self._env())
        output = res.stdout + res.stderr
        if any(m in output for m in SIGNATURE_REFUSED):
            raise SignatureRefused(f"zypper refused a repository's signature: {_signature_line(output)}",
                                   hint="the repository's repomd.xml is not signed by a key this system trusts: "
                                        "fix the key (gpgkey=) or the repository and run 'zypper refresh'; "
                                        "kmodguard never turns signature checks off")
        if res.returncode != 0:
            raise KmodguardError(f"zypper refresh failed (exit {res.returncode}): {last_line(res)}",
                                 hint="check the repositories ('zypper repos') and the network, then run again")

    def query(self, requests: list[str], timeout: float | None = None) -> list[Offer]:
        offers = []
        for request in req.checked(requests, (req.UNAME_R, req.NAME_VERSION), "zypper"):
            parsed = req.parse(request)
            name = request.split(" = ")[0]
            self.wait_for_lock(self.lock_wait, lambda m: None)
            res = run(self._base() + ["--xmlout", "search", "--provides", "--match-exact", "--details", "--", name],
                      timeout or self.timeout, "zypper", self._env())
            try:
                solvables = ET.fromstring(res.stdout).findall(".//solvable") if res.stdout.strip() else []
            except ET.ParseError:
                solvables = []
            # the exact version only (search matches the name): NAME = VERSION-RELEASE, an epoch aside
            exact = [s.attrib for s in solvables if s.get("status") != "installed" and (
                parsed.form != req.NAME_VERSION or s.get("edition", "").split(":")[-1] == parsed.version.split(":")[-1])]
            if not exact:
                offers.append(Offer(request, False))
                continue
            s = exact[0]
            offers.append(Offer(request, True, f"{s.get('name')}-{s.get('edition', '')}.{s.get('arch', '')}"))
        return offers

    def install(self, requests: list[str], *, comment: str, timeout: float, lock_wait: float,
                progress: Progress) -> InstallResult:
        args = self.install_argv(requests)
        self.wait_for_lock(lock_wait, progress)
        progress(f"zypper: installing {', '.join(requests)}")
        res = run(args, timeout, "zypper", self._env(lock_wait))
        output = res.stdout + res.stderr
        if res.returncode == ZYPPER_EXIT_INF_CAP_NOT_FOUND:
            raise PackageUnavailable(f"no repository has {', '.join(requests)}", hint=UNAVAILABLE_HINT)
        if res.returncode == ZYPPER_EXIT_ZYPP_LOCKED:
            raise Busy("the zypp lock stayed held", hint="another package manager is running; try again later")
        if res.returncode != 0 and any(m in output for m in SIGNATURE_REFUSED):
            raise SignatureRefused(f"zypper install failed: it refused the signature of a package for "
                                   f"{', '.join(requests)}: {_signature_line(output)}",
                                   hint="kmodguard never turns signature checks off: import the repository's "
                                        "key or fix the repository, then run again")
        if res.returncode != 0:
            raise KmodguardError(f"zypper install failed (exit {res.returncode}): {last_line(res)}",
                                 hint="the full output is in the journal (kmodguard -v shows it)")
        return InstallResult(tuple(requests), output)


def _signature_line(output: str) -> str:
    return next((line.strip() for line in output.splitlines() if any(m in line for m in SIGNATURE_REFUSED)), "")
