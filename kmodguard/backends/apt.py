"""apt, for Ubuntu's linux-modules-extra-KVER (lightly tested: queries run on Debian here)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import Busy, KmodguardError, PackageUnavailable
from . import InstallResult, Offer, Progress
from ._run import last_line, run
from .. import requests as req


def _name(request: str) -> str:
    """A NAME-KVER request (linux-modules-extra-KVER), parsed again; apt-get takes no other form."""
    return req.checked([request], (req.NAME_KVER,), "apt-get")[0]


def install_argv(names: list[str], opts: list[str], lock_wait: float) -> list[str]:
    return ["apt-get", *opts, "-y", "-q", "--no-install-recommends", "-o", f"DPkg::Lock::Timeout={int(lock_wait)}",
            "install", "--", *[_name(n) for n in names]]


class AptBackend:
    name = "apt"

    def __init__(self, root: Path = Path("/")):
        self.root = Path(root)

    def _opts(self) -> list[str]:
        return [] if self.root == Path("/") else ["-o", f"RootDir={self.root}"]

    def is_installed(self, request: str) -> bool:
        res = run([shutil.which("dpkg-query") or "dpkg-query", *(["--root", str(self.root)] if self.root != Path("/") else []),
                   "-W", "-f", "${db:Status-Status}", "--", _name(request)], 60, "dpkg-query")
        return res.returncode == 0 and res.stdout.strip() == "installed"

    def query(self, requests: list[str], timeout: float = 120) -> list[Offer]:
        offers = []
        for request in requests:
            res = run(["apt-cache", *self._opts(), "show", "--no-all-versions", "--", _name(request)], timeout, "apt-cache")
            fields = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line and line[0] != " ")
            if res.returncode != 0 or "Version" not in fields:
                offers.append(Offer(request, False))
                continue
            size = int(fields["Size"]) if fields.get("Size", "").isdigit() else None
            inst = int(fields["Installed-Size"]) * 1024 if fields.get("Installed-Size", "").isdigit() else None
            offers.append(Offer(request, True, f"{request}_{fields['Version']}", size, inst))
        return offers

    def install(self, requests: list[str], *, comment: str, timeout: float, lock_wait: float,
                progress: Progress) -> InstallResult:
        names = [_name(r) for r in requests]
        progress(f"apt-get: installing {', '.join(names)}")
        res = run(install_argv(names, self._opts(), lock_wait), timeout, "apt-get",
                  {"DEBIAN_FRONTEND": "noninteractive"})
        output = res.stdout + res.stderr
        if res.returncode != 0:
            if "Unable to locate package" in output or "has no installation candidate" in output:
                raise PackageUnavailable(f"no repository has {', '.join(names)}",
                                         hint="run 'apt-get update'; if the kernel's package is gone, upgrade the kernel and reboot")
            if "Could not get lock" in output:
                raise Busy("the dpkg lock stayed held", hint="another package manager is running; try again later")
            raise KmodguardError(f"apt-get install failed: {last_line(res)}")
        return InstallResult(tuple(requests), output)

    def provides(self, request: str, timeout: float = 120) -> list[str]:
        return []  # Debian packages carry no kmod() provides: fetch downloads

    def download(self, requests: list[str], destdir: Path, timeout: float) -> list[Path]:
        destdir = Path(destdir)
        res = run(["apt-get", *self._opts(), "download", "--", *[_name(r) for r in requests]], timeout, "apt-get",
                  cwd=destdir)  # apt-get download writes into the current directory
        if res.returncode != 0:
            raise PackageUnavailable(f"apt-get download failed: {last_line(res)}")
        return sorted(destdir.glob("*.deb"))
