"""The message of the day (pam_motd's /run/motd.d): the devices that need a driver, and the one
command that fixes them. Written by the daemon, or by `kmodguard check --apply-policy` when no
daemon runs; removed when nothing is left to offer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from ..fsutil import write_atomic

log = logging.getLogger(__name__)


class Offer(NamedTuple):
    device_id: str
    module: str | None
    package: str | None  # None: the module is installed, only not loaded
    version: str | None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text)


def motd_text(offers: list[Offer]) -> str | None:
    if not offers:
        return None
    lines = [f"kmodguard: {len(offers)} device(s) have no driver, and one is available:"]
    for o in offers[:8]:
        where = f"{o.package} {o.version} (not installed)" if o.package else "installed, not loaded"
        lines.append(f"  {_printable(o.device_id)}: {o.module or 'a driver'} in {where}")  # None: announced by a repository
    if len(offers) > 8:
        lines.append(f"  ... and {len(offers) - 8} more")
    lines.append("Run 'sudo kmodguard fix' to install and load it ('kmodguard status' tells more).")
    return "\n".join(lines) + "\n"


def write_motd(path: Path, text: str | None) -> None:
    """Write the fragment, or remove it when there is nothing to say. /run needs no fsync."""
    try:
        if text is None:
            Path(path).unlink(missing_ok=True)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), text.encode(), 0o644, durable=False)
    except OSError as exc:
        log.debug("cannot write %s: %s", path, exc)
