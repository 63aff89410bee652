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
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import Busy, InvalidInput, KmodguardError, PackageUnavailable, SignatureRefused
from ..fsutil import read_capped, write_atomic
from ..process import OUTPUT_CAP
from . import InstallResult, Offer, Progress
from ._run import last_line, run
from .. import requests as req

# what apt-get update prints for a Release file whose signature it refused
# (with lists from before, apt keeps them and only warns: "W: An error occurred during the signature
# verification. The repository is not updated and the previous index files will be used. GPG error: ...")
# (patterns, compiled at their first use by re's cache: status imports this module, never uses them)
_SIGNATURE_REFUSED = r"(?m)(?:GPG error: (\S+ \S+)|^E: The repository '([^']*)' is not signed\.)"
_FETCH_FAILED = r"(?m)^(?:E|W): Failed to fetch (\S+)"

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


def _name(request: str, names_allowed=None) -> str:
    """A request parsed again, as apt-get spells it: NAME-KVER (linux-modules-extra-KVER) as it is;
    NAME = VERSION (a package a repository announces) as apt's NAME=VERSION; a firmware package's
    bare name when names_allowed (the firmware allow-list) admits it. apt-get takes no other form."""
    forms = (req.NAME_KVER, req.NAME_VERSION) + ((req.NAME,) if names_allowed is not None else ())
    (text,) = req.checked([request], forms, "apt-get", names_allowed)
    parsed = req.parse_any(text, forms)
    return f"{parsed.package}={parsed.version}" if parsed.form == req.NAME_VERSION else text


def _package(request: str, names_allowed=None) -> tuple[str, str | None]:
    """(package name, exact version or None) of a request, for dpkg-query."""
    name, _, version = _name(request, names_allowed).partition("=")
    return name, version or None


def install_argv(names: list[str], opts: list[str], lock_wait: float, names_allowed=None) -> list[str]:
    return ["apt-get", *opts, "-y", "-q", "--no-install-recommends", "-o", f"DPkg::Lock::Timeout={int(lock_wait)}",
            "install", "--", *[_name(n, names_allowed) for n in names]]


# Firmware: Debian 12 ships it in /lib/firmware, later releases in /usr/lib/firmware; uncompressed
FIRMWARE_DIRS = ("lib/firmware/", "usr/lib/firmware/")  # as Contents files spell paths
FIRMWARE_SUFFIXES = ("", ".xz", ".zst")
MAX_POLICY_ARGS = 2000  # Debian's Contents name tens of packages under lib/firmware: one short command line
# apt-get indextargets: one line per index target of the enabled sources
TARGET_FORMAT = "$(IDENTIFIER)\t$(COMPONENT)\t$(FILENAME)"
TARGETS_CACHE = "apt-indextargets.json"  # in STATE_DIR
TARGETS_CACHE_CAP = 4 << 20
NO_CONTENTS = ("apt has no Contents indices of the enabled sources (apt-file's configuration enables them: "
               "install apt-file and run 'apt-get update')")


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

    def __init__(self, root: Path = Path("/"), timeout: float = 900.0, firmware_packages: tuple[str, ...] = (),
                 cache_dir: Path | None = None):
        # the firmware allow-list again: a bare package name is taken only when it admits it
        self.firmware_packages = tuple(firmware_packages)
        self.root = Path(root)
        self.cache_dir = cache_dir  # STATE_DIR: indextargets kept there while apt's configuration stays
        self.timeout = timeout  # for queries and refreshes; an install gets its own
        self._firmware_cache = None  # _firmware_table, until the lists are refreshed
        self._targets_cache = None  # apt-get indextargets, until the lists are refreshed
        self._versions: dict[str, str] = {}  # firmware package -> candidate version, until then too

    def _name_allowed(self, name: str) -> bool:
        from ..config import name_matches

        return any(name_matches(name, e) for e in self.firmware_packages)

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
        name, version = _package(request, self._name_allowed)
        res = run([shutil.which("dpkg-query") or "dpkg-query", *(["--root", str(self.root)] if self.root != Path("/") else []),
                   "-W", "-f", "${db:Status-Status} ${Version}", "--", name], 60, "dpkg-query")
        status, _, have = res.stdout.strip().partition(" ")
        return res.returncode == 0 and status == "installed" and (version is None or have == version)

    def refresh(self, timeout: float | None = None) -> None:
        """apt-get update in the target root. SignatureRefused when a repository's Release
        signature is refused (apt then drops that repository); KmodguardError when one is unreachable."""
        self._firmware_cache = self._targets_cache = None  # the lists change: read them again when asked
        self._versions = {}
        res = self._apt(["apt-get", "-q", "update"], timeout or self.timeout, "apt-get update")
        output = res.stdout + res.stderr
        refused = sorted({a or b for a, b in re.findall(_SIGNATURE_REFUSED, output)})
        if refused:
            raise SignatureRefused(f"apt refused the signature of {', '.join(refused)}, so kmodguard cannot tell "
                                   f"which packages it holds",
                                   hint="the repository's Release file is not signed by a key its source trusts "
                                        "(signed-by=): fix the key or the repository, run 'apt-get update', then "
                                        "run kmodguard again; kmodguard never turns signature checks off")
        if "Could not get lock" in output:
            raise Busy("apt's lists lock stayed held", hint="another package manager is running; try again later")
        failed = sorted(set(re.findall(_FETCH_FAILED, output)))
        if res.returncode != 0 or failed:
            raise KmodguardError(f"apt-get update could not refresh the package lists"
                                 f"{' (' + ', '.join(failed) + ')' if failed else ''}: {_error_line(res)}",
                                 hint="check the sources ('apt-cache policy') and the network, then run again")

    def query(self, requests: list[str], timeout: float | None = None) -> list[Offer]:
        offers = []
        for request in requests:
            res = self._apt(["apt-cache", "show", "--no-all-versions", "--", _name(request, self._name_allowed)],
                            timeout or self.timeout,
                            "apt-cache")
            fields = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line and line[0] != " ")
            if res.returncode != 0 or "Version" not in fields:
                offers.append(Offer(request, False))
                continue
            size = int(fields["Size"]) if fields.get("Size", "").isdigit() else None
            inst = int(fields["Installed-Size"]) * 1024 if fields.get("Installed-Size", "").isdigit() else None
            offers.append(Offer(request, True, f"{_package(request, self._name_allowed)[0]}_{fields['Version']}",
                                size, inst))
        return offers

    def install(self, requests: list[str], *, comment: str, timeout: float, lock_wait: float,
                progress: Progress) -> InstallResult:
        names = [_name(r, self._name_allowed) for r in requests]
        progress(f"apt-get: installing {', '.join(names)}")
        res = self._apt(install_argv(list(requests), self._opts(), lock_wait, self._name_allowed), timeout, "apt-get")
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

    # --- firmware (issue 14) ---------------------------------------------------------------------

    def _targets(self, timeout: float) -> list[tuple[str, str, str]]:
        """(identifier, component, file) of every index target apt has for the enabled sources;
        asked once per backend (apt builds its whole cache for it: 0.7 s where the image disables
        pkgcache.bin, as Debian's docker images do)."""
        if self._targets_cache is None:
            key = self._targets_key()
            targets = self._load_targets(key)
            if targets is None:
                res = self._apt(["apt-get", "indextargets", "--format", TARGET_FORMAT], timeout, "apt-get indextargets")
                if res.returncode != 0:
                    raise KmodguardError(f"apt-get indextargets failed: {_error_line(res)}")
                targets = [tuple(line.split("\t")) for line in res.stdout.splitlines() if line.count("\t") == 2]
                self._save_targets(key, targets)
            self._targets_cache = targets
        return self._targets_cache

    def _targets_key(self) -> str:
        """What indextargets' answer depends on: the sources, apt's configuration, the lists and
        dpkg's architectures (each file's name, size and mtime; a stat each, no parsing)."""
        etc = self.root / "etc/apt"
        paths = [etc / "sources.list", etc / "apt.conf", self.root / "var/lib/dpkg/arch"]
        for d in (etc / "sources.list.d", etc / "apt.conf.d", self.root / "var/lib/apt/lists"):
            try:
                paths += sorted(d.iterdir())
            except OSError:
                continue
        marks = [f"apt-indextargets|{self.root}|{os.environ.get('APT_CONFIG', '')}"]
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            marks.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        return "\n".join(marks)

    def _load_targets(self, key: str) -> list[tuple[str, str, str]] | None:
        if self.cache_dir is None:
            return None
        lists = f"{self.root / 'var/lib/apt/lists'}/"
        try:
            doc = json.loads(read_capped(Path(self.cache_dir) / TARGETS_CACHE, TARGETS_CACHE_CAP, follow=False))
        except (KmodguardError, OSError, ValueError, RecursionError):  # a bad cache is only a cache miss
            return None
        if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("targets"), list):
            return None
        targets = doc["targets"]
        if not all(isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) and x.isprintable() for x in t)
                   and t[2].startswith(lists) and "/../" not in t[2] for t in targets):
            return None
        return [tuple(t) for t in targets]

    def _save_targets(self, key: str, targets: list) -> None:
        """Best effort: a user's status cannot write STATE_DIR, and need not."""
        if self.cache_dir is None or not os.access(self.cache_dir, os.W_OK):
            return
        try:
            write_atomic(Path(self.cache_dir) / TARGETS_CACHE,
                         json.dumps({"key": key, "targets": [list(t) for t in targets]}).encode(), durable=False)
        except OSError:
            pass

    @functools.cached_property
    def _debian(self) -> bool:
        """Debian itself (not a derivative): read once, `explain -` asks for hundreds of modules."""
        try:
            text = (self.root / "etc/os-release").read_text(errors="replace")
        except OSError:
            return False
        return any(line.strip() in ("ID=debian", 'ID="debian"') for line in text.splitlines())

    def firmware_providers(self, names: list[str], *, cache_only: bool, timeout: float | None = None):
        """The packages whose Contents entries hold lib/firmware/NAME or usr/lib/firmware/NAME (any
        compression): apt's own Contents indices (what apt-file reads: Contents-deb targets, fetched
        by apt-get update once apt-file's configuration enables them), read with apt-helper
        cat-file. A cache: status and explain reach no network either way."""
        from . import BY_HAND, FirmwareLookup

        timeout = timeout or self.timeout
        table, components, has_contents = self._firmware_table(timeout)
        notes = [] if has_contents else [f"{NO_CONTENTS}: {BY_HAND['apt']}"]
        providers: dict[str, set[str]] = {}
        for n in req.firmware_names(names):
            for path in (d + n + sfx for d in FIRMWARE_DIRS for sfx in FIRMWARE_SUFFIXES):
                if path in table:
                    providers.setdefault(n, set()).update(table[path])
        if self._debian and "non-free-firmware" not in components:
            notes.append("no enabled APT source has Debian's non-free-firmware component, where its firmware-* "
                         "packages are: add it to the sources (e.g. 'Components: main non-free-firmware') and run "
                         "'apt-get update'")
        wanted = set().union(*providers.values()) if providers else set()
        if wanted - self._versions.keys():
            # every firmware package at once: asked once a module, apt-cache would load its cache each time
            every = set().union(wanted, *table.values())
            ask = every if len(every) <= MAX_POLICY_ARGS else wanted
            self._versions.update(self._candidate_versions(sorted(ask - self._versions.keys()), timeout))
        versions = {p: self._versions.get(p, "") for p in wanted}
        return FirmwareLookup({n: tuple(sorted(p)) for n, p in providers.items()}, versions, "; ".join(notes) or None)

    def _firmware_table(self, timeout: float) -> tuple[dict[str, set[str]], set[str], bool]:
        """Every firmware path of the Contents indices and its packages, the enabled components, and
        whether there are Contents indices at all: read once per backend (a Contents index is tens
        of MB; `explain -` over thousands of modaliases asks for many modules' firmware)."""
        if self._firmware_cache is None:
            targets = self._targets(timeout)
            contents = [f for ident, _, f in targets if ident.startswith("Contents-deb") and os.path.isfile(f)]
            table: dict[str, set[str]] = {}
            if contents:
                helper = shutil.which("apt-helper") or "/usr/lib/apt/apt-helper"
                # a Contents index is hundreds of MB: only its firmware lines are kept
                res = run([helper, "cat-file", "--", *contents], timeout, "apt-helper cat-file",
                          keep_lines=tuple(d.encode() for d in FIRMWARE_DIRS))
                if res.returncode != 0:
                    raise KmodguardError(f"apt-helper cat-file could not read the Contents indices: {last_line(res)}")
                for line in res.stdout.splitlines():
                    fields = line.rsplit(None, 1)  # 'PATH<blanks>section/pkg,section/pkg'
                    if len(fields) != 2:
                        continue
                    path, where = fields
                    pkgs = {item.rsplit("/", 1)[-1] for item in where.split(",")}
                    table[path] = {p for p in pkgs if req.NAME_RE.fullmatch(p) and len(p) <= req.MAX}
            components = {c for ident, c, _ in targets if ident == "Packages"}
            self._firmware_cache = (table, components, bool(contents))
        return self._firmware_cache

    def _candidate_versions(self, packages: list[str], timeout: float) -> dict:
        """Each package's candidate version ('' when apt has none)."""
        if not packages:
            return {}
        versions = dict.fromkeys(packages, "")
        res = self._apt(["apt-cache", "policy", "--", *packages], timeout, "apt-cache policy")
        current = None
        for line in res.stdout.splitlines():
            if line and not line[0].isspace() and line.endswith(":"):
                current = line[:-1] if line[:-1] in versions else None
            elif current and line.strip().startswith("Candidate:"):
                v = line.split(":", 1)[1].strip()
                versions[current] = v if req.VERSION_RE.fullmatch(v) else ""
        return versions

    # --- driver announcements (issue 14) --------------------------------------------------------

    def _package_lists(self, timeout: float) -> list[str]:
        return [f for ident, _, f in self._targets(timeout) if ident == "Packages" and os.path.isfile(f)]

    def driver_announcements(self, *, cache_only: bool, timeout: float | None = None):
        """Debian's `Modaliases: module(alias, alias), module2(...)` field (dh_modaliases: DKMS and
        other driver packages) in apt's package lists, read with apt-helper cat-file: a cache, so
        nothing reaches the network. Shown as 'provides' (the field is what the package provides)."""
        from . import Announcement, Announcements

        timeout = timeout or self.timeout
        lists = self._package_lists(timeout)
        if not lists:
            return Announcements((), "apt has no package lists of the enabled sources: run 'apt-get update'")
        helper = shutil.which("apt-helper") or "/usr/lib/apt/apt-helper"
        # Debian's main list is ~90 MB, far over the output cap: only the three fields are kept
        res = run([helper, "cat-file", "--", *lists], timeout, "apt-helper cat-file", keep_lines=LIST_FIELDS)
        if res.returncode != 0:
            raise KmodguardError(f"apt-helper cat-file could not read the package lists: {last_line(res)}")
        note = None
        if len(res.stdout) >= OUTPUT_CAP - 65536:
            note = "apt's package lists are too large to read whole: some Modaliases fields may be missed"
        items, name, version = [], "", ""
        for line in res.stdout.splitlines():  # each stanza begins with its Package field
            key, _, value = line.partition(": ")
            if key == "Package":
                name, version = value.strip(), ""
            elif key == "Version":
                version = value.strip()
            elif key == "Modaliases" and req.NAME_RE.fullmatch(name) and len(name) <= req.MAX \
                    and req.VERSION_RE.fullmatch(version):
                items += [Announcement(name, version, pattern, "provides") for pattern in modaliases_field(value)]
        return Announcements(tuple(dict.fromkeys(items)), note)

    def metadata_revision(self) -> str | None:
        """Which package lists apt holds now (each list file's size and mtime)."""
        marks = []
        for f in sorted((self.root / "var/lib/apt/lists").glob("*_Packages*")):
            try:
                st = f.stat()
            except OSError:
                continue
            marks.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        return f"apt|{self.root}|" + ",".join(marks) if marks else None


LIST_FIELDS = (b"Package: ", b"Version: ", b"Modaliases: ")  # what announcements need of a package list
_MODALIASES_ITEM = r"([A-Za-z0-9_-]+)\(([^()]*)\)"


def modaliases_field(value: str) -> list[str]:
    """The patterns of a Modaliases field: 'mod(a1, a2), mod2(a3)'; aliases are separated by ', '
    (an of: alias may hold a bare ','). Each checked as every announced pattern is."""
    from .dnf import MODALIAS_PATTERN

    out = []
    for _module, inner in re.findall(_MODALIASES_ITEM, value[:65536]):
        for pattern in (p.strip() for p in inner.split(", ")):
            if MODALIAS_PATTERN.fullmatch(pattern) and "#" not in pattern:
                out.append(pattern)
    return out
