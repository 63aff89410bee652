"""From a device (or a bare modalias) to one verdict with its reason, as the Contract
(docs/contract.md) defines them.

Verdicts, first that applies wins: bound, ignored, loadable, missing, unindexed, unknown.
Blacklists are judged over installed and indexed modules together: a blacklisted module does
not count as installed, so a device whose installed matches are all blacklisted is 'missing'
when a not-installed package holds a match nothing blacklists, and 'ignored' only when nothing
anywhere may be loaded.
All matching is libkmod's: the installed module tree with the system's modprobe.d, and each
indexed package's alias table with the package's own modprobe.d.

Over 400 lines on purpose: the verdict order is one chain of checks (each `_..._verdict` hands on
to the next) and reads best whole; the data it reads is elsewhere (index/, kmod/, firmware.py,
repository.py).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from ..config import Config
from ..devices import INTENTIONAL_DRIVERS, Device
from ..errors import InvalidInput, KmodError, KmodguardError
from ..index import modinfo
from ..index.store import KernelIndex, PackageIndex
from ..kmod import Context
from ..memory import no_cyclic_gc
from ..paths import Paths
from .environment import Environment
from .firmware import FirmwareNeed, Lookup, from_announcements, resolve as resolve_firmware
from .remembered import installed_firmware, verified_index

VERDICTS = ("bound", "ignored", "loadable", "missing", "unindexed", "unknown")
NEEDS_ACTION = frozenset({"loadable", "missing"})
MAX_MODALIAS = 4096  # a sysfs attribute is at most one page
VENDOR_DIRS = ("/extra/", "/updates/", "/weak-updates/")  # akmods, DKMS, NVIDIA, kABI weak links


def _shown(text: str) -> str:
    """Quoted and escaped for a message; a byte that was not UTF-8 (surrogateescape) as \\xNN, as sysfs holds it."""
    def one(c: str) -> str:
        if "\udc80" <= c <= "\udcff":
            return f"\\x{ord(c) - 0xDC00:02x}"
        if c in "\\'":
            return "\\" + c
        return c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
    return "'" + "".join(one(c) for c in text) + "'"


_BUS = re.compile(r"[a-z0-9_]+")
_MODALIAS = re.compile(r"[a-z0-9_]+:[!-~]*")
_MODALIAS_LINES = re.compile(r"(?:[a-z0-9_]+:[!-~]*\n)*")  # _MODALIAS, one a line ('\n' is not in [!-~])


def check_modalias(value: str) -> str:
    """A modalias is 'bus:' plus printable ASCII without blanks; anything else is refused."""
    if isinstance(value, str) and len(value) <= MAX_MODALIAS and _MODALIAS.fullmatch(value):
        return value  # the common case, in one C call; the checks below name what is wrong
    if not isinstance(value, str) or not value:
        raise InvalidInput("an empty string is not a modalias")
    if len(value) > MAX_MODALIAS:
        raise InvalidInput(f"modalias is {len(value)} characters long; the kernel never writes more than {MAX_MODALIAS}")
    if not (value.isascii() and value.isprintable()) or " " in value:  # in C; the walk below names the culprit
        bad = next(c for c in value if not ("!" <= c <= "~"))
        what = _shown(bad) + (" (a byte that is not UTF-8)" if "\udc80" <= bad <= "\udcff" else "")
        raise InvalidInput(f"modalias {_shown(value[:60])} contains {what}: only printable ASCII without blanks is allowed")
    bus, sep, _ = value.partition(":")
    if not sep or not _BUS.fullmatch(bus):
        raise InvalidInput(f"{_shown(value[:60])} is not a modalias: it must start with a bus name and ':' (pci:..., usb:...)")
    return value


def check_modaliases(values: list[str]) -> None:
    """check_modalias of each, in order: in a few C calls when all are well formed (the common
    case: `explain -` checks thousands)."""
    try:
        lines = "".join(v + "\n" for v in values)
        if (max(map(len, values), default=0) <= MAX_MODALIAS and lines.count("\n") == len(values)
                and _MODALIAS_LINES.fullmatch(lines)):  # the count: no value holds a '\n' of its own
            return
    except TypeError:
        pass  # not all strings: check_modalias says which
    for value in values:
        check_modalias(value)


class Candidate(NamedTuple):
    module: str | None  # None: a repository's announcement names a package, not its module
    package: str
    version: str
    request: str
    firmware_missing: tuple[str, ...] = ()
    firmware: FirmwareNeed | None = None  # the packages its firmware needs, when none of it is on disk
    origin: str = "index"  # index | repository (a modalias() provide or supplement in its metadata)

    def as_json(self) -> dict:
        doc = {"module": self.module, "package": self.package, "version": self.version,
               "request": self.request, "firmware_missing": list(self.firmware_missing), "origin": self.origin}
        if self.firmware:  # only when none of its firmware is on disk
            doc["firmware"] = self.firmware.as_json()
        return doc


class Verdict(NamedTuple):
    verdict: str
    reason: str
    installed_modules: tuple[str, ...] = ()
    candidates: tuple[Candidate, ...] = ()
    driver: str | None = None
    intentional: bool = False
    builtin: bool = False
    vendor: bool = False
    blacklisted: tuple[str, ...] = ()
    firmware: FirmwareNeed | None = None  # loadable: the installed module's firmware is not on disk

    def as_json(self) -> dict:
        doc = {
            "verdict": self.verdict,
            "reason": self.reason,
            "installed_modules": list(self.installed_modules),
            "candidates": [c.as_json() for c in self.candidates],
        }
        if self.verdict == "bound":
            doc["intentional"] = self.intentional
        if self.verdict == "loadable":
            doc["builtin"] = self.builtin
            doc["vendor"] = self.vendor
        if self.blacklisted:
            doc["blacklisted"] = list(self.blacklisted)
        if self.firmware:
            doc["firmware"] = self.firmware.as_json()
        return doc


def _cmdline_blacklist(paths: Paths) -> frozenset[str]:
    """module_blacklist= (the kernel refuses them) and modprobe.blacklist= from the command line."""
    try:
        words = (paths.proc / "cmdline").read_text(errors="replace").split()
    except OSError:
        return frozenset()
    names = set()
    for word in words:
        if word == "--":  # the rest is init's, not the kernel's
            break
        key, _, value = word.partition("=")
        if key in ("module_blacklist", "modprobe.blacklist"):
            names.update(n.replace("-", "_") for n in value.split(",") if n)
    return frozenset(names)


class Diagnoser:
    """Judges devices for one kernel. Owns libkmod contexts: use from one thread."""

    def __init__(self, paths: Paths, config: Config, environment: Environment):
        self.paths = paths
        self.config = config
        self.environment = environment
        self.installed: Context | None = None
        self.installed_problem: str | None = None
        mdir = paths.installed_modules
        if environment.modules_dir_present:
            try:
                self.installed = Context(mdir, paths.modprobe_dirs)
                self.installed.load_resources()
            except KmodError as exc:
                self.installed = None
                self.installed_problem = f"the module tree {mdir} is unusable ({exc}); run 'depmod {paths.kver}'"
        elif not environment.module_support:
            self.installed_problem = (f"kernel {paths.kver} was built without loadable-module support "
                                      f"(no {paths.proc}/modules) and has no module tree at {mdir}")
        else:
            self.installed_problem = f"there is no module tree at {mdir} (no modules.dep): is this kernel's package installed?"
        self.verified_index = verified_index(paths.state_dir, paths.index_root / paths.kver)
        self.index = KernelIndex(paths.index_root, paths.kver, self.verified_index)
        self._index_answers = self.index.exists and not self.no_module_support
        self.system_blacklist = (self.installed.blacklist() if self.installed else frozenset()) | _cmdline_blacklist(paths)
        self.ignored_modules = frozenset(m.replace("-", "_") for m in config.ignore.modules)
        self._memo: dict[str, Verdict] = {}
        self._by_matches: dict[tuple, Verdict] = {}  # what libkmod matched -> its verdict (_same_matches)
        # installed module names a lookup matched -> (name, path) pairs, kept with the context: the
        # paths (a modules.dep search each, 6 us) are asked of libkmod once a set, not every lookup
        self._installed_pairs: dict[tuple[str, ...], tuple[tuple[str, str | None], ...]] = {}
        self._beyond_matches = False  # the verdict being made read more of its modalias than its matches
        self._fw_memo: dict[tuple[str, str], tuple[str, ...]] = {}
        # names -> FirmwareLookup (the Engine gives one backed by the package manager)
        self.firmware_lookup: Lookup | None = None
        # () -> RepositoryDrivers: the repositories' driver announcements (the Engine gives one)
        self.repository_lookup = None
        self._repository = None
        self._need_memo: dict[tuple[str, tuple[str, ...]], FirmwareNeed | None] = {}
        self._installed_firmware_names: dict[str, tuple[str, ...]] = {}  # module path -> firmware it names
        # the same, remembered from earlier runs (remember() writes what this one read)
        self.installed_firmware = installed_firmware(paths.state_dir, mdir)
        self._builtin_firmware: dict[str, tuple[str, ...]] | None = None  # built-in module -> its firmware
        self._fw_present: frozenset[str] | None = None
        self._loaded: frozenset[str] | None = None

    def remember(self) -> None:
        """Keep what this Diagnoser read from module and index files for the next run (root only)."""
        self.installed_firmware.save()
        self.verified_index.save()

    def new_round(self) -> None:
        """Forget memoised verdicts and firmware: a module may have loaded, firmware may have
        arrived since (the libkmod contexts and indexes stay: callers check those for changes)."""
        self._memo.clear()
        self._by_matches.clear()
        self._fw_memo.clear()
        self._need_memo.clear()
        self._fw_present = None
        self._loaded = None

    def _loaded_modules(self) -> frozenset[str]:
        """The modules the kernel has loaded (SYSFS/module), read once a round, not once a device."""
        if self._loaded is None:
            try:
                self._loaded = frozenset(os.listdir(self.paths.sysfs / "module"))
            except OSError:
                self._loaded = frozenset()
        return self._loaded

    @property
    def no_module_support(self) -> bool:
        return self.installed is None and not self.environment.module_support

    # --- devices -----------------------------------------------------------------------

    def diagnose(self, device: Device) -> Verdict:
        if device.driver:
            intentional = device.driver in INTENTIONAL_DRIVERS or bool(device.driver_override)
            how = " (held on purpose, e.g. for a guest)" if intentional else ""
            return Verdict("bound", f"bound to {device.driver}{how}", driver=device.driver, intentional=intentional)
        if device.driver_override:
            return Verdict("ignored", f"driver_override is set to {device.driver_override!r}: only that driver may bind "
                                      f"(vfio/driverctl); clear it to let the kernel choose")
        if device.companion_of:
            return Verdict("ignored", f"an ACPI node: its physical device {device.companion_of} is judged instead")
        if device.pci and device.pci.physfn and device.pci.sriov_drivers_autoprobe is False:
            return Verdict("ignored", f"an SR-IOV virtual function of {os.path.basename(device.pci.physfn)}, whose "
                                      f"sriov_drivers_autoprobe=0: its VFs are meant for guests")
        if device.subsystem in self.config.ignore.subsystems:
            return Verdict("ignored", f"excluded by policy: ignore.subsystems holds {device.subsystem!r}")
        if self._policy_ignores(device):
            return Verdict("ignored", "excluded by policy: ignore.devices names this device")
        try:
            return self.explain(device.modalias)
        except InvalidInput as exc:
            return Verdict("unknown", f"the device reports a malformed modalias; nothing can match it ({exc.message})")

    def _policy_ignores(self, device: Device) -> bool:
        sysfs = str(self.paths.sysfs)
        names = {device.id, device.syspath, device.syspath.removeprefix(sysfs)}
        return any(ref in names or sysfs + ref in names for ref in self.config.ignore.devices)

    # --- modaliases --------------------------------------------------------------------

    def explain(self, modalias: str) -> Verdict:
        """The verdict for a modalias on an unbound device (no device facts needed).

        Memoised: the VFs of one PF, or eight identical GPUs, share a modalias and are judged
        once. A Diagnoser sees one state of the indexes; make a new one when they change.
        """
        verdict = self._memo.get(modalias)
        if verdict is None:
            verdict = self._memo[modalias] = self._judge(modalias, self._matches(modalias))
        return verdict

    def explain_all(self, modaliases: list[str]) -> list[Verdict]:
        """explain of each, in two passes: every modalias checked and looked up first, then the
        verdicts made. The same answers; over thousands of modaliases each loop keeps to its own
        code, and the whole is a little faster (9,000 real ones: 2 to 8 ms of 330, medians of 41
        in four runs). A malformed modalias is refused before any lookup is made."""
        memo = self._memo
        new = [m for m in dict.fromkeys(modaliases) if m not in memo]
        check_modaliases(new)
        looked_up = self._looked_up
        with no_cyclic_gc():  # thousands of verdicts, no cycles
            todo = [(m, looked_up(m)) for m in new]
            for m, matches in todo:
                memo[m] = self._judge(m, matches)
        return [memo[m] for m in modaliases]

    def _matches(self, modalias: str) -> tuple[tuple, tuple]:
        """What libkmod matches: (the installed (name, path) pairs, ()), else ((), the index's
        (package, modules) pairs); both empty when nothing does."""
        check_modalias(modalias)
        return self._looked_up(modalias)

    def _looked_up(self, modalias: str) -> tuple[tuple, tuple]:
        """_matches of a modalias already checked."""
        if self.installed is not None:
            names = self.installed.lookup_tuple(modalias)
            if names:
                installed = self._installed_pairs.get(names)
                if installed is None:
                    installed = self._installed_pairs[names] = tuple(
                        (name, self.installed.module_path(name)) for name in names)
                return installed, ()
        return (), (self.index.lookup(modalias) if self._index_answers else ())

    def _judge(self, modalias: str, matches: tuple[tuple, tuple]) -> Verdict:
        installed, found = matches
        # the common cases first, a verdict already made for the same matches without a call
        # (`explain -` judges thousands; see _same_matches; a Verdict is never false)
        if installed:
            return self._by_matches.get(installed) or self._same_matches(
                installed, self._installed_match, modalias, installed)
        if found:
            return self._by_matches.get(found) or self._same_matches(
                found, self._candidates_verdict, modalias, found)
        if self.no_module_support:
            return Verdict("unknown", f"no built-in driver claimed it, and {self.installed_problem}: no package can add one")
        if not self.index.exists:
            why = "; ".join(str(e.message) for e in self.index.errors.values())
            prefix = f"{self.installed_problem}; " if self.installed_problem else "no installed module matches; "
            return self._or_repository(modalias, Verdict("unindexed", prefix + (
                f"the index for {self.paths.kver} is unusable ({why}): rebuild it with 'kmodguard index build'"
                if why else f"there is no index for kernel {self.paths.kver}: build one with 'kmodguard index build'")))
        # the index answers and nothing in it matched
        if self.index.errors:
            broken = "; ".join(e.message for e in self.index.errors.values())
            return self._or_repository(modalias, Verdict(
                "unindexed", f"no installed or indexed module matches, but part of the index is unusable "
                             f"({broken}): rebuild it with 'kmodguard index build'"))
        names = ", ".join(p.name for p in self.index.packages)
        return self._or_repository(modalias, Verdict(
            "unknown", f"no module in the installed tree or in the indexed packages ({names}) matches: "
                       f"this kernel has no driver for it"))

    def _same_matches(self, matches: tuple, judge, modalias: str, *args) -> Verdict:
        """judge(modalias, *args), once for each set of matches: the verdict depends on the
        modalias only through what libkmod matched (matches: the installed (name, path) pairs, or
        the (package, modules) found), except when every installed match is blacklisted (then the
        indexes are asked) or when a module's firmware is absent and the file lists name no
        package (then the repositories' announcements may be); such a verdict is not shared.
        Many modaliases have the same matches: a driver's PCI ids, a GPU family. Called for
        matches not in _by_matches (_judge looks there first, without a call)."""
        self._beyond_matches = False
        verdict = judge(modalias, *args)
        if not self._beyond_matches:
            self._by_matches[matches] = verdict
        return verdict

    def _installed_match(self, modalias: str, installed: tuple[tuple[str, str | None], ...]) -> Verdict:
        names = [n for n, _ in installed]
        blocked = self._blocked(names, package=None)
        if len(blocked) < len(names):
            return self._installed_verdict(modalias, installed, blocked)
        # every installed match is blacklisted: a not-installed package may still hold one kmod would load
        self._beyond_matches = True
        return self._all_installed_blocked(modalias, names, blocked)

    def _or_repository(self, modalias: str, verdict: Verdict) -> Verdict:
        """Nothing of the kernel's own drives it: does a repository announce a driver package?"""
        found = self._repository_candidates(modalias)
        if not found:
            firmware = [a.package for a in self._announced(modalias) if self.config.firmware_allowed(a.package)]
            if firmware:  # SUSE's firmware packages supplement the devices of drivers that load their files
                return verdict._replace(reason=f"{verdict.reason.rstrip('.')} ({', '.join(firmware)} announces it "
                                               "in the repository metadata, but is firmware: a driver must load it)")
            return verdict
        candidate, how, pattern = found[0]
        reason = (f"{verdict.reason.rstrip('.')}; but the repositories announce {candidate.package} {candidate.version} "
                  f"for it (its metadata {how} modalias({pattern}))")
        return Verdict("missing", reason, candidates=tuple(c for c, _, _ in found))

    def _announced(self, modalias: str) -> list:
        """The repository packages whose metadata announces this modalias (asked once a Diagnoser)."""
        if self.repository_lookup is None:
            return []
        if self._repository is None:
            try:
                self._repository = self.repository_lookup() or False
            except (KmodguardError, OSError):
                self._repository = False  # no package manager to ask: the kernel's own verdict stands
        if not self._repository:
            return []
        self._beyond_matches = True
        return self._repository.lookup(modalias)

    def _repository_candidates(self, modalias: str) -> list[tuple[Candidate, str, str]]:
        """(candidate, how, pattern) for each driver package announcing this modalias; a firmware
        package (firmware_packages) that announces it serves a driver, it is not one."""
        from .. import requests

        out = []
        for a in self._announced(modalias):
            if self.config.firmware_allowed(a.package):
                continue
            try:
                request = requests.build(requests.NAME_VERSION, a.package, self.paths.kver, a.version)
            except InvalidInput:
                continue
            out.append((Candidate(None, a.package, a.version, request, origin="repository"), a.how, a.pattern))
        return out

    def _all_installed_blocked(self, modalias: str, names: list[str], blocked: dict[str, str]) -> Verdict:
        """Every installed match is blacklisted: 'missing' when an indexed package holds a match
        nothing blacklists, 'ignored' only when nothing anywhere may be loaded."""
        listed = "; ".join(f"{n} ({why})" for n, why in blocked.items())
        found = self.index.lookup(modalias) if self.index.exists else ()
        if found:
            return self._candidates_verdict(modalias, found, installed=names, installed_blocked=blocked)
        unsure = "" if self.index.exists and not self.index.errors else \
            (f" (no usable index for kernel {self.paths.kver}: a package that is not installed may hold "
             "another driver; build one with 'kmodguard index build')")
        return Verdict("ignored", f"every matching module is blacklisted: {listed}{unsure}",
                       installed_modules=names, blacklisted=sorted(blocked))

    def _installed_verdict(self, modalias: str, installed: tuple[tuple[str, str | None], ...],
                           blocked: dict[str, str]) -> Verdict:
        names = [n for n, _ in installed]
        usable = [(n, p) for n, p in installed if n not in blocked]
        builtin = any(p is None for _, p in usable)
        vendor = any(p and any(v in p for v in VENDOR_DIRS) for _, p in usable)
        loaded = [n for n, _ in usable if n in self._loaded_modules()]
        first = usable[0][0]
        inside = next((n for n, p in usable if p is None), None)  # a built-in match
        need = self._installed_firmware(modalias, inside, None) if builtin else self._installed_firmware(
            modalias, *usable[0])
        if builtin and need and need.packages:
            reason = (f"built-in driver {inside} matches but did not bind it: {need.sentence()}; 'kmodguard fix' "
                      "installs it and re-probes the device")
        elif builtin:
            reason = f"built-in driver {inside} matches but did not bind it: see 'dmesg' for why"
        elif need and need.packages:
            state = "is loaded but did not bind it" if first in self._loaded_modules() else "matches"
            reason = (f"{first} {state}: {need.sentence()}; 'kmodguard fix' installs it, "
                      "loads the module and re-probes the device")
        elif loaded:
            reason = f"{', '.join(loaded)} is loaded but did not bind it: see 'dmesg' (firmware, a refused probe)"
        else:
            kind = "vendor module" if vendor else "installed module"
            reason = f"{kind} {first} matches and is not loaded: run 'modprobe {first}' or 'kmodguard fix'"
        if need and not need.packages:
            reason += f" ({need.sentence()})"
        return Verdict("loadable", reason, installed_modules=names, builtin=builtin, vendor=vendor,
                       blacklisted=sorted(blocked), firmware=need)

    def _installed_firmware(self, modalias: str, module: str, path: str | None) -> FirmwareNeed | None:
        """The firmware an installed module names, read from the module file itself (a built-in
        one's, path None, from modules.builtin.modinfo)."""
        if self.installed is None:
            return None
        if path is None:
            if self._builtin_firmware is None:
                self._builtin_firmware = modinfo.builtin_firmware(self.paths.installed_modules)
            return self._firmware_need(module, self._builtin_firmware.get(module, ()), modalias)
        firmware = self._installed_firmware_names.get(path)
        if firmware is None:
            firmware, identity = self.installed_firmware.get(path)
            if firmware is not None:
                firmware = tuple(firmware)
            else:
                # the ELF section first: libkmod also verifies the signature (most of a lookup's time)
                firmware = modinfo.firmware(path)
                if firmware is None:
                    try:
                        firmware = self.installed.module_info(path).firmware
                    except (KmodError, OSError):
                        firmware = ()
                self.installed_firmware.put(path, identity, list(firmware))
            self._installed_firmware_names[path] = firmware
        return self._firmware_need(module, firmware, modalias)

    def _firmware_need(self, module: str, firmware: tuple[str, ...], modalias: str) -> FirmwareNeed | None:
        key = (module, tuple(firmware))
        if key not in self._need_memo:
            self._need_memo[key] = resolve_firmware(module, tuple(firmware), self._firmware_present(),
                                                    self.firmware_lookup, self.config)
        need = self._need_memo[key]
        if need is not None and not need.packages:  # the file lists did not say: did a package announce it?
            return from_announcements(need, self._announced(modalias), self.config)
        return need

    def _blocked(self, names: list[str], package: PackageIndex | None) -> dict[str, str]:
        blocked = {}
        for n in names:
            if n in self.system_blacklist:
                blocked[n] = "blacklisted in modprobe.d or on the kernel command line"
            elif package is not None and n in package.blacklist:
                blocked[n] = f"{package.name} blacklists it in its own modprobe.d"
            elif n in self.ignored_modules:
                blocked[n] = "excluded by policy (ignore.modules)"
        return blocked

    def _candidates_verdict(self, modalias: str, found: tuple[tuple[PackageIndex, tuple[str, ...]], ...],
                            installed: list[str] = (),
                            installed_blocked: dict[str, str] | None = None) -> Verdict:
        """installed: matching installed modules, all of them blacklisted (installed_blocked says why)."""
        candidates, blocked_all = [], dict(installed_blocked or {})
        for pkg, modules in found:
            blocked = self._blocked(modules, pkg)
            blocked_all.update(blocked)
            for m in modules:
                if m not in blocked:
                    firmware = pkg.firmware_of(m)
                    if firmware:  # most modules name none
                        need, missing = self._firmware_need(m, firmware, modalias), self._firmware_missing(pkg, m)
                    else:
                        need, missing = None, ()
                    candidates.append(Candidate(m, pkg.name, pkg.version, pkg.request, missing, need))
        if not candidates:
            return Verdict("ignored", "every module that would drive it is blacklisted: " + "; ".join(
                f"{n} ({why})" for n, why in blocked_all.items()), installed_modules=tuple(installed),
                blacklisted=sorted(blocked_all))
        first = candidates[0]
        if installed:
            reason = ("every installed matching module is blacklisted (" + "; ".join(
                f"{n}: {(installed_blocked or {})[n]}" for n in installed) + f"); {first.module} in "
                f"{first.package} {first.version} matches and nothing blacklists it")
        else:
            reason = f"no installed module matches; {first.module} in {first.package} {first.version} does"
        derived = next((p.derived_from for p, _ in found if p.name == first.package and p.derived_from), None)
        if derived:
            reason += f" (assumed from kernel {derived}'s index until this kernel's package is indexed)"
        if first.firmware:
            reason += f"; {first.firmware.sentence()}"
        return Verdict("missing", reason, installed_modules=tuple(installed), candidates=candidates,
                       blacklisted=sorted(blocked_all))

    def _firmware_missing(self, pkg: PackageIndex, module: str) -> tuple[str, ...]:
        key = (pkg.name, module)
        if key not in self._fw_memo:
            present = self._firmware_present()
            self._fw_memo[key] = tuple(fw for fw in pkg.firmware_of(module) if fw not in present)
        return self._fw_memo[key]

    def _firmware_present(self) -> frozenset[str]:
        """Every firmware name the kernel's loader would find, read once (a GPU driver names hundreds)."""
        if self._fw_present is None:
            names = set()
            for top in self.paths.kernel_firmware_dirs:
                for dirpath, _dirs, files in os.walk(top):
                    rel = os.path.relpath(dirpath, top)
                    for f in files:
                        for sfx in (".xz", ".zst"):
                            if f.endswith(sfx):
                                f = f[: -len(sfx)]
                        names.add(f if rel == "." else f"{rel}/{f}")
            self._fw_present = frozenset(names)
        return self._fw_present
