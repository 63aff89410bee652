"""dnf, both generations: dnf 4 (RHEL 9, older Fedora) and dnf5 (Fedora 41 and later).

Machine-readable queries only (repoquery --qf, rpm --qf), LC_ALL=C, argument lists, a timeout,
a bounded wait for the package lock, signature checks left as configured (never turned off),
and every transaction tagged with --comment so that `dnf history` shows kmodguard did it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from ..errors import Busy, KmodguardError, PackageUnavailable, SignatureRefused
from . import InstallResult, Offer, Progress
from ._run import last_line as _last_line
from ._run import run
from ._rpmdb import rpm_lock_files, rpm_provides
from .. import requests as req

log = logging.getLogger(__name__)

# repoquery tags: dnf 4 and dnf5 both name them downloadsize and installsize (dnf5-repoquery(8),
# "--queryformat"); every option is written --NAME=VALUE, the form dnf5's manual documents
QUERYFORMAT = {
    "dnf": "%{name}-%{evr}.%{arch}\t%{downloadsize}\t%{installsize}\n",
    "dnf5": "%{name}-%{evr}.%{arch}\t%{downloadsize}\t%{installsize}\n",
}


# What dnf is asked for: exact-version provides, and firmware packages by their exact name.
FORMS = (req.UNAME_R, req.NAME_VERSION, req.NAME)
# Firmware: where RPM distributions put it, and how (Fedora compresses it with xz).
FIRMWARE_DIR = "/usr/lib/firmware/"
FIRMWARE_SUFFIXES = ("", ".xz", ".zst")
# One record a package: '@@NAME<TAB>EVR', then its files, one a line (paths start with '/').
FIRMWARE_QUERYFORMAT = "@@%{name}\t%{evr}\n%{files}\n"
CACHE_DIRS = {"dnf": "var/cache/dnf", "dnf5": "var/cache/libdnf5"}
# modalias(PATTERN) inside a dependency; a pattern is 'bus:' and printable ASCII without blanks,
# parentheses or '#' (it becomes a word of a kmod configuration line)
MODALIAS_DEP = re.compile(r"modalias\(([^()\s]*)\)")
MODALIAS_PATTERN = re.compile(r"[a-z0-9_]+:[!-~]{1,512}", re.ASCII)
# SUSE's modalias(kernel-default:PATTERN), as libsolv shows it: for that kernel flavour only
FLAVOURED_DEP = re.compile(r"\((kernel-[a-z0-9_+.-]+) and namespace:modalias\(([^()\s]*)\)\)")
FLAVOUR_RE = re.compile(r"kernel-[a-z0-9_+.-]+", re.ASCII)


class DnfBackend:
    def __init__(self, command: str | None = None, root: Path = Path("/"), extra_args: tuple[str, ...] = (),
                 timeout: float = 900.0, firmware_packages: tuple[str, ...] = ()):
        # the firmware allow-list again: a bare package name is taken only when it admits it
        self.firmware_packages = tuple(firmware_packages)
        self.timeout = timeout  # for queries; an install gets its own
        command = command or ("dnf5" if shutil.which("dnf5") else "dnf")
        self.name = "dnf5" if os.path.basename(command).startswith("dnf5") else "dnf"
        self.command = shutil.which(command) or command
        self.root = Path(root)
        self.extra_args = tuple(extra_args)

    # --- plumbing ----------------------------------------------------------------------------

    def _name_allowed(self, name: str) -> bool:
        from ..config import name_matches

        return any(name_matches(name, e) for e in self.firmware_packages)

    def _base(self) -> list[str]:
        args = [self.command]
        if self.root != Path("/"):
            args += [f"--installroot={self.root}"]
        return args + list(self.extra_args)

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return run(args, timeout, self.name)

    def _end_of_options(self) -> list[str]:
        """'--' before the package arguments: dnf 4 takes it; dnf5 before 5.4.3 refuses it, so dnf5
        gets none and requests.parse (a request starts with [a-z0-9]) is what rules out a leading '-'."""
        return [] if self.name == "dnf5" else ["--"]

    def install_argv(self, requests: list[str], comment: str) -> list[str]:
        return self._base() + ["-y", f"--comment={comment}", "install", *self._end_of_options(),
                               *req.checked(requests, FORMS, self.name, self._name_allowed)]

    def repoquery_argv(self, request: str, *opts: str) -> list[str]:
        (request,) = req.checked([request], FORMS, self.name, self._name_allowed)
        return self._base() + ["repoquery", *opts, f"--whatprovides={request}"]

    def download_argv(self, requests: list[str], destdir) -> list[str]:
        return self._base() + ["download", f"--destdir={destdir}", *self._end_of_options(),
                               *req.checked(requests, (req.UNAME_R, req.NAME_VERSION), self.name)]

    def firmware_argv(self, names: list[str], cache_only: bool) -> list[str]:
        """repoquery over the file lists: dnf 4 loads them only when asked (optional_metadata_types;
        older dnf 4 warns that it does not know the option, and loads them anyway)."""
        paths = [FIRMWARE_DIR + n + sfx for n in req.firmware_names(names) for sfx in FIRMWARE_SUFFIXES]
        return self._base() + (["-C"] if cache_only else []) + [
            "--setopt=optional_metadata_types=filelists", "repoquery", f"--queryformat={FIRMWARE_QUERYFORMAT}",
            *(f"--whatprovides={p}" for p in paths)]

    # --- the protocol ------------------------------------------------------------------------

    def is_installed(self, request: str) -> bool:
        return rpm_provides(self.root, request)

    def query(self, requests: list[str], timeout: float | None = None) -> list[Offer]:
        timeout = timeout or self.timeout
        offers = []
        for request in requests:
            res = self._run(self.repoquery_argv(request, f"--queryformat={QUERYFORMAT[self.name]}"), timeout)
            if res.returncode != 0:
                raise KmodguardError(f"{self.name} repoquery failed for {request!r}: {_last_line(res)}",
                                     hint="check the repositories ('dnf repolist') and the network, then run again")
            rows = [line.split("\t") for line in res.stdout.splitlines() if line.count("\t") == 2]
            skipped = [line.split(":", 1)[1].strip() for line in res.stderr.splitlines()
                       if line.startswith("Ignoring repositories:")]
            if not rows and skipped:  # skip_if_unavailable: "not found" would be a guess
                raise KmodguardError(f"{self.name} could not reach the repositories {', '.join(skipped)}, so it "
                                     f"cannot tell whether {request!r} is available",
                                     hint="check the repositories ('dnf repolist') and the network, then run again")
            if not rows:
                offers.append(Offer(request, False))
                continue
            nevra, dl, inst = sorted(rows)[-1]
            offers.append(Offer(request, True, nevra, _int(dl), _int(inst)))
        return offers

    def wait_for_lock(self, lock_wait: float, progress: Progress) -> None:
        """Wait (bounded) while another process (cloud-init's packages:, dnf-automatic) holds rpm's lock."""
        deadline = time.monotonic() + lock_wait
        told = False
        for path in rpm_lock_files(self.root):
            if not path.exists():
                continue
            while True:
                with open(path, "rb") as f:
                    try:
                        fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        fcntl.lockf(f, fcntl.LOCK_UN)
                        break
                    except OSError:
                        pass
                if time.monotonic() >= deadline:
                    raise Busy(f"the package database ({path}) stayed locked for {lock_wait:.0f} s",
                               hint="another package manager is running (cloud-init, dnf-automatic?); "
                                    "run 'kmodguard fix' again when it is done")
                if not told:
                    progress(f"waiting for the package lock {path} (up to {lock_wait:.0f} s)")
                    told = True
                time.sleep(0.5)

    def install(self, requests: list[str], *, comment: str, timeout: float, lock_wait: float,
                progress: Progress) -> InstallResult:
        args = self.install_argv(requests, comment)  # checked before anything waits or runs
        self.wait_for_lock(lock_wait, progress)
        progress(f"{self.name}: installing {', '.join(requests)}")
        res = self._run(args, timeout)
        output = res.stdout + res.stderr
        log.info("%s output:\n%s", self.name, output)
        if res.returncode != 0:
            missing = [r for r in requests if f"No match for argument: {r}" in output]
            if missing:
                raise PackageUnavailable(f"no repository has {', '.join(missing)}",
                                         hint=UNAVAILABLE_HINT)
            if any(m in output for m in SIGNATURE_REFUSED):
                raise SignatureRefused(f"{self.name} install failed: it refused the signature of a package for "
                                       f"{', '.join(requests)}: {_last_line(res)}",
                                       hint="kmodguard never turns signature checks off: import the repository's "
                                            "key (gpgkey=) or fix the repository, then run again")
            if "Waiting for process with pid" in output:
                raise Busy(f"{self.name} waited for another package manager and gave up")
            raise KmodguardError(f"{self.name} install failed (exit {res.returncode}): {_last_line(res)}",
                                 hint="the full output is in the journal (kmodguard -v shows it)")
        return InstallResult(tuple(requests), output)


    def refresh(self, timeout: float | None = None) -> None:
        """Metadata marked expired and fetched again (dnf 4 and dnf5 both take makecache --refresh)."""
        res = self._run(self._base() + ["makecache", "--refresh"], timeout or self.timeout)
        if res.returncode != 0:
            raise KmodguardError(f"{self.name} makecache --refresh failed: {_last_line(res)}",
                                 hint="check the repositories ('dnf repolist') and the network, then run again")

    def provides(self, request: str, timeout: float | None = None) -> list[str]:
        res = self._run(self.repoquery_argv(request, "--latest-limit=1", "--provides"), timeout or self.timeout)
        if res.returncode != 0:
            raise KmodguardError(f"{self.name} repoquery --provides failed for {request!r}: {_last_line(res)}")
        return [line.strip() for line in res.stdout.splitlines() if line.strip()]

    def download(self, requests: list[str], destdir: Path, timeout: float) -> list[Path]:
        """`dnf download` (dnf-plugins-core's command in dnf 4, built into dnf5): no install, and
        signatures are checked when the packages are installed, not here (they are only read)."""
        destdir = Path(destdir)
        res = self._run(self.download_argv(requests, destdir), timeout)
        if res.returncode != 0:
            if "No such command: download" in res.stdout + res.stderr:
                raise KmodguardError("dnf has no 'download' command here",
                                     hint="install dnf-plugins-core (dnf 4), or use dnf5")
            if "No package" in res.stdout + res.stderr or "No match" in res.stdout + res.stderr:
                raise PackageUnavailable(f"no repository has {', '.join(requests)}", hint=UNAVAILABLE_HINT)
            raise KmodguardError(f"{self.name} download failed: {_last_line(res)}")
        return sorted(destdir.glob("*.rpm"))


    def firmware_providers(self, names: list[str], *, cache_only: bool, timeout: float | None = None):
        from . import FirmwareLookup

        args = self.firmware_argv(names, cache_only)
        res = self._run(args, timeout or self.timeout)
        if res.returncode != 0 and cache_only and _no_cache(res):  # dnf5 stops where dnf 4 skips the repository
            return FirmwareLookup({}, {}, _no_cache_note(self.name, res))
        if res.returncode != 0:
            raise KmodguardError(f"{self.name} repoquery for firmware files failed: {_last_line(res)}")
        wanted = {FIRMWARE_DIR + n + sfx: n for n in names for sfx in FIRMWARE_SUFFIXES}
        providers: dict[str, set[str]] = {}
        versions: dict[str, str] = {}
        current = None
        for line in res.stdout.splitlines():
            if line.startswith("@@"):
                name, _, evr = line[2:].partition("\t")
                current = name if req.NAME_RE.fullmatch(name) and len(name) <= req.MAX else None
                if current:
                    versions[current] = evr if req.VERSION_RE.fullmatch(evr) else ""
            elif current and line in wanted:
                providers.setdefault(wanted[line], set()).add(current)
        notes = []
        skipped = sorted({r.strip().strip("'") for line in res.stderr.splitlines()
                          for r in (line.split(":", 1)[1].split(",") if line.startswith("Ignoring repositories:")
                                    else ())})
        if skipped:
            how = ("its cache has no metadata for them, and status and explain do not reach the network: "
                   f"run '{self.name} makecache'" if cache_only else "they could not be reached")
            notes.append(f"{self.name} ignored the repositories {', '.join(skipped)} ({how})")
        if cache_only:
            bare = self.repos_without_filelists()
            if bare:
                notes.append(f"{self.name}'s cache of {', '.join(bare)} holds no file lists, so it cannot tell which "
                             f"package has a firmware file without the network: run '{self.name} makecache "
                             "--setopt=optional_metadata_types=filelists', or 'kmodguard fix --dry-run'")
        return FirmwareLookup({n: tuple(sorted(p)) for n, p in providers.items()}, versions,
                              "; ".join(notes) or None)

    def announcements_argv(self, how: str, option: str, cache_only: bool) -> list[str]:
        return self._base() + (["-C"] if cache_only else []) + [
            "repoquery", f"--queryformat=@@%{{name}}\t%{{evr}}\n%{{{how}}}\n", option]

    def driver_announcements(self, *, cache_only: bool, timeout: float | None = None):
        """Packages with modalias(...) provides (third-party kmod packages) or supplements (SUSE
        KMPs and firmware; libsolv shows a flavoured one as '(kernel-default and
        namespace:modalias(...))'): two repoquery runs, metadata only."""
        from . import Announcement, Announcements

        items, notes = [], []
        # a flavoured supplement is libsolv's '(kernel-default and namespace:modalias(...))', which
        # no glob of --whatsupplements matches: every package with supplements, filtered here
        for how, option in (("provides", "--whatprovides=modalias(*)"), ("supplements", "--whatsupplements=*")):
            res = self._run(self.announcements_argv(how, option, cache_only), timeout or self.timeout)
            if res.returncode != 0 and cache_only and _no_cache(res):
                notes.append(_no_cache_note(self.name, res))
                break
            if res.returncode != 0:
                raise KmodguardError(f"{self.name} repoquery for modalias() {how} failed: {_last_line(res)}")
            current = None
            for line in res.stdout.splitlines():
                if line.startswith("@@"):
                    name, _, evr = line[2:].partition("\t")
                    ok = req.NAME_RE.fullmatch(name) and len(name) <= req.MAX and req.VERSION_RE.fullmatch(evr)
                    current = (name, evr) if ok else None
                elif current:
                    flavoured = dict((p, f) for f, p in FLAVOURED_DEP.findall(line))
                    items += [Announcement(*current, p, how, flavoured.get(p, "")) for p in MODALIAS_DEP.findall(line)
                              if MODALIAS_PATTERN.fullmatch(p) and "#" not in p]
            if any(line.startswith("Ignoring repositories:") for line in res.stderr.splitlines()) and not notes:
                notes.append(f"{self.name} ignored some repositories (no cached metadata: run '{self.name} makecache')")
        return Announcements(tuple(dict.fromkeys(items)), "; ".join(notes) or None)

    def _cached_repodata(self) -> list[tuple[str, str]]:
        """(cache directory name, its repodata directory) for each repository in dnf's cache."""
        top = self.root / CACHE_DIRS[self.name]
        try:
            entries = sorted(os.scandir(top), key=lambda e: e.name)
        except OSError:
            return []
        return [(e.name, os.path.join(e.path, "repodata")) for e in entries]

    def metadata_revision(self) -> str | None:
        """Which repository metadata dnf's cache holds now (each repomd.xml's path, size, mtime):
        what the repositories announce is cached per this, and re-read when it changes."""
        marks = []
        for name, repodata in self._cached_repodata():
            try:
                st = os.stat(os.path.join(repodata, "repomd.xml"))
            except OSError:
                continue
            marks.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        return f"{self.name}|{self.root}|" + ",".join(marks) if marks else None

    def repos_without_filelists(self) -> list[str]:
        """Repositories whose cached metadata (repomd.xml) came without the file lists."""
        bare = []
        for name, repodata in self._cached_repodata():
            try:
                files = os.listdir(repodata)
            except OSError:
                continue
            if "repomd.xml" in files and not any("filelists" in f for f in files):
                bare.append(name.rsplit("-", 1)[0])
        return bare


# what dnf 4 and dnf5 print when a package's signature is refused
SIGNATURE_REFUSED = ("GPG check FAILED", "is not signed", "Public key for",
                     "Signature verification failed", "OpenPGP check for package")

UNAVAILABLE_HINT = ("the package for the running kernel has left the repositories (this happens after newer "
                    "kernels are published); either install it from a local package file "
                    "('dnf install ./kernel-modules-KVER.rpm'), or update the kernel ('dnf upgrade kernel'), "
                    "reboot into it, and run kmodguard again")


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


# dnf5's words when -C finds a repository it has never cached (libdnf5 RepoError; exit 1), where
# dnf 4 says "Ignoring repositories: ..." and goes on
_NO_CACHE = re.compile(r'Cache-only enabled but no cache for (?:repository )?["\']([A-Za-z0-9_.:-]{1,200})["\']')


def _no_cache(res) -> bool:
    return bool(_NO_CACHE.search(res.stderr or "") or _NO_CACHE.search(res.stdout or ""))


def _no_cache_note(name: str, res) -> str:
    repos = sorted(set(_NO_CACHE.findall((res.stderr or "") + (res.stdout or ""))))
    return (f"{name}'s cache has no metadata for the repositories {', '.join(repos)}, and status and explain do not "
            f"reach the network: run '{name} makecache'")
