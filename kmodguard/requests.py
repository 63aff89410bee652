"""Package requests: what a package manager is asked for, built by kmodguard, checked where used.

A request is never a string taken from an index as it is. It is built from a package name and
the kernel (or the package's version) in one of the forms distributions use:

  uname-r       NAME-uname-r = KVER   Fedora, RHEL, Amazon Linux (the exact-version provide;
                                      KVER is the kernel release, or, when it holds more than
                                      one '-', which an RPM version cannot, the same with every
                                      '-' after the first as '.')
  name-kver     NAME                  Debian, Ubuntu: the package name ends in -KVER
  name-version  NAME = VERSION        SUSE: the package's exact version
  name          NAME                  a firmware package, asked for by its exact name (the
                                      allow-list 'firmware_packages' admits it); only where a
                                      backend says it takes this form (checked(..., forms))

and parsed again, strictly, before any argument list is built (backends). Grammar: NAME is
[a-z0-9][a-z0-9+._-]*, KVER a kernel release \\d+.\\d+[.\\d+]([-.]WORD)*, VERSION starts with a
digit; ASCII only, at most 128 characters, no '/', '@', space (but the one ' = '), never a
leading '-'.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import InvalidInput

UNAME_R, NAME_KVER, NAME_VERSION, NAME = "uname-r", "name-kver", "name-version", "name"
FORMS = (UNAME_R, NAME_KVER, NAME_VERSION)  # what parse() recognises; NAME only where asked for
MAX = 128

_NAME = r"[a-z0-9][a-z0-9+._-]*"
_KVER = r"[0-9]+\.[0-9]+(?:\.[0-9]+)?(?:[-.][A-Za-z0-9._+~]+)*"
_VERSION = r"[0-9][A-Za-z0-9._+~^:-]*"
NAME_RE = re.compile(_NAME, re.ASCII)
KVER_RE = re.compile(_KVER, re.ASCII)
VERSION_RE = re.compile(_VERSION, re.ASCII)
_UNAME_R_RE = re.compile(rf"({_NAME})-uname-r = ({_KVER})", re.ASCII)
_NAME_VERSION_RE = re.compile(rf"({_NAME}) = ({_VERSION})", re.ASCII)


class Request(NamedTuple):
    form: str
    package: str  # the package name (for uname-r: NAME of NAME-uname-r)
    version: str  # KVER (uname-r, name-kver) or VERSION (name-version)
    text: str  # exactly what the package manager gets


def _refuse(text, why: str):
    shown = repr(text[:MAX]) if isinstance(text, str) else type(text).__name__
    raise InvalidInput(f"{shown} is not a package request kmodguard makes: {why}",
                       hint="requests are NAME-uname-r = KVER, NAME-KVER or NAME = VERSION")


def parse(text) -> Request:
    """The request `text`, if it is exactly one of the three forms; InvalidInput otherwise."""
    if not isinstance(text, str) or not text or len(text) > MAX or not text.isascii():
        _refuse(text, "not a short ASCII string")
    m = _UNAME_R_RE.fullmatch(text)
    if m:
        return Request(UNAME_R, m[1], m[2], text)
    m = _NAME_VERSION_RE.fullmatch(text)
    if m:
        return Request(NAME_VERSION, m[1], m[2], text)
    if NAME_RE.fullmatch(text):
        # the name must end in a kernel release: the shortest base that leaves one
        for i in (i for i, c in enumerate(text) if c == "-"):
            if i and KVER_RE.fullmatch(text[i + 1:]):
                return Request(NAME_KVER, text, text[i + 1:], text)
        _refuse(text, "a bare package name must end in -KVER (Debian's linux-modules-extra-KVER)")
    _refuse(text, "it has characters or a shape no request form allows")


def rpm_spelling(kver: str) -> str:
    """6.1.0-56-amd64 -> 6.1.0-56.amd64 (an RPM VERSION-RELEASE holds one '-'); else kver."""
    head, sep, tail = kver.partition("-")
    return head + sep + tail.replace("-", ".")


def build(form: str, package: str, kernel: str, version: str = "", spelling: str | None = None) -> str:
    """The request for package (an allow-listed name) and kernel, in form; checked by parse()."""
    if not NAME_RE.fullmatch(package or "") or not package.isascii():
        _refuse(package, "the package name is not [a-z0-9][a-z0-9+._-]*")
    if not KVER_RE.fullmatch(kernel or "") or not kernel.isascii():
        _refuse(kernel, "the kernel is not a kernel release")
    if form == UNAME_R:
        kver = spelling if spelling in (kernel, rpm_spelling(kernel)) else None
        if spelling is None:
            kver = rpm_spelling(kernel) if kernel.count("-") > 1 else kernel
        if kver is None:
            _refuse(f"{package}-uname-r = {spelling}", f"it names another kernel than {kernel}")
        text = f"{package}-uname-r = {kver}"
    elif form == NAME_KVER:
        if not package.endswith("-" + kernel):
            _refuse(package, f"a Debian modules package is named NAME-{kernel}")
        text = package
    elif form == NAME_VERSION:
        if not VERSION_RE.fullmatch(version or "") or not version.isascii():
            _refuse(f"{package} = {version}", "the version is not an exact package version")
        text = f"{package} = {version}"
    else:
        raise ValueError(form)
    return parse(text).text


def for_package(package: str, kernel: str, version: str, stored: str) -> str:
    """The request kmodguard builds for an indexed package, in the form the index chose: the stored
    request must be exactly that one (InvalidInput otherwise). Only the built string is used."""
    req = parse(stored)
    if req.form == UNAME_R:
        built = build(UNAME_R, package, kernel, spelling=req.version)
    elif req.form == NAME_KVER:
        built = build(NAME_KVER, package, kernel)
    else:
        built = build(NAME_VERSION, package, kernel, version)
    if built != stored:
        _refuse(stored, f"kmodguard builds {built!r} for package {package!r} and kernel {kernel}")
    return built


def build_name(package: str) -> str:
    """The request for a package asked for by its exact name (firmware packages)."""
    return parse_name(package).text


def parse_name(text) -> Request:
    """A bare package name, as a request of form NAME; InvalidInput otherwise."""
    if not isinstance(text, str) or not text or len(text) > MAX or not text.isascii() or not NAME_RE.fullmatch(text):
        _refuse(text, "a package asked for by name must be [a-z0-9][a-z0-9+._-]*, ASCII, at most 128 characters")
    return Request(NAME, text, "", text)


def parse_any(text, forms=FORMS) -> Request:
    """parse(), or a bare name when NAME is among forms (a name that happens to end in something
    like a kernel release, firmware-misc-20230210, is still just a name then)."""
    if NAME in forms and isinstance(text, str) and NAME_RE.fullmatch(text):
        req = parse_name(text)
        try:
            if parse(text).form in forms:
                return parse(text)
        except InvalidInput:
            pass
        return req
    return parse(text)


def checked(requests, forms=FORMS, backend: str = "the package manager", names_allowed=None) -> list[str]:
    """Backends: every request parsed again and of a form this package manager takes. A bare name
    (form NAME) passes only when names_allowed(name) says so (the firmware allow-list)."""
    out = []
    for text in requests:
        req = parse_any(text, forms if names_allowed is not None else tuple(f for f in forms if f != NAME))
        if req.form == NAME and not names_allowed(req.package):
            raise InvalidInput(f"{text!r} is a bare package name that firmware_packages does not admit; "
                               f"{backend} is asked for nothing else by name")
        if req.form not in forms:
            raise InvalidInput(f"{text!r} is a {req.form} request, which {backend} does not take "
                               f"(it takes {', '.join(forms)})")
        out.append(req.text)
    return out


# --- firmware file names (from modinfo: data), checked before they reach a package manager's query

# A relative path of name characters: no glob ('*?[' would make a query a pattern), no ',' (dnf
# splits option values on it), no '..' component, no leading '-' or '/'.
FIRMWARE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+~-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.+~-]*)*", re.ASCII)
FIRMWARE_MAX = 255


def firmware_name_ok(name) -> bool:
    """Can this firmware name (as a module's modinfo gives it) be asked about exactly?"""
    return isinstance(name, str) and len(name) <= FIRMWARE_MAX and FIRMWARE_RE.fullmatch(name) is not None


def firmware_names(names) -> list[str]:
    """Backends: every firmware name checked again; InvalidInput on the first bad one."""
    for name in names:
        if not firmware_name_ok(name):
            shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
            raise InvalidInput(f"{shown} is not a firmware file name kmodguard asks about "
                               "(a relative path of [A-Za-z0-9_.+~-] words, no patterns)")
    return list(names)
