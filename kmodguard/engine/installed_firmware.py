"""The firmware each installed module names, remembered in STATE_DIR from one run to the next.

Judging an installed match reads the firmware= entries of the module file's .modinfo
(index.modinfo.firmware: an open, a fstat and four preads, about 20 µs a file); `explain` over
thousands of modaliases reads hundreds of files, most naming no firmware. An entry is only a
hint that one stat confirms: it is keyed by the file's identity and change times (st_dev,
st_ino, st_size, st_mtime_ns, st_ctime_ns), so a module replaced or rewritten in place, by any
means, is read again. Kept for one module tree at a time (the last kernel judged). Written by
root, best effort and not durable, like the repositories' cache; a bad or foreign file is a miss.
"""

from __future__ import annotations

import os
from pathlib import Path

from .state import read_cache, write_cache

CACHE_FILE = "installed-firmware.json"
CACHE_CAP = 8 << 20  # a distribution's whole tree (6,000 modules) is about 0.6 MiB
MAX_NAME = 4096  # a firmware name is a path below /lib/firmware


def _identity(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entry_ok(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 6 and all(type(x) is int for x in entry[:5])
            and isinstance(entry[5], list)
            and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME for n in entry[5]))


class InstalledFirmware:
    """path -> the firmware names its module file holds, for the files of one module tree."""

    def __init__(self, state_dir: Path, module_dir: Path):
        self._file = Path(state_dir) / CACHE_FILE
        self._module_dir = str(module_dir)
        self._entries: dict[str, list] | None = None  # read at the first question
        self._learned = False

    def _load(self) -> dict[str, list]:
        doc = read_cache(self._file, CACHE_CAP)
        if doc is None or doc.get("module_dir") != self._module_dir:
            return {}
        entries = doc.get("modules")
        return entries if isinstance(entries, dict) else {}

    def get(self, path: str) -> tuple[tuple[str, ...] | None, list[int] | None]:
        """(the remembered firmware or None, the file's identity now: pass it to put())."""
        if self._entries is None:
            self._entries = self._load()
        identity = _identity(path)
        entry = self._entries.get(path)
        if identity is not None and _entry_ok(entry) and entry[:5] == identity:
            return tuple(entry[5]), identity
        return None, identity

    def put(self, path: str, identity: list[int] | None, firmware: tuple[str, ...]) -> None:
        if identity is None or self._entries is None:
            return
        self._entries[path] = [*identity, list(firmware)]
        self._learned = True

    def save(self) -> None:
        """Write what this run learned, when it may (a user's status cannot write STATE_DIR)."""
        if not self._learned:
            return
        known = {p: e for p, e in self._entries.items() if _entry_ok(e)}
        if write_cache(self._file, {"module_dir": self._module_dir, "modules": known}):
            self._learned = False
