"""A stand-in module file for depmod: an ELF relocatable object that holds only a module's .modinfo.

depmod writes modules.alias.bin from the alias entries of each module's .modinfo section. Given
the whole module, it also maps the file and reads its symbol tables, for the dependency tables a
package index does not keep: on Debian's 2,002 kernel-modules modules that is 250 ms, against
80 ms for files made here, and the alias index is byte for byte the same (tests/index). The
object keeps the module's ELF class, byte order and machine; its sections are .modinfo, an empty
.symtab (one null symbol) and .strtab, and .shstrtab, so that depmod finds every table it looks for.
"""

from __future__ import annotations

import struct

_NAMES = b"\0.modinfo\0.symtab\0.strtab\0.shstrtab\0"
_MODINFO, _SYMTAB, _STRTAB, _SHSTRTAB = 1, 10, 18, 26  # offsets of the names in _NAMES
_PROGBITS, _SYMTAB_TYPE, _STRTAB_TYPE = 1, 2, 3
_ALLOC = 2
# ELF class -> (header format after e_ident, header size, section header format, its size, symbol size)
_CLASS = {
    1: ("HHIIIIIHHHHHH", 52, "IIIIIIIIII", 40, 16),
    2: ("HHIQQQIHHHHHH", 64, "IIQQQQIIQQ", 64, 24),
}


def build(header: bytes, modinfo: bytes) -> bytes:
    """The stand-in for the module whose ELF header (at least its first 20 bytes, as
    modinfo.section gives them) and .modinfo bytes are given."""
    ident = header[:16]
    order = "<" if ident[5] == 1 else ">"
    head_fmt, head_size, sh_fmt, sh_size, sym_size = _CLASS[ident[4]]
    (machine,) = struct.unpack_from(order + "H", header, 18)
    at_symtab = _aligned(head_size + len(modinfo))
    at_strtab = at_symtab + sym_size
    at_names = at_strtab + 1
    at_sections = _aligned(at_names + len(_NAMES))
    sections = (
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        (_MODINFO, _PROGBITS, _ALLOC, 0, head_size, len(modinfo), 0, 0, 1, 0),
        (_SYMTAB, _SYMTAB_TYPE, 0, 0, at_symtab, sym_size, 3, 1, 8, sym_size),  # link: .strtab
        (_STRTAB, _STRTAB_TYPE, 0, 0, at_strtab, 1, 0, 0, 1, 0),
        (_SHSTRTAB, _STRTAB_TYPE, 0, 0, at_names, len(_NAMES), 0, 0, 1, 0),
    )
    # e_type ET_REL, e_version 1, no entry or program headers, 5 sections, names in the last
    out = bytearray(ident + struct.pack(order + head_fmt, 1, machine, 1, 0, 0, at_sections, 0, head_size,
                                        0, 0, sh_size, len(sections), len(sections) - 1))
    out += modinfo
    out += bytes(at_symtab - len(out) + sym_size + 1)  # padding, the null symbol, .strtab's one NUL
    out += _NAMES
    out += bytes(at_sections - len(out))
    for fields in sections:
        out += struct.pack(order + sh_fmt, *fields)
    return bytes(out)


def _aligned(offset: int) -> int:
    return offset + (-offset) % 8
