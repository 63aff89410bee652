"""Whether a fix rebuilds the initramfs, and who does: the package's own scriptlet or kmodguard."""

from __future__ import annotations

import re
from typing import NamedTuple

from ..errors import InvalidInput



MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class InitramfsDecision(NamedTuple):
    """Whether a fix rebuilds the initramfs, who does (the package's scriptlet or kmodguard), why."""

    rebuild: bool
    by: str | None  # "package" | "kmodguard" | None
    reason: str
    drivers: tuple[str, ...] = ()

    def as_json(self) -> dict:
        return {"rebuild": self.rebuild, "by": self.by, "reason": self.reason, "drivers": list(self.drivers)}


def _norm(module: str) -> str:
    """Module names treat '-' and '_' alike (kmod does)."""
    return module.replace("-", "_")


def decide(modules: list[str], critical: dict[str, str], policy: str = "auto", rebuilt_by_package: bool = False,
           env: str | None = None):
    """Whether the initramfs must be rebuilt for these modules, and by whom.

    modules: the modules the plan loads; critical: {module: why it is needed at boot}
    (boot_critical); policy: the configuration's initramfs = auto | always | never;
    rebuilt_by_package: a package of the transaction runs dracut itself (Fedora's kernel-modules
    %posttrans); env: why this system's initramfs cannot be regenerated here (unsupported()), or None.
    Returns an InitramfsDecision (rebuild, by, reason, drivers).
    """

    if policy not in ("auto", "always", "never"):
        raise InvalidInput(f"initramfs must be one of auto, always, never, not {policy!r}")
    needed = [m for m in modules if m in critical]
    drivers = tuple(modules) if policy == "always" else tuple(needed)
    why = "; ".join(f"{m}: {critical[m]}" for m in needed)
    if policy == "never":
        reason = "initramfs = never in the configuration"
        return InitramfsDecision(False, None, reason + (f" (needed at boot: {why})" if needed else ""), ())
    if not drivers:
        return InitramfsDecision(False, None, "no device in the plan is needed before the real root is mounted", ())
    if policy == "always" and not needed:
        why = "initramfs = always in the configuration"
    if env:
        return InitramfsDecision(False, None, f"{why}; but {env}", drivers)
    if rebuilt_by_package:
        return InitramfsDecision(True, "package", f"{why}; the package's own scriptlet runs dracut, "
                                 "kmodguard persists the drivers and verifies the image", drivers)
    return InitramfsDecision(True, "kmodguard", why, drivers)
