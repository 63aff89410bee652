"""zypper, for SUSE's kernel-default on kernel-default-base systems.

The request is SUSE's exact version, `kernel-default = VERSION-RELEASE`; kernel-default replaces
kernel-default-base of the same version (it obsoletes it), which zypper's solver does by itself.
Another root: `--root ROOT`, and ZYPP_LOCKFILE_ROOT=ROOT so that the zypp lock is the root's
(ROOT/run/zypp.pid), not this machine's. kmodguard waits for that lock itself, within lock_wait:
zypper 1.14 waits on a held lock without end and ignores SIGTERM meanwhile.
"""

from __future__ import annotations

import configparser
import fcntl
import gzip
import lzma
import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

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


# What zypper is asked for: SUSE's exact versions, and firmware packages by their exact name.
FORMS = (req.UNAME_R, req.NAME_VERSION, req.NAME)
# Firmware: SUSE keeps it in /lib/firmware (older releases) or /usr/lib/firmware, xz- or zstd-compressed.
FIRMWARE_DIRS = ("/usr/lib/firmware/", "/lib/firmware/")
FIRMWARE_SUFFIXES = ("", ".xz", ".zst")
# what libzypp's rpm-md metadata holds of a package's files: primary.xml's short list only
PRIMARY_ONLY = ("zypper's repository metadata lists only a package's files under /etc and the bin directories "
                "(libzypp reads primary.xml, never filelists.xml), so a package that holds the firmware may exist "
                "without zypper knowing it")
# zypper search -v: a table row 'S | Name | Type | Version | Arch | Repository', then what matched
_MATCH_LINE = re.compile(r"^\s+provides: (\S+)")
RAW_CACHE = "var/cache/zypp/raw"
RPM_NS = {"c": "http://linux.duke.edu/metadata/common", "rpm": "http://linux.duke.edu/metadata/rpm",
          "repo": "http://linux.duke.edu/metadata/repo"}
PRIMARY_CAP = 2 << 30  # bytes of uncompressed primary.xml read from one repository, at most


class ZypperBackend:
    name = "zypper"
    unavailable_hint = UNAVAILABLE_HINT

    def __init__(self, root: Path = Path("/"), timeout: float = 900.0, lock_wait: float = 300.0,
                 firmware_packages: tuple[str, ...] = ()):
        # the firmware allow-list again: a bare package name is taken only when it admits it
        self.firmware_packages = tuple(firmware_packages)
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

    def _name_allowed(self, name: str) -> bool:
        from ..config import name_matches

        return any(name_matches(name, e) for e in self.firmware_packages)

    def install_argv(self, requests: list[str]) -> list[str]:
        """zypper parses with getopt_long: '--' ends its options."""
        return self._base() + ["install", "--no-recommends", "--",
                               *req.checked(requests, FORMS, "zypper", self._name_allowed)]

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
        for request in req.checked(requests, FORMS, "zypper", self._name_allowed):
            parsed = req.parse_any(request, FORMS)
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
        problem = next((line.strip() for line in output.splitlines() if line.startswith("Problem:")), None)
        if res.returncode != 0 and problem:
            # the solver wants a decision (e.g. remove kernel-default-base): kmodguard never takes it for root
            raise KmodguardError(f"zypper cannot install {', '.join(requests)} without a decision: {problem}",
                                 hint=f"run 'zypper install {' '.join(repr(r) for r in requests)}' yourself and "
                                      f"choose a solution, then run kmodguard again")
        if res.returncode != 0:
            raise KmodguardError(f"zypper install failed (exit {res.returncode}): {last_line(res)}",
                                 hint="the full output is in the journal (kmodguard -v shows it)")
        return InstallResult(tuple(requests), output)

    # --- firmware and driver announcements (issue 14) ------------------------------------------

    def firmware_argv(self, names: list[str], cache_only: bool) -> list[str]:
        """One search for every path: zypper ORs its terms, and -v says which provide matched."""
        paths = [d + n + sfx for n in req.firmware_names(names) for d in FIRMWARE_DIRS for sfx in FIRMWARE_SUFFIXES]
        return (self._base() + (["--no-refresh"] if cache_only else [])
                + ["search", "-v", "--provides", "--match-exact", "--", *paths])

    def firmware_providers(self, names: list[str], *, cache_only: bool, timeout: float | None = None):
        """The packages that provide /usr/lib/firmware/NAME or /lib/firmware/NAME (any compression),
        as zypper's own search answers (cache_only: --no-refresh, zypper reaches no repository)."""
        from . import BY_HAND, FirmwareLookup

        args = self.firmware_argv(names, cache_only)
        self.wait_for_lock(self.lock_wait, lambda m: None)
        res = run(args, timeout or self.timeout, "zypper search", self._env())
        if res.returncode not in (0, ZYPPER_EXIT_INF_CAP_NOT_FOUND):
            raise KmodguardError(f"zypper search for firmware files failed (exit {res.returncode}): {last_line(res)}",
                                 hint="check the repositories ('zypper repos'), then run again")
        wanted = {d + n + sfx: n for n in names for d in FIRMWARE_DIRS for sfx in FIRMWARE_SUFFIXES}
        providers: dict[str, set[str]] = {}
        versions: dict[str, str] = {}
        current = None
        for line in res.stdout.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) == 6 and cells[2] == "package":
                name, version = cells[1], cells[3]
                ok = req.NAME_RE.fullmatch(name) and len(name) <= req.MAX and not cells[0].startswith("i")
                current = name if ok else None
                if current:
                    versions[current] = version if req.VERSION_RE.fullmatch(version) else ""
                continue
            m = _MATCH_LINE.match(line)
            if current and m and m[1] in wanted:
                providers.setdefault(wanted[m[1]], set()).add(current)
        notes = []
        if set(names) - set(providers):
            notes.append(f"{PRIMARY_ONLY}: {BY_HAND['zypper']}")
        if "Repository '" in res.stderr and "is out-of-date" in res.stderr and cache_only:
            notes.append("zypper's cache of some repositories is out of date; status and explain do not reach the "
                         "network: run 'zypper refresh'")
        return FirmwareLookup({n: tuple(sorted(p)) for n, p in providers.items()},
                              {p: v for p, v in versions.items() if any(p in s for s in providers.values())},
                              "; ".join(notes) or None)

    def _enabled_repos(self) -> list[str]:
        """The aliases of the enabled repositories (ROOT/etc/zypp/repos.d/*.repo)."""
        aliases = []
        for path in sorted((self.root / "etc/zypp/repos.d").glob("*.repo")):
            parser = configparser.ConfigParser(interpolation=None, strict=False)
            try:
                parser.read(path, encoding="utf-8")
            except (configparser.Error, OSError, UnicodeError):
                continue
            for alias in parser.sections():
                if parser.get(alias, "enabled", fallback="1").strip() in ("1", "yes", "true", "on"):
                    aliases.append(alias)
        return aliases

    def _primary(self, alias: str) -> Path | None:
        """The cached primary.xml of one repository, as its cached repomd.xml names it."""
        top = self.root / RAW_CACHE / alias
        if "/" in alias or alias.startswith("."):
            return None
        try:
            md = ET.parse(top / "repodata/repomd.xml")
        except (OSError, ET.ParseError):
            return None
        for data in md.getroot().findall("repo:data", RPM_NS):
            loc = data.find("repo:location", RPM_NS)
            href = loc.get("href", "") if loc is not None else ""
            if data.get("type") == "primary" and href.startswith("repodata/") and ".." not in href:
                return top / href
        return None

    def _open_primary(self, path: Path):
        if path.name.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.name.endswith(".xz"):
            return lzma.open(path, "rb")
        if path.name.endswith(".zst"):  # Tumbleweed's: rpm's own zstd reader (python3-rpm, which zypper needs)
            return _RpmFd(path)
        if path.name.endswith(".xml"):
            return open(path, "rb")
        return None  # others: said in the note

    def driver_announcements(self, *, cache_only: bool, timeout: float | None = None):
        """modalias() provides (third-party kmod packages) and supplements (SUSE KMPs and
        kernel-firmware-*), read from the primary.xml in zypper's raw metadata cache: the raw
        dependency strings, which zypper's own search cannot match (libsolv turns a supplement
        into 'namespace:modalias(...)', and 'zypper search --supplements' matches no glob against
        it). A cache file, so status and explain reach no network either way; 'zypper refresh'
        (which fix runs before it calls a package unavailable) keeps it current."""
        from . import Announcements

        items, notes, read = [], [], 0
        for alias in self._enabled_repos():
            path = self._primary(alias)
            try:
                stream = self._open_primary(path) if path is not None and path.is_file() else None
            except (ImportError, OSError):  # no python3-rpm for a .zst, or the file went away
                stream = None
            if stream is None:
                notes.append(f"zypper's cache holds no readable primary metadata of repository {alias!r} "
                             f"({path.name if path else 'none'}): run 'zypper refresh'")
                continue
            read += 1
            with stream:
                try:
                    items += _announcements(_Capped(stream, PRIMARY_CAP))
                except (ET.ParseError, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
                    notes.append(f"zypper's cached primary metadata of {alias!r} is unreadable ({exc})")
        return Announcements(tuple(dict.fromkeys(items)), "; ".join(notes) or None)

    def metadata_revision(self) -> str | None:
        """Which repository metadata zypper's cache holds now (each repomd.xml's size and mtime)."""
        marks = []
        for alias in self._enabled_repos():
            try:
                st = os.stat(self.root / RAW_CACHE / alias / "repodata/repomd.xml")
            except OSError:
                continue
            marks.append(f"{alias}:{st.st_size}:{st.st_mtime_ns}")
        return f"zypper|{self.root}|" + ",".join(marks) if marks else None


class _RpmFd:
    """A zstd file read through rpm's fd layer, as a binary stream (a context manager)."""

    def __init__(self, path: Path):
        import rpm  # only here: the other backends do not need it

        self._fd = rpm.fd.open(str(path), "r", "zstd")

    def read(self, n: int = -1) -> bytes:
        return self._fd.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fd.close()


class _Capped:
    """A file object that refuses to read past cap bytes (a decompression bomb in the cache)."""

    def __init__(self, f, cap: int):
        self.f, self.left = f, cap

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise ValueError("primary.xml is larger than kmodguard reads")
        data = self.f.read(min(n if n >= 0 else self.left, self.left))
        self.left -= len(data)
        return data


def modalias_dependency(text: str) -> tuple[str, str] | None:
    """(flavour, pattern) of 'modalias(PATTERN)' or SUSE's 'modalias(kernel-default:PATTERN)';
    SUSE's dependency generator %XX-encodes characters a dependency cannot hold (',' is %2C):
    decoded here, then the pattern is checked as every announced pattern is."""
    from .dnf import FLAVOUR_RE, MODALIAS_PATTERN

    if not (text.startswith("modalias(") and text.endswith(")")) or len(text) > 600:
        return None
    inner = text[len("modalias("):-1]
    flavour = ""
    head, sep, rest = inner.partition(":")
    if sep and FLAVOUR_RE.fullmatch(head):
        flavour, inner = head, rest
    pattern = unquote(inner, errors="strict") if "%" in inner else inner
    if not MODALIAS_PATTERN.fullmatch(pattern) or "#" in pattern or "(" in pattern or ")" in pattern:
        return None
    return flavour, pattern


def _announcements(stream) -> list:
    """Announcements of every package in one primary.xml (streamed: it may be hundreds of MB)."""
    from . import Announcement

    out = []
    pkg = "{%s}package" % RPM_NS["c"]
    for _, elem in ET.iterparse(stream, events=("end",)):
        if elem.tag != pkg:
            continue
        name = elem.findtext("c:name", "", RPM_NS)
        ver = elem.find("c:version", RPM_NS)
        evr = ""
        if ver is not None:
            epoch = ver.get("epoch", "0")
            evr = (f"{epoch}:" if epoch not in ("", "0") else "") + f"{ver.get('ver', '')}-{ver.get('rel', '')}"
        fmt = elem.find("c:format", RPM_NS)
        if (fmt is not None and req.NAME_RE.fullmatch(name) and len(name) <= req.MAX
                and req.VERSION_RE.fullmatch(evr)):
            for how in ("provides", "supplements"):
                for entry in fmt.findall(f"rpm:{how}/rpm:entry", RPM_NS):
                    dep = modalias_dependency(entry.get("name", ""))
                    if dep:
                        out.append(Announcement(name, evr, dep[1], how, dep[0]))
        elem.clear()
    return out


def _signature_line(output: str) -> str:
    return next((line.strip() for line in output.splitlines() if any(m in line for m in SIGNATURE_REFUSED)), "")
