"""libkmod through cffi: the only place kmodguard matches modaliases.

A Context wraps one `struct kmod_ctx` on one module directory. libkmod is not thread-safe:
one thread owns a Context. Every negative errno becomes a KmodError, in `_check` only.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple, Sequence

from ..errors import InvalidInput, KmodError

try:  # generated at build time by _build.py (cffi out-of-line ABI mode)
    from ._libkmod import ffi
except ImportError:  # a bare source tree: parse the declarations now (about 35 ms)
    from cffi import FFI

    from ._cdef import CDEF

    ffi = FFI()
    ffi.cdef(CDEF)
_lib = None


_c_locale = None  # (uselocale, the C locale), made once


def _c_locale_switch():
    """(libc's uselocale, a C locale object) for running one libkmod call in the C locale.

    Python sets LC_CTYPE from the environment; in a UTF-8 locale glibc's fnmatch, which libkmod
    matches wildcard aliases with, takes its multibyte path: every lookup costs 1.75 times as
    much (measured on Debian's 6.1 aliases), and '?' matches a character, not a byte. modprobe
    never calls setlocale, so it matches in the C locale: kmodguard's lookups do the same, in
    their own thread only (uselocale), which leaves Python's locale, and its default text
    encoding, as they are. Where libc cannot make the locale, the object is NULL, which
    uselocale takes as "change nothing"."""
    global _c_locale
    if _c_locale is None:
        import locale

        libc = ffi.dlopen(None)
        mask = (1 << locale.LC_CTYPE) | (1 << locale.LC_COLLATE)  # <locale.h>: LC_x_MASK is 1 << LC_x
        _c_locale = (libc.uselocale, libc.newlocale(mask, b"C", ffi.NULL))
    return _c_locale


def _libkmod():
    global _lib
    if _lib is None:
        try:
            _lib = ffi.dlopen("libkmod.so.2")
        except OSError as exc:  # pragma: no cover - depends on the host
            raise KmodError("cannot open libkmod.so.2 (install kmod / libkmod2)", errno.ENOENT) from exc
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise KmodError(what, -rc)
    return rc


_INFO_KEYS = frozenset({b"alias", b"firmware", b"depends"})  # what ModuleInfo keeps


def _text(p) -> str | None:
    return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "surrogateescape")


# KMOD_PROBE_APPLY_BLACKLIST: refuse a blacklisted module. (Not KMOD_PROBE_IGNORE_LOADED: that
# means "insert even if loaded", and libkmod then reports some refusals as success. Without it,
# an already-loaded module is success, as with modprobe.)
PROBE_APPLY_BLACKLIST = 0x00004


class ModuleInfo(NamedTuple):
    """What modinfo tells of one module file."""

    name: str
    path: str
    size: int
    aliases: tuple[str, ...] = ()
    firmware: tuple[str, ...] = ()
    depends: tuple[str, ...] = ()


class _ModuleList:
    """Owns a kmod_list of modules; iterate while open, unref on close."""

    def __init__(self, lib, head):
        self._lib, self.head = lib, head

    def __iter__(self):
        entry = self.head
        while entry != ffi.NULL:
            yield self._lib.kmod_module_get_module(entry)  # a new reference each
            entry = self._lib.kmod_list_next(self.head, entry)

    def close(self):
        if self.head != ffi.NULL:
            self._lib.kmod_module_unref_list(self.head)
            self.head = ffi.NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Context:
    """A libkmod context on one module directory.

    dirname: the directory that holds modules.*.bin (e.g. /lib/modules/KVER).
    config_paths: modprobe.d directories or files to read; None means libkmod's defaults
    (/etc/modprobe.d, /run/modprobe.d, /usr/local/lib/modprobe.d, /lib/modprobe.d),
    an empty sequence means read no configuration at all.
    """

    def __init__(self, dirname: str | os.PathLike | None, config_paths: Sequence[str] | None = None):
        lib = _libkmod()
        self._keep = []  # C strings must outlive kmod_new
        c_dir = ffi.NULL if dirname is None else self._cstr(os.fspath(dirname))
        if config_paths is None:
            c_conf = ffi.NULL
        else:
            c_conf = ffi.new("const char *[]", [self._cstr(p) for p in config_paths] + [ffi.NULL])
            self._keep.append(c_conf)
        ctx = lib.kmod_new(c_dir, c_conf)
        if ctx == ffi.NULL:
            raise KmodError(f"kmod_new({dirname})", errno.ENOMEM)
        lib.kmod_set_log_priority(ctx, 0)  # libkmod must not print to our stderr
        self._lib = lib
        self._c_locale = _c_locale_switch()
        self._ctx = ffi.gc(ctx, lib.kmod_unref)
        self.dirname = _text(lib.kmod_get_dirname(ctx))

    def _cstr(self, s: str):
        c = ffi.new("char[]", os.fsencode(s))
        self._keep.append(c)
        return c

    def close(self) -> None:
        if self._ctx is not None:
            ffi.release(self._ctx)
            self._ctx = None

    def load_resources(self) -> None:
        """mmap the indexes now (faster lookups). Fails on a missing or broken index file."""
        _check(self._lib.kmod_load_resources(self._ctx), f"loading the module indexes in {self.dirname}")

    def resources_changed(self) -> bool:
        """True when the indexes changed on disk since loading: make a new Context then."""
        return self._lib.kmod_validate_resources(self._ctx) != 0

    def lookup(self, alias: str) -> list[str]:
        """Module names (as kmod normalises them) that match an alias, in kmod's order, no duplicates."""
        return list(self._lookup(alias, False))

    def lookup_tuple(self, alias: str) -> tuple[str, ...]:
        """lookup, as a tuple (hashable: judging keys its verdicts by what matched)."""
        return tuple(self._lookup(alias, False))

    def lookup_paths(self, alias: str) -> tuple[tuple[str, str | None], ...]:
        """(name, path) for each module matching alias; path is None for a built-in module (a
        tuple: judging keys its verdicts by what matched)."""
        return tuple(self._lookup(alias, True).items())

    def module_path(self, name: str) -> str | None:
        """The file of the module named name (as a lookup gives it), from modules.dep; None for a
        built-in module. What lookup_paths gives beside each name."""
        lib = self._lib
        mod = ffi.new("struct kmod_module **")
        _check(lib.kmod_module_new_from_name(self._ctx, name.encode("utf-8", "surrogateescape"), mod),
               f"module {name!r}")
        try:
            return _text(lib.kmod_module_get_path(mod[0]))
        finally:
            lib.kmod_module_unref(mod[0])

    def _lookup(self, alias: str, with_paths: bool) -> dict[str, str | None]:
        lib = self._lib
        out = ffi.new("struct kmod_list **")
        uselocale, c_locale = self._c_locale
        previous = uselocale(c_locale)
        try:
            rc = lib.kmod_module_new_from_lookup(self._ctx, alias.encode("utf-8", "surrogateescape"), out)
        finally:
            uselocale(previous)
        if rc == -errno.EINVAL:  # libkmod's own verdict on the string (e.g. an unbalanced '[')
            raise InvalidInput(f"libkmod refuses {alias[:60]!r} as an alias")
        _check(rc, f"looking up {alias!r} in {self.dirname}")
        seen: dict[str, str | None] = {}
        with _ModuleList(lib, out[0]) as modules:
            for mod in modules:
                name = _text(lib.kmod_module_get_name(mod))
                if name not in seen:  # the path costs a modules.dep lookup: only when asked
                    seen[name] = _text(lib.kmod_module_get_path(mod)) if with_paths else None
                lib.kmod_module_unref(mod)
        return seen

    def blacklist(self) -> frozenset[str]:
        """Module names blacklisted by this context's configuration (and modprobe.blacklist=)."""
        lib = self._lib
        it = lib.kmod_config_get_blacklists(self._ctx)
        if it == ffi.NULL:
            return frozenset()
        names = set()
        try:
            while lib.kmod_config_iter_next(it):
                names.add(_text(lib.kmod_config_iter_get_key(it)))
        finally:
            lib.kmod_config_iter_free_iter(it)
        return frozenset(names)

    def module_info(self, path: str | os.PathLike) -> ModuleInfo:
        """modinfo of a module file (.ko, .ko.xz, .ko.zst), read by libkmod without any index."""
        lib = self._lib
        path = os.fspath(path)
        mod = ffi.new("struct kmod_module **")
        _check(lib.kmod_module_new_from_path(self._ctx, os.fsencode(path), mod), f"reading module {path}")
        mod = mod[0]
        try:
            head = ffi.new("struct kmod_list **")
            _check(lib.kmod_module_get_info(mod, head), f"reading modinfo of {path}")
            values: dict[bytes, list[str]] = {}
            try:
                entry = head[0]
                while entry != ffi.NULL:
                    # keys compared as bytes: a GPU driver has thousands of entries, most not wanted
                    key = ffi.string(lib.kmod_module_info_get_key(entry))
                    if key in _INFO_KEYS:
                        values.setdefault(key, []).append(_text(lib.kmod_module_info_get_value(entry)) or "")
                    entry = lib.kmod_list_next(head[0], entry)
            finally:
                lib.kmod_module_info_free_list(head[0])
            name = _text(lib.kmod_module_get_name(mod))
        finally:
            lib.kmod_module_unref(mod)
        depends = tuple(d for v in values.get(b"depends", ()) for d in v.split(",") if d)
        return ModuleInfo(
            name=name,
            path=path,
            size=os.stat(path).st_size,
            aliases=tuple(values.get(b"alias", ())),
            firmware=tuple(values.get(b"firmware", ())),
            depends=tuple(d.replace("-", "_") for d in depends),
        )

    def load(self, name: str) -> None:
        """Insert a module and its dependencies as modprobe would (blacklist honoured)."""
        lib = self._lib
        mod = ffi.new("struct kmod_module **")
        _check(lib.kmod_module_new_from_name(self._ctx, name.encode(), mod), f"module {name!r}")
        try:
            rc = lib.kmod_module_probe_insert_module(
                mod[0], PROBE_APPLY_BLACKLIST, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL)
            _check(rc, f"loading module {name}")
        finally:
            lib.kmod_module_unref(mod[0])
