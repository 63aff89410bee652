"""What judging reads from files, remembered in STATE_DIR (engine/file_facts.py): the firmware
each installed module names, and the checksums of the index's files.

Judging an installed match reads the firmware= entries of the module file's .modinfo
(index.modinfo.firmware: an open, a fstat and four preads, about 20 µs a file); `explain` over
thousands of modaliases reads hundreds of files, most naming no firmware. Kept for one module
tree at a time (the last kernel judged); module paths may be links (a tree of links to a
package's files), followed. The index's files are checked against index.json each time a
Diagnoser opens the index (about 1 MiB read and hashed, and OpenSSL loaded, for each status); an
index file is never a link.
"""

from __future__ import annotations

from pathlib import Path

from ..fsutil import MiB
from .file_facts import FileFacts

CACHE_FILE = "installed-firmware.json"
CACHE_CAP = 8 << 20  # a distribution's whole tree (6,000 modules) is about 0.6 MiB
MAX_NAME = 4096  # a firmware name is a path below /lib/firmware
VERIFIED_FILE = "verified-index.json"
VERIFIED_CAP = MiB  # 20 files a package


def _names_ok(names) -> bool:
    return isinstance(names, list) and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME for n in names)


def installed_firmware(state_dir: Path, module_dir: Path) -> FileFacts:
    """module path -> the firmware names its file holds (a list)."""
    return FileFacts(state_dir, CACHE_FILE, str(module_dir), CACHE_CAP, _names_ok)


def _sha256_ok(digest) -> bool:
    return isinstance(digest, str) and len(digest) == 64


def verified_index(state_dir: Path, kernel_dir: Path) -> FileFacts:
    """index file path -> the sha256 it had when checked (for the packages of one kernel)."""
    return FileFacts(state_dir, VERIFIED_FILE, str(kernel_dir), VERIFIED_CAP, _sha256_ok, follow=False, prune=True)
