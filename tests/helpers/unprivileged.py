"""User nobody, as the tests run kmodguard unprivileged."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
SYSTEM_PYTHON = "/usr/bin/python3"  # the distribution's: nobody may not read a private interpreter


@dataclass(frozen=True)
class Unprivileged:
    """How user nobody runs kmodguard: the system's Python on a world-readable copy of the package
    (a checkout in a 0700 home directory, or a virtual environment inside it, is closed to nobody)."""

    top: Path

    def command(self, *args: str) -> list[str]:
        return [*NOBODY, SYSTEM_PYTHON, "-m", "kmodguard", *args]

    def env(self, base: dict | None = None) -> dict:
        return {**(base if base is not None else os.environ), "PYTHONPATH": str(self.top)}
