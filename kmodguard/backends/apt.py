"""apt, for Ubuntu's linux-modules-extra-KVER (and Debian's packages named NAME-KVER).

Another root (KMODGUARD_ROOT): this machine's apt-get and dpkg, with the root's configuration,
package lists, cache and dpkg database. `-o RootDir=` cannot do that: apt reads this machine's
/etc/apt/apt.conf.d before any -o option is seen, and RootDir prefixes the method drivers too. So
kmodguard hands apt a two-line configuration file through APT_CONFIG, read before anything else:
`Dir "ROOT/"` (every relative path apt uses, /etc/apt/apt.conf.d included, is then the root's)
and dpkg's `--root=ROOT/`. Absolute paths in the root's sources (a file: URI, a signed-by key) are
read as this machine sees them, as apt does with RootDir.

apt has no per-package signatures: a repository whose Release signature fails is dropped at
`apt-get update`. So kmodguard refreshes the lists itself (refresh(), once, before it concludes
that a package is in no repository) and reports a refused signature as SignatureRefused.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import Busy, InvalidInput, KmodguardError, PackageUnavailable, SignatureRefused
from . import InstallResult, Offer, Progress
from ._run import last_line, run
from .. import requests as req

# what apt-get update prints for a Release file whose signature it refused
_SIGNATURE_REFUSED = re.compile(r"^(?:W: GPG error: (\S+ \S+)|E: The repository '([^']*)' is not signed\.)",
                                re.MULTILINE)
_FETCH_FAILED = re.compile(r"^(?:E|W): Failed to fetch (\S+)", re.MULTILINE)

UNAVAILABLE_HINT = ("kmodguard refreshed the package lists ('apt-get update') and no repository has it: the "
                    "package for the running kernel has left the mirror (this happens after newer kernels are "
                    "published) or the kernel's repository is not configured. Either install it from a local "
                    "package file ('apt-get install ./PACKAGE_VERSION_ARCH.deb'), or upgrade the kernel "
                    "('apt-get install linux-generic', on Debian linux-image-amd64), reboot into it, and run "
                    "kmodguard again")


def _error_line(res) -> str:
    """apt's own error ("E: ..."), which its progress lines follow; else the last line."""
    errors = [line for line in (res.stderr + res.stdout).splitlines() if line.startswith("E: ")]
    return errors[-1] if errors else last_line(res)


def _name(request: str) -> str:
    """A NAME-KVER request (linux-modules-extra-KVER), parsed again; apt-get takes no other form."""
    return req.checked([request], (req.NAME_KVER,), "apt-get")[0]


def install_argv(names: list[str], opts: list[str], lock_wait: float) -> list[str]:
    return ["apt-get", *opts, "-y", "-q", "--no-install-recommends", "-o", f"DPkg::Lock::Timeout={int(lock_wait)}",
            "install", "--", *[_name(n) for n in names]]


def root_config(root: Path) -> str:
    """The APT_CONFIG file for another root (see the module's docstring)."""
    text = str(root)
    if not root.is_absolute() or any(c in text for c in '"\\{};') or not text.isprintable():
        raise InvalidInput(f"{text!r} cannot be handed to apt as a root directory",
                           hint="KMODGUARD_ROOT must be an absolute path without quotes, braces or semicolons")
    top = text.rstrip("/") + "/"
    return f'Dir "{top}";\nDPkg::Options:: "--root={top}";\n'


class AptBackend:
    name = "apt"
    unavailable_hint = UNAVAILABLE_HINT

    def __init__(self, root: Path = Path("/"), timeout: float = 900.0):
        self.root = Path(root)
        self.timeout = timeout  # for queries and refreshes; an install gets its own

    def _opts(self) -> list[str]:
        return []  # the root goes through APT_CONFIG (_apt)

    @contextlib.contextmanager
    def _apt_env(self):
        if self.root == Path("/"):
            yield {}
            return
        with tempfile.TemporaryDirectory(prefix="kmodguard-apt-") as tmp:
            conf = Path(tmp, "apt.conf")
            conf.write_text(root_config(self.root))
            yield {"APT_CONFIG": str(conf)}

    def _apt(self, args: list[str], timeout: float, name: str, cwd=None):
        with self._apt_env() as env:
            return run(args, timeout, name, {"DEBIAN_FRONTEND": "noninteractive", **env}, cwd=cwd)

    def is_installed(self, request: str) -> bool:
        res = run([shutil.which("dpkg-query") or "dpkg-query", *(["--root", str(self.root)] if self.root != Path("/") else []),
                   "-W", "-f", "${db:Status-Status}", "--", _name(request)], 60, "dpkg-query")
        return res.returncode == 0 and res.stdout.strip() == "installed"

    def refresh(self, timeout: float | None = None) -> None:
        """apt-get update in the target root. SignatureRefused when a repository's Release
        signature is refused (apt then drops that repository); KmodguardError when one is unreachable."""
        res = self._apt(["apt-get", "-q", "update"], timeout or self.timeout, "apt-get update")
        output = res.stdout + res.stderr
        refused = sorted({a or b for a, b in _SIGNATURE_REFUSED.findall(output)})
        if refused:
            raise SignatureRefused(f"apt refused the signature of {', '.join(refused)}, so kmodguard cannot tell "
                                   f"which packages it holds",
                                   hint="the repository's Release file is not signed by a key its source trusts "
                                        "(signed-by=): fix the key or the repository, run 'apt-get update', then "
                                        "run kmodguard again; kmodguard never turns signature checks off")
        if "Could not get lock" in output:
            raise Busy("apt's lists lock stayed held", hint="another package manager is running; try again later")
        failed = sorted(set(_FETCH_FAILED.findall(output)))
        if res.returncode != 0 or failed:
            raise KmodguardError(f"apt-get update could not refresh the package lists"
                                 f"{' (' + ', '.join(failed) + ')' if failed else ''}: {_error_line(res)}",
                                 hint="check the sources ('apt-cache policy') and the network, then run again")

    def query(self, requests: list[str], timeout: float | None = None) -> list[Offer]:
        offers = []
        for request in requests:
            res = self._apt(["apt-cache", "show", "--no-all-versions", "--", _name(request)], timeout or self.timeout,
                            "apt-cache")
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
        res = self._apt(install_argv(names, self._opts(), lock_wait), timeout, "apt-get")
        output = res.stdout + res.stderr
        if res.returncode != 0:
            if "Unable to locate package" in output or "has no installation candidate" in output:
                raise PackageUnavailable(f"no repository has {', '.join(names)}", hint=UNAVAILABLE_HINT)
            if "Could not get lock" in output:
                raise Busy(f"the dpkg lock stayed held for {lock_wait:.0f} s",
                           hint="another package manager is running (cloud-init, unattended-upgrades?); "
                                "run 'kmodguard fix' again when it is done")
            if "cannot be authenticated" in output or "NO_PUBKEY" in output:
                raise SignatureRefused(f"apt-get refused {', '.join(names)}: {last_line(res)}",
                                       hint="kmodguard never installs unauthenticated packages; fix the "
                                            "repository's key (signed-by=) and run again")
            raise KmodguardError(f"apt-get install failed (exit {res.returncode}): {_error_line(res)}",
                                 hint="the full output is in the journal (kmodguard -v shows it)")
        return InstallResult(tuple(requests), output)

    def provides(self, request: str, timeout: float = 120) -> list[str]:
        return []  # Debian packages carry no kmod() provides: fetch downloads

    def download(self, requests: list[str], destdir: Path, timeout: float) -> list[Path]:
        destdir = Path(destdir)
        res = self._apt(["apt-get", "download", "--", *[_name(r) for r in requests]], timeout, "apt-get",
                        cwd=destdir)  # apt-get download writes into the current directory
        if res.returncode != 0:
            if "Unable to locate package" in res.stdout + res.stderr:
                raise PackageUnavailable(f"no repository has {', '.join(requests)}", hint=UNAVAILABLE_HINT)
            raise KmodguardError(f"apt-get download failed: {_error_line(res)}")
        return sorted(destdir.glob("*.deb"))
