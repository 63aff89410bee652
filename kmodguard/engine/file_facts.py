"""Facts read from files, remembered in STATE_DIR from one run to the next while each file stays
the same (engine/remembered.py says which).

A fact is only a hint that one stat confirms: it is keyed by the file's identity and change times
(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), so a file replaced or rewritten in place, by
any means, is read again (st_ctime cannot be set back). Kept for one scope at a time (a module
tree, a kernel's index). Written by root, best effort and not durable (state.write_cache); a bad
or foreign file is a miss.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from .state import read_cache, write_cache



def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class FileFacts:
    """path -> one fact about the file (fact_ok says what a well-formed one is), for one scope.

    A file is named by its path and its stat (os.stat_result: of the descriptor it was read
    from, best; None: stat it now). follow=False: a path that is a link, or not a regular file,
    is never a hit. prune: save only the files asked about in this run (every file of a scope is
    asked each time, so the others belong to what was replaced)."""

    def __init__(self, state_dir: Path, name: str, scope: str, cap: int, fact_ok: Callable[[object], bool],
                 follow: bool = True, prune: bool = False):
        self._file = Path(state_dir) / name
        self._scope = scope
        self._cap = cap
        self._fact_ok = fact_ok
        self._follow = follow
        self._prune = prune
        self._entries: dict[str, list] | None = None  # read at the first question
        self._asked: set[str] = set()
        self._learned = False

    def _load(self) -> dict[str, list]:
        """The well-formed entries of the file (checked once here, not at each question)."""
        doc = read_cache(self._file, self._cap)
        if doc is None or doc.get("scope") != self._scope:
            return {}
        entries = doc.get("files")
        if not isinstance(entries, dict):
            return {}
        return {p: e for p, e in entries.items() if self._entry_ok(e)}

    def _entry_ok(self, entry) -> bool:
        return (isinstance(entry, list) and len(entry) == 6 and all(type(x) is int for x in entry[:5])
                and self._fact_ok(entry[5]))

    def stat(self, path) -> os.stat_result | None:
        try:
            st = os.stat(path, follow_symlinks=self._follow)
        except OSError:
            return None
        return st if self._follow or stat.S_ISREG(st.st_mode) else None

    def known(self, path, st: os.stat_result | None = None):
        """The fact remembered for path as it is now, or None."""
        st = self.stat(path) if st is None else st
        if self._entries is None:
            self._entries = self._load()
        path = os.fspath(path)
        self._asked.add(path)
        entry = self._entries.get(path)
        if st is not None and entry is not None and entry[:5] == _identity(st):
            return entry[5]
        return None

    def get(self, path) -> tuple[object | None, os.stat_result | None]:
        """(the remembered fact or None, the file's stat now: pass it to put())."""
        st = self.stat(path)
        return self.known(path, st) if st is not None else None, st

    def put(self, path, st: os.stat_result | None, fact) -> None:
        if st is None:
            return
        if self._entries is None:
            self._entries = self._load()
        path = os.fspath(path)
        self._asked.add(path)
        entry = [*_identity(st), fact]
        if self._entry_ok(entry):  # what _load would refuse is not kept: the entries stay well-formed
            self._entries[path] = entry
            self._learned = True

    def save(self) -> None:
        """Write what this run learned, when it may (a user's status cannot write STATE_DIR)."""
        if not self._learned:
            return
        keep = {p: e for p, e in self._entries.items() if not self._prune or p in self._asked}
        if write_cache(self._file, {"scope": self._scope, "files": keep}):
            self._learned = False
