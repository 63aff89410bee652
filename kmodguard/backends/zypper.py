"""zypper, for SUSE's kernel-default on kernel-default-base systems (lightly tested)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from ..errors import Busy, KmodguardError, PackageUnavailable
from . import InstallResult, Offer, Progress
from ._run import last_line, run
from ._rpmdb import rpm_provides
from .. import requests as req

# zypper's documented exit codes
ZYPPER_EXIT_ZYPP_LOCKED = 7
ZYPPER_EXIT_INF_CAP_NOT_FOUND = 104


class ZypperBackend:
    name = "zypper"

    def __init__(self, root: Path = Path("/")):
        self.root = Path(root)

    def _base(self) -> list[str]:
        return ["zypper", "--non-interactive", *(["--root", str(self.root)] if self.root != Path("/") else [])]

    def install_argv(self, requests: list[str]) -> list[str]:
        """zypper parses with getopt_long: '--' ends its options."""
        return self._base() + ["install", "--no-recommends", "--",
                               *req.checked(requests, (req.UNAME_R, req.NAME_VERSION), "zypper")]

    def is_installed(self, request: str) -> bool:
        return rpm_provides(self.root, request)

    def query(self, requests: list[str], timeout: float = 300) -> list[Offer]:
        offers = []
        for request in req.checked(requests, (req.UNAME_R, req.NAME_VERSION), "zypper"):
            res = run(self._base() + ["--xmlout", "search", "--provides", "--match-exact", "--", request.split(" = ")[0]],
                      timeout, "zypper")
            try:
                solvables = ET.fromstring(res.stdout).findall(".//solvable") if res.stdout.strip() else []
            except ET.ParseError:
                solvables = []
            if not solvables:
                offers.append(Offer(request, False))
                continue
            s = solvables[0].attrib
            offers.append(Offer(request, True, f"{s.get('name')}-{s.get('edition', '')}.{s.get('arch', '')}"))
        return offers

    def install(self, requests: list[str], *, comment: str, timeout: float, lock_wait: float,
                progress: Progress) -> InstallResult:
        args = self.install_argv(requests)
        progress(f"zypper: installing {', '.join(requests)}")
        res = run(args, timeout, "zypper",
                  {"ZYPP_LOCK_TIMEOUT": str(int(lock_wait))})
        output = res.stdout + res.stderr
        if res.returncode == ZYPPER_EXIT_INF_CAP_NOT_FOUND:
            raise PackageUnavailable(f"no repository has {', '.join(requests)}",
                                     hint="refresh the repositories; if the kernel's package is gone, update the kernel and reboot")
        if res.returncode == ZYPPER_EXIT_ZYPP_LOCKED:
            raise Busy("the zypp lock stayed held", hint="another package manager is running; try again later")
        if res.returncode != 0:
            raise KmodguardError(f"zypper install failed (exit {res.returncode}): {last_line(res)}")
        return InstallResult(tuple(requests), output)
