"""A module's firmware, resolved to the packages that hold it, through the package manager's metadata.

A module's modinfo names every firmware file any of its chips may load (amdgpu names hundreds):
the count says nothing about one device. What matters is whether the firmware package is there.
When the module names firmware and none of it is on disk, the repositories' file lists are asked
which packages hold those files, and the smallest set of allow-listed packages (firmware_packages)
that holds all the files any of them has is what the device needs. When some of its firmware is on
disk, a firmware package is installed already: the files it lacks are for chips the distribution
has no firmware for, and asking would only offer the same package again.
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable, NamedTuple

from .. import requests
from ..config import Config
from ..errors import KmodguardError

EXACT_COVER_LIMIT = 12  # packages; beyond that a greedy cover (it is never more than a handful)


class FirmwareNeed(NamedTuple):
    module: str
    named: int  # firmware files the module names
    packages: tuple[tuple[str, str], ...] = ()  # (package, version): the smallest set to install
    covered: int = 0  # named files those packages hold
    not_allowed: tuple[str, ...] = ()  # packages that hold some, but are not in firmware_packages
    note: str | None = None  # why the answer may be incomplete

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.packages)

    def sentence(self) -> str:
        if self.packages:
            return f"{self.module} needs firmware from {', '.join(self.names)} (not installed)"
        if self.not_allowed:
            return (f"{self.module} needs firmware that only {', '.join(self.not_allowed)} holds, which is not in "
                    "firmware_packages (/etc/kmodguard/kmodguard.toml)")
        why = self.note or "no package in the repositories holds any of it"
        return f"{self.module} names {self.named} firmware file(s) and none is on disk; {why}"

    def as_json(self) -> dict:
        return {"module": self.module, "packages": [{"package": p, "version": v} for p, v in self.packages],
                "files_named": self.named, "files_covered": self.covered, "not_allowed": list(self.not_allowed),
                "note": self.note}


Lookup = Callable[[list[str]], object]  # names -> backends.FirmwareLookup


def resolve(module: str, firmware: tuple[str, ...], present: frozenset[str], lookup: Lookup | None,
            config: Config) -> FirmwareNeed | None:
    """What the module needs installed for its firmware; None when it names none or some is on disk."""
    if not firmware or any(f in present for f in firmware):
        return None
    askable = [f for f in dict.fromkeys(firmware) if requests.firmware_name_ok(f)]
    if not askable:
        return FirmwareNeed(module, len(firmware), note="its firmware names are patterns, which cannot be "
                                                        "looked up exactly")
    if lookup is None:
        return FirmwareNeed(module, len(firmware), note="no package manager was asked which package holds it")
    try:
        found = lookup(askable)
    except KmodguardError as exc:
        return FirmwareNeed(module, len(firmware), note=exc.message)
    by_package: dict[str, set[str]] = {}
    for name, packages in found.providers.items():
        for p in packages:
            by_package.setdefault(p, set()).add(name)
    allowed = {p: files for p, files in by_package.items() if config.firmware_allowed(p)}
    refused = tuple(sorted(set(by_package) - set(allowed)))
    chosen = smallest_cover(allowed)
    covered = set().union(*(allowed[p] for p in chosen)) if chosen else set()
    return FirmwareNeed(module, len(firmware), tuple((p, found.versions.get(p, "")) for p in chosen), len(covered),
                        refused, found.note)


def smallest_cover(sets: dict[str, set[str]]) -> tuple[str, ...]:
    """The fewest packages whose files together are every file any of them has (ties: by name)."""
    universe = set().union(*sets.values()) if sets else set()
    if not universe:
        return ()
    names = sorted(sets)
    if len(names) <= EXACT_COVER_LIMIT:
        for k in range(1, len(names) + 1):
            for combo in combinations(names, k):
                if set().union(*(sets[n] for n in combo)) == universe:
                    return combo
    chosen, left = [], set(universe)
    while left:
        best = max(names, key=lambda n: (len(sets[n] & left), [-ord(c) for c in n]))
        chosen.append(best)
        left -= sets[best]
    return tuple(sorted(chosen))


def from_announcements(need: FirmwareNeed, announced: list, config: Config) -> FirmwareNeed:
    """When the file lists cannot say (libzypp reads no filelists.xml), the firmware packages
    themselves may: SUSE's kernel-firmware-* carry 'Supplements: modalias(...)' for the devices
    whose drivers load their files. Allow-listed ones that announce this device fill the need."""
    found = [a for a in announced if a.how == "supplements" and config.firmware_allowed(a.package)]
    if not found:
        return need
    packages = tuple(dict.fromkeys((a.package, a.version) for a in found))
    names = ", ".join(p for p, _ in packages)
    return need._replace(packages=packages, covered=0, note=(
        f"the repository metadata of {names} supplements this device (modalias({found[0].pattern})); which of "
        f"the module's files it holds, the metadata does not say"))
