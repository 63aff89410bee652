"""A module's modinfo straight from its ELF .modinfo section, for the index build.

libkmod's kmod_module_get_info reads the same strings, but maps the whole file and verifies the
module's signature on the way (OpenSSL: most of its time, and kmodguard has no use for it): on
Debian's 2,002 kernel-modules modules that was the long pole of `index build`, not depmod.
Reading the section headers and the one section with pread is about 6 times faster.

Only uncompressed ELF modules are read here, and only when every offset lies inside the file;
anything else (.ko.xz, .ko.zst, a damaged file) returns None and goes to libkmod as before, which
also words the error. The strings are split as libkmod splits them (empty ones skipped, "key"
without '=' has the value ""), and the name is libkmod's, from the path.
"""

from __future__ import annotations

import os
import re
import struct

from ..kmod import ModuleInfo

_KEYS = (b"alias", b"firmware", b"depends")
# One NUL-separated entry whose key is one of _KEYS: "key=value", or "key" alone (value ""). In C
# (re), not a partition() of each of the section's ~20 entries a module in Python.
_ENTRY = re.compile(rb"(?<![^\0])(alias|firmware|depends)(?:=([^\0]*))?(?![^\0])")
# ELF class -> (offset of e_shoff, its format, offset of e_shentsize/e_shnum/e_shstrndx,
#               section header size, section header format: name, type, flags, addr, offset, size,
#               then padding to the header's size, so that struct.iter_unpack reads the table in one call)
_LAYOUT = {1: (0x20, "I", 0x2E, 40, "IIIIII16x"), 2: (0x28, "Q", 0x3A, 64, "IIQQQQ24x")}


def modname(path: str) -> str:
    """libkmod's path_to_modname: the file name up to its first '.', '-' as '_'."""
    return os.path.basename(path).split(".", 1)[0].replace("-", "_")


def read(path: str) -> ModuleInfo | None:
    """The module's alias, firmware and depends entries, or None to leave the file to libkmod."""
    raw, size = _section(path)
    return None if raw is None else from_section(path, raw, size)


def from_section(path: str, raw: bytes, size: int) -> ModuleInfo:
    """What read() gives, from the .modinfo bytes of the module at path (section())."""
    values = _values(raw)
    depends = tuple(d.replace("-", "_") for v in values[b"depends"] for d in v.split(",") if d)
    return ModuleInfo(name=modname(path), path=path, size=size, aliases=tuple(values[b"alias"]),
                      firmware=tuple(values[b"firmware"]), depends=depends)


def firmware(path: str) -> tuple[str, ...] | None:
    """Only the firmware entries, as read() gives them, or None to leave the file to libkmod.

    What judging an installed module needs: most modules name no firmware, and their
    .modinfo (hundreds of aliases for some) is then not split at all."""
    raw, _ = _section(path)
    if raw is None:
        return None
    return tuple(_values(raw)[b"firmware"]) if b"firmware" in raw else ()


def _section(path: str) -> tuple[bytes | None, int]:
    """The .modinfo section's bytes and the file's size; (None, 0) to leave the file to libkmod."""
    if not path.endswith(".ko"):
        return None, 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None, 0
    try:
        size = os.fstat(fd).st_size
        found = section(fd, size)
        return (found[1] if found else None), size
    except OSError:
        return None, 0
    finally:
        os.close(fd)


def _values(raw: bytes) -> dict[bytes, list[str]]:
    """The wanted keys' values in order, split as libkmod splits the strings."""
    values: dict[bytes, list[str]] = {k: [] for k in _KEYS}
    for key, value in _ENTRY.findall(raw):
        values[key].append(value.decode("utf-8", "surrogateescape"))
    return values


def section(fd: int, size: int) -> tuple[bytes, bytes] | None:
    """The ELF header (its first 64 bytes) and the .modinfo section of the open module file of
    size bytes, or None when it is no ELF file whose offsets all lie inside it. Raises OSError
    only for a failed read."""
    try:
        return _modinfo_section(fd, size)
    except (ValueError, struct.error, IndexError):
        return None


def _modinfo_section(fd: int, size: int) -> tuple[bytes, bytes] | None:
    head = os.pread(fd, 64, 0)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] not in _LAYOUT or head[5] not in (1, 2):
        return None
    order = "<" if head[5] == 1 else ">"
    off_shoff, shoff_fmt, off_sh, entsize, sh_fmt = _LAYOUT[head[4]]
    (shoff,) = struct.unpack_from(order + shoff_fmt, head, off_shoff)
    shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", head, off_sh)
    if shentsize != entsize or not 0 < shnum or not shstrndx < shnum or shoff + shnum * entsize > size:
        return None
    table = os.pread(fd, shnum * entsize, shoff)
    if len(table) != shnum * entsize:
        return None
    sections = list(struct.iter_unpack(order + sh_fmt, table))
    if any(s[1] != 8 and s[4] + s[5] > size for s in sections):  # SHT_NOBITS (8) has no bytes in the file
        return None
    _, _, _, _, names_off, names_size = sections[shstrndx]
    names = os.pread(fd, names_size, names_off)
    starts, at = set(), names.find(b".modinfo\0")
    while at >= 0:  # where the name ".modinfo" begins in the string table (one place, as a rule)
        starts.add(at)
        at = names.find(b".modinfo\0", at + 1)
    found = [s for s in sections if s[0] in starts]
    if len(found) != 1 or found[0][1] == 8:
        return None  # none, or several: libkmod decides
    _, _, _, _, offset, length = found[0]
    data = os.pread(fd, length, offset)
    return (head, data) if len(data) == length else None


BUILTIN_MODINFO_CAP = 16 << 20  # Debian's is 0.4 MiB: all of vmlinux's modinfo strings


def builtin_firmware(module_dir) -> dict[str, tuple[str, ...]]:
    """The firmware each built-in module names, from modules.builtin.modinfo (NUL-separated
    'module.key=value' strings that the kernel build writes); {} when the file is absent or bad."""
    from ..errors import KmodguardError
    from ..fsutil import read_capped

    try:
        data = read_capped(os.path.join(module_dir, "modules.builtin.modinfo"), BUILTIN_MODINFO_CAP)
    except (KmodguardError, OSError):
        return {}
    out: dict[str, list[str]] = {}
    for entry in data.split(b"\0"):
        name, dot, rest = entry.partition(b".")
        if dot and rest.startswith(b"firmware=") and len(rest) > 9:
            out.setdefault(name.decode("ascii", "replace").replace("-", "_"), []).append(
                rest[9:].decode("utf-8", "surrogateescape"))
    return {name: tuple(dict.fromkeys(fw)) for name, fw in out.items()}
