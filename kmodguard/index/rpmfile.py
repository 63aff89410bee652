"""Read a kernel module package (an RPM file) for indexing: its header and its modules.

The header names the package, its version-release and the exact-version provide a package manager
is asked for (`kernel-modules-uname-r = KVER`); the payload gives the modules under
lib/modules/KVER (or usr/lib/modules/KVER) and the package's own modprobe.d/*.conf (Fedora's
kernel-modules-extra blacklists its modules there). Only those files are extracted, into a private
temporary directory, with rpm's Python bindings: no root, no cpio, no shell.

Signatures are not checked here: reading metadata needs no key, and the package manager verifies
the signature when it installs the package. Digests are checked: the header's (by rpm), the
compressed payload's against the header, and each extracted file's against the header.

Errors: a file that is not a readable, intact kernel module package for the requested kernel is
bad input (InvalidInput, exit status 2): missing, a directory, empty, not an RPM, truncated or
damaged, a source package, no *-uname-r provide, no modules for its kernel, or another kernel
than --kver. A machine that cannot read RPMs at all (no python3-rpm) or cannot write the
temporary copy is an error of its own (KmodguardError, exit status 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .. import requests
from ..errors import InvalidInput, KmodguardError
from .build import MODULE_SUFFIXES, PackageSource

log = logging.getLogger(__name__)

LEAD_MAGIC = b"\xed\xab\xee\xdb"
UNAME_R = "-uname-r"
RPMSENSE_LESS, RPMSENSE_GREATER, RPMSENSE_EQUAL = 2, 4, 8
RPMFILE_GHOST = 1 << 6
# rpm's PGPHASHALGO numbers, as used by RPMTAG_PAYLOADDIGESTALGO
HASHES = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
NO_RPM_HINT = ("install python3-rpm (Debian, Ubuntu: apt-get install python3-rpm; Fedora, RHEL: dnf install "
               "python3-rpm) and run kmodguard with the system's Python, which sees it")
_DRACUT_CALL = re.compile(r"^(?!\s*#).*(?<![\w./-])(?:[\w./-]*/)?dracut\s", re.MULTILINE)


# --- the rpm bindings ------------------------------------------------------------------------

def _is_bindings(mod) -> bool:
    return mod is not None and getattr(mod, "__file__", None) is not None and hasattr(mod, "TransactionSet")


def import_rpm():
    """The rpm Python bindings. A directory named rpm in the working directory (or elsewhere early on
    sys.path) makes `import rpm` find a namespace package instead: skip such entries and load the
    real bindings from the rest of sys.path."""
    mod = sys.modules.get("rpm")
    if _is_bindings(mod):
        return mod
    if mod is None:
        try:
            import rpm as mod  # noqa: PLC0415
        except ImportError as exc:
            raise KmodguardError(f"cannot read RPM files: the Python rpm bindings do not import ({exc})",
                                 hint=NO_RPM_HINT) from None
        if _is_bindings(mod):
            return mod
    # Shadowed: a namespace package, or a module that is not the bindings.
    shadow = {os.path.realpath(p) for p in getattr(mod, "__path__", [])}
    if getattr(mod, "__file__", None):
        shadow.add(os.path.realpath(os.path.dirname(mod.__file__)))
    search = [p for p in sys.path
              if os.path.realpath(os.path.join(p or os.getcwd(), "rpm")) not in shadow]
    spec = importlib.machinery.PathFinder.find_spec("rpm", search)
    if spec is None or spec.loader is None:
        raise KmodguardError("cannot read RPM files: the Python rpm bindings are not installed"
                             + (f" ('rpm' resolves to {', '.join(sorted(shadow))}, which is not them)" if shadow else ""),
                             hint=NO_RPM_HINT)
    real = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("rpm")
    sys.modules["rpm"] = real
    try:
        spec.loader.exec_module(real)
    except ImportError as exc:
        if saved is not None:
            sys.modules["rpm"] = saved
        else:
            sys.modules.pop("rpm", None)
        raise KmodguardError(f"cannot read RPM files: the Python rpm bindings do not import ({exc})",
                             hint=NO_RPM_HINT) from None
    if not _is_bindings(real):
        raise KmodguardError(f"cannot read RPM files: {spec.origin} is not rpm's Python bindings", hint=NO_RPM_HINT)
    log.debug("rpm bindings loaded from %s (a shadowing 'rpm' on sys.path was skipped)", real.__file__)
    return real


_logfile = None  # one capture file for rpm's own log, for the life of the process


@contextlib.contextmanager
def _rpm_log(rpm, path: Path) -> Iterator[callable]:
    """Send rpm's log to a private file while reading (never to stdout, which may carry a JSON
    document); the yielded function returns what rpm said. Afterwards rpm logs to stderr."""
    global _logfile
    if _logfile is None:
        _logfile = tempfile.TemporaryFile(buffering=0)
    fd = _logfile.fileno()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    rpm.setLogFile(_logfile)

    def said() -> str:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        lines = []
        for line in text.splitlines():
            line = line.strip()
            for prefix in ("error: ", "warning: ", f"{path}: "):
                line = line.removeprefix(prefix)
            if line:
                lines.append(line)
        return "; ".join(lines)

    try:
        yield said
    finally:
        with contextlib.suppress(Exception):
            rpm.setLogFile(sys.__stderr__ if sys.__stderr__ is not None else 2)


# --- reading ---------------------------------------------------------------------------------

RPM_CAP = 4 << 30  # one RPM file (Fedora's kernel-modules is about 60 MiB)


def _open(path: Path):
    """The file, opened for reading, after the checks that give a plain message (not rpm's).

    The user names this file on the command line, so a symbolic link to it is followed; but it
    is opened with O_NONBLOCK and must be a regular file (a FIFO or /dev/zero would block or never
    end), of at most RPM_CAP bytes."""
    from ..fsutil import open_regular

    if os.path.isdir(path):
        raise InvalidInput(f"{path} is a directory, not an RPM file")
    fd = open_regular(path, follow=True, cap=RPM_CAP, error_class=InvalidInput)
    # unbuffered: rpm reads through a duplicate of this descriptor, which shares its offset
    f = open(fd, "rb", buffering=0)  # noqa: SIM115 (closed by the caller)
    try:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise InvalidInput(f"{path} is empty, not an RPM package")
        lead = f.read(96)
        if lead[:4] != LEAD_MAGIC:
            raise InvalidInput(f"{path} is not an RPM package (it does not begin with an RPM lead)")
        if len(lead) < 96:
            raise InvalidInput(f"{path} is truncated: it ends inside the RPM lead")
        f.seek(0)
        return f
    except BaseException:
        f.close()
        raise


def _uname_r(hdr, name: str) -> tuple[str, str] | None:
    """(provide name, KVER) of the package's exact-version *-uname-r provide; {name}-uname-r first."""
    found = []
    for pname, pver, pflags in zip(hdr["providename"] or [], hdr["provideversion"] or [], hdr["provideflags"] or []):
        pname, pver = _s(pname), _s(pver)
        if (pname.endswith(UNAME_R) and pver and pflags & RPMSENSE_EQUAL
                and not pflags & (RPMSENSE_LESS | RPMSENSE_GREATER)):
            found.append((pname, pver))
    for pname, pver in found:
        if pname == name + UNAME_R:
            return pname, pver
    return found[0] if found else None


def _s(value) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _selected(name: str, kver: str) -> tuple[str, ...] | None:
    """The relative path parts of a payload file worth extracting, or None. Raises on unsafe names."""
    if "\0" in name or not name.startswith("/"):
        raise InvalidInput(f"the payload holds a file with an unsafe name: {name!r}")
    parts = tuple(name[1:].split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidInput(f"the payload holds a file with an unsafe name: {name!r}")
    if len(parts) > 3 and parts[:3] == ("lib", "modules", kver):
        return parts
    if len(parts) > 4 and parts[:4] == ("usr", "lib", "modules", kver):
        return parts
    if len(parts) >= 2 and parts[-2] == "modprobe.d" and parts[-1].endswith(".conf"):
        return parts
    return None


def _is_module(parts: tuple[str, ...]) -> bool:
    return parts[-1].endswith(MODULE_SUFFIXES)


def _rebuilds_initramfs(hdr) -> bool:
    """Whether an install scriptlet runs dracut (Fedora's kernel-modules %posttrans does, when
    kernel-core is not in the same transaction)."""
    return any(_DRACUT_CALL.search(_s(hdr[tag])) for tag in ("posttrans", "postin"))


def _check_payload_digest(f, offset: int, hdr, path: Path) -> bytes:
    """Compare the compressed payload with the header's digest; returns its first bytes."""
    digests = [_s(d) for d in (hdr["payloaddigest"] or [])]
    algo = HASHES.get(hdr["payloaddigestalgo"] or 0)
    f.seek(offset)
    head = f.read(16)
    if not digests or algo is None:
        f.seek(offset)
        return head  # an old package without a payload digest: each file's digest is still checked
    h = hashlib.new(algo)
    h.update(head)
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    if h.hexdigest() not in digests:
        raise InvalidInput(f"{path}: the payload is truncated or damaged (its {algo} digest does not match the header)")
    f.seek(offset)
    return head


PAYLOAD_FEATURES = {"bzip2": "rpmlib(PayloadIsBzip2)", "xz": "rpmlib(PayloadIsXz)", "lzma": "rpmlib(PayloadIsLzma)",
                    "zstd": "rpmlib(PayloadIsZstd)"}


def _compressor(rpm, hdr, head: bytes, path: Path) -> str:
    """rpm's I/O type for the payload; an error if this rpm library cannot decompress it (rpm.fd
    would silently read it raw instead)."""
    comp = _s(hdr["payloadcompressor"])
    if not comp:
        return "gzip" if head[:2] == b"\x1f\x8b" else "ufdio"
    if comp == "gzip":
        return comp
    feature = PAYLOAD_FEATURES.get(comp)
    known = {d.N() for d in rpm.ds.Rpmlib()}
    if feature is None or feature not in known:
        raise KmodguardError(f"{path}: its payload is compressed with {comp}, which this rpm library "
                             f"({getattr(rpm, '__version__', '?')}) cannot decompress",
                             hint="read it on a system with a newer rpm (and python3-rpm)")
    return comp


def _extract(rpm, hdr, f, offset: int, comp: str, dest: Path, kver: str, path: Path) -> int:
    """Extract the selected payload files into dest; returns how many modules were written."""
    wanted = {}
    for fi in rpm.files(hdr):
        parts = _selected(_s(fi.name), kver)
        # %ghost files are listed in the header but have no content in the payload
        if parts is not None and stat.S_ISREG(fi.mode) and not fi.fflags & RPMFILE_GHOST:
            wanted[_s(fi.name)] = parts
    if not any(_is_module(p) for p in wanted.values()):
        return 0
    f.seek(offset)
    payload = rpm.fd.open(f, flags=comp)
    archive = rpm.files(hdr).archive(payload)
    written = set()
    pending: dict[int, list[Path]] = {}  # hard links written before the member that has the content
    modules = 0
    try:
        for fi in archive:
            name = _s(fi.name)
            parts = wanted.get(name)
            if parts is None and not (fi.nlink > 1 and fi.inode in pending):
                continue
            if not archive.hascontent():
                if parts is not None:
                    pending.setdefault(fi.inode, []).append(dest.joinpath(*parts))
                    written.add(name)
                continue
            target = dest.joinpath(*parts) if parts is not None else dest / f".link-{fi.inode}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                out_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                raise InvalidInput(f"{path}: the payload holds {name} twice") from None
            with open(out_fd, "wb") as out:
                rfd = rpm.fd.open(out, "w")
                try:
                    archive.readto(rfd)
                finally:
                    rfd.close()
            for link in pending.pop(fi.inode, []):
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(target, link)
            if parts is not None:
                written.add(name)
    finally:
        archive.close()
        payload.close()
    missing = sorted(set(wanted) - written)
    if missing:
        raise InvalidInput(f"{path}: the payload is truncated or damaged: {len(missing)} file(s) the header lists "
                           f"are not in it, e.g. {missing[0]}")
    for parts in wanted.values():
        if _is_module(parts):
            modules += 1
    return modules


@contextlib.contextmanager
def extracted(path: Path, kver: str | None = None, *, tmpdir: Path | None = None
              ) -> Iterator[tuple[PackageSource, str]]:
    """Read the RPM at path and extract its modules and modprobe.d files for its kernel.

    Yields (PackageSource, KVER): KVER is the version of the package's *-uname-r provide; if kver
    is given it must be that. The extracted copy is removed when the block ends."""
    path = Path(path)
    rpm = import_rpm()
    with _open(path) as f:
        ts = rpm.TransactionSet()
        ts.setVSFlags(rpm._RPMVSF_NOSIGNATURES)  # digests stay on
        ts.setKeyring(rpm.keyring())  # no key is needed, and the system's are never consulted
        with _rpm_log(rpm, path) as said:
            try:
                rfd = rpm.fd.open(f)
                hdr = ts.hdrFromFdno(rfd)
                offset = rfd.tell()
                rfd.close()
            except (rpm.error, OSError, ValueError) as exc:
                detail = said() or str(exc)
                raise InvalidInput(f"{path} is not a readable RPM package: its header is truncated or damaged",
                                   hint=f"rpm says: {detail}") from None
        name = _s(hdr["name"])
        if hdr.isSource():
            raise InvalidInput(f"{path} is a source package ({name}), not a kernel module package")
        evr = f"{_s(hdr['version'])}-{_s(hdr['release'])}"
        epoch = hdr["epoch"]
        version = f"{epoch}:{evr}" if epoch is not None else evr
        nevra = f"{name}-{version}.{_s(hdr['arch'])}"
        provide = _uname_r(hdr, name)
        if provide is None:
            raise InvalidInput(f"{path} ({nevra}) is not a kernel module package: it has no *-uname-r provide "
                               "naming its kernel (such as kernel-modules-uname-r = KVER)")
        request_name, pkg_kver = provide
        if kver is not None and kver != pkg_kver:
            raise InvalidInput(f"{path} ({nevra}) is for kernel {pkg_kver}, not {kver}",
                               hint="leave out --kver: the RPM names its kernel itself")
        # Fedora's packages provide NAME-uname-r = KVER; SUSE's kernel-default provides only
        # kernel-uname-r (every flavour does): ask for the package's exact version there.
        form = requests.UNAME_R if request_name == f"{name}-uname-r" else requests.NAME_VERSION
        try:
            request = requests.build(form, name, pkg_kver, version, spelling=pkg_kver)
        except InvalidInput as exc:
            raise InvalidInput(f"{path} ({nevra}): {exc.message}") from None
        head = _check_payload_digest(f, offset, hdr, path)
        comp = _compressor(rpm, hdr, head, path)
        try:
            root = Path(tempfile.mkdtemp(prefix="kmodguard-rpm.", dir=tmpdir))
        except OSError as exc:
            raise KmodguardError(f"cannot create a temporary directory to extract {path}: {exc}") from None
        try:
            with _rpm_log(rpm, path) as said:
                try:
                    modules = _extract(rpm, hdr, f, offset, comp, root, pkg_kver, path)
                except (rpm.error, ValueError) as exc:
                    raise InvalidInput(f"{path}: the payload is truncated or damaged ({exc})",
                                       hint=f"rpm says: {said()}" if said() else None) from None
                except OSError as exc:
                    if exc.errno is not None and exc.errno < 0:  # rpm's own (negative) archive error codes
                        raise InvalidInput(f"{path}: the payload is truncated or damaged ({exc.strerror or exc})",
                                           hint=f"rpm says: {said()}" if said() else None) from None
                    raise KmodguardError(f"cannot extract {path} into {root}: {exc}") from None
            if modules == 0:
                raise InvalidInput(f"{path} ({nevra}) holds no kernel modules for kernel {pkg_kver}",
                                   hint=f"expected .ko files under /lib/modules/{pkg_kver} or /usr/lib/modules/{pkg_kver}")
            source = PackageSource(name, version, request, root,
                                   {"from-rpm": str(path.resolve()), "nevra": nevra},
                                   rebuilds_initramfs=_rebuilds_initramfs(hdr))
            log.debug("%s: %s, %d modules, request %r", path, nevra, modules, request)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    try:
        yield source, pkg_kver
    finally:
        shutil.rmtree(root, ignore_errors=True)
