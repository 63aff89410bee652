"""Driver packages the repositories announce in their metadata, matched by libkmod itself.

SUSE KMPs and firmware packages carry `Supplements: modalias(PATTERN)`, third-party kmod
packages `Provides: modalias(PATTERN)`. Each pattern becomes an `alias PATTERN kmgrepo_N` line
in a generated kmod configuration that a libkmod context over empty module tables reads: a
lookup of a device's modalias then answers, through kmod's own matching, which announcements
match. Nothing here trusts the metadata: names and versions are checked by the backend, a
pattern is one printable word, and the package is installed only when the allow-list admits it.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

from .. import requests
from ..index import store
from ..kmod import Context

CACHE_FILE = "repository-drivers.json"  # in STATE_DIR: the announcements per metadata revision
CACHE_CAP = 16 << 20

# depmod's own empty index (the modules.builtin.bin of an empty modules.builtin): header only
EMPTY_INDEX = bytes.fromhex("b007f457" "00020001" "0000000c")
PREFIX = "kmgrepo_"


class RepositoryDrivers:
    """The announcements of one question (a status, an explain), matched with libkmod."""

    def __init__(self, announcements: tuple, note: str | None = None, kver: str | None = None):
        # a flavoured one (SUSE: kernel-default:PATTERN) counts only on a kernel of that flavour
        self.announcements = tuple(a for a in announcements if not a.flavour or kver is None
                                   or kver.endswith("-" + a.flavour.removeprefix("kernel-")))
        self.note = note
        self._dir = Path(tempfile.mkdtemp(prefix="kmodguard-repo-"))
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        for name in store.KMOD_FILES:
            (self._dir / name).write_bytes(EMPTY_INDEX)
        conf = self._dir / "conf"
        conf.mkdir()
        (conf / "repository.conf").write_text("".join(
            f"alias {a.pattern} {PREFIX}{i}\n" for i, a in enumerate(self.announcements)))
        self._ctx = Context(self._dir, [str(conf)])

    def lookup(self, modalias: str) -> list:
        """The announcements whose pattern matches, in the repositories' order, one per package."""
        found = {}
        for name in self._ctx.lookup(modalias):
            if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
                a = self.announcements[int(name[len(PREFIX):])]
                found.setdefault(a.package, a)
        return list(found.values())


def _valid(item) -> bool:
    """An announcement read back from the cache is checked as the backend checked it."""
    from ..backends.dnf import FLAVOUR_RE, MODALIAS_PATTERN

    return (isinstance(item, list) and len(item) == 5 and all(isinstance(x, str) for x in item)
            and requests.NAME_RE.fullmatch(item[0]) is not None and requests.VERSION_RE.fullmatch(item[1]) is not None
            and MODALIAS_PATTERN.fullmatch(item[2]) is not None and "#" not in item[2]
            and item[3] in ("provides", "supplements") and (item[4] == "" or FLAVOUR_RE.fullmatch(item[4]) is not None))


def load_cached(state_dir: Path, key: str) -> tuple | None:
    """The announcements cached for this metadata revision, or None (absent, stale, or refused)."""
    from ..backends import Announcement
    from .state import read_cache

    doc = read_cache(Path(state_dir) / CACHE_FILE, CACHE_CAP)
    if doc is None or doc.get("key") != key or not isinstance(doc.get("items"), list):
        return None
    if not all(_valid(i) for i in doc["items"]):
        return None
    return tuple(Announcement(*i) for i in doc["items"])


def save_cached(state_dir: Path, key: str, items: tuple) -> None:
    from .state import write_cache

    write_cache(Path(state_dir) / CACHE_FILE, {"key": key, "items": [list(a) for a in items]})
