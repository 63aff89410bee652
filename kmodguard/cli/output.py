"""Human and JSON output. JSON: exactly one document on stdout. Progress and messages: stderr."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import sys
from json.encoder import encode_basestring_ascii  # what json.dumps writes for a str (ASCII)


def _json_safe(value):
    """Bytes that are not UTF-8 (kept as surrogates) become '\\xNN' text: a lone surrogate in JSON
    is refused by strict parsers."""
    if isinstance(value, str):
        if any("\udc80" <= c <= "\udcff" for c in value):
            return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c for c in value)
        return value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def emit_json(doc) -> None:
    """One document on stdout: indented for a person at a terminal, compact (json's C encoder,
    several times faster on 9,000 results) for a pipe."""
    indent = 2 if sys.stdout.isatty() else None
    _write_json(json.dumps(doc, indent=indent, ensure_ascii=True).encode(), lambda: doc, indent)


def emit_json_results(head: dict, key: str, first: str, results: list[tuple[str, dict]]) -> None:
    """emit_json({**head, key: [{first: value, **body} for value, body in results]}), where many
    results share one body object (explain: modaliases that match the same modules share one
    verdict). For a pipe, each body is encoded once and the pieces, as bytes, are joined once:
    the bytes json.dumps would write, without encoding 9,000 results' reasons and candidates
    (45 ms), nor copying 9 MB of text four times (15 ms)."""
    def doc():
        return {**head, key: [{first: value, **body} for value, body in results]}

    if sys.stdout.isatty() or key in head:
        emit_json(doc())
        return
    tails: dict[int, bytes] = {}  # id(body) -> its JSON without the opening brace
    name = ("{" + encode_basestring_ascii(first) + ": ").encode()
    text = json.dumps({**head, key: []}, ensure_ascii=True)  # ends with the empty list: '[]}'
    parts = [text[:-3].encode(), b"["]
    for i, (value, body) in enumerate(results):
        tail = tails.get(id(body))
        if tail is None:
            tail = tails[id(body)] = ((", " if body else "") + json.dumps(body, ensure_ascii=True)[1:]).encode()
        parts += (b", " if i else b"", name, encode_basestring_ascii(value).encode(), tail)
    parts.append(b"]}")
    _write_json(b"".join(parts), doc, None)


def _write_json(data: bytes, doc, indent: int | None) -> None:
    """data, the JSON of doc() (called only in the rare case below), and a newline to stdout.

    ensure_ascii JSON is printable ASCII, blanks and (indented) newlines only: json escapes every
    other character, DEL included, so _Printable has nothing to escape in it. The bytes go to the
    binary buffer under the text stream where there is one (its scan of 9 MB of explain results
    and the text layer's encoding are skipped); through the stream itself otherwise (a stream that
    outlives its reader)."""
    if b"\\udc" in data:  # a byte that was not UTF-8 may be in there (rare): rewrite those strings
        data = json.dumps(_json_safe(doc()), indent=indent, ensure_ascii=True).encode()
    out = sys.stdout._stream if isinstance(sys.stdout, _Printable) else sys.stdout
    if isinstance(out, io.TextIOWrapper):
        out.flush()  # what was written as text goes first
        out.buffer.write(data)
        out.buffer.write(b"\n")
        out.buffer.flush()
    else:
        out.write(data.decode("ascii") + "\n")


def progress(message: str) -> None:
    print(f"kmodguard: {message}", file=sys.stderr, flush=True)


class _OutlivesItsReader:
    """A text stream that, once its reader is gone (EPIPE), goes on writing to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def _to_devnull(self) -> None:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, self._stream.fileno())
        os.close(fd)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()
            self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


# What a terminal would act on: C0 controls but newline and tab, DEL, C1 controls (ESC [ and
# its one-byte form CSI start escape sequences), and bytes that were not UTF-8 (surrogates).
_UNPRINTABLE = "[\x00-\x08\x0b-\x1f\x7f-\x9f\udc80-\udcff]"


def _plain(text: str) -> bool:
    """ASCII with no control character but newline and tab: most of what is written, told in C
    (compiling _UNPRINTABLE is half a millisecond of every command's start)."""
    return text.isascii() and (text.isprintable() or text.replace("\n", " ").replace("\t", " ").isprintable())


def _escape(match: re.Match) -> str:
    c = match.group()
    return f"\\x{ord(c) - 0xDC00:02x}" if c >= "\udc80" else f"\\x{ord(c):02x}"


class _Printable:
    """A text stream that shows every control character escaped: text from an index, a device or
    a caller never reaches a terminal raw, whichever message carries it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if not _plain(text):
            text = re.sub(_UNPRINTABLE, _escape, text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def printable_streams() -> None:
    """Escape control characters in everything kmodguard writes to stdout and stderr (JSON has
    none raw: json.dumps escapes them)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Printable):
            setattr(sys, name, _Printable(stream))


def outlive_the_reader() -> None:
    """A fix the daemon started as a child reports on a pipe the daemon reads; when the daemon
    stops (a restart), the fix must go on, not die of EPIPE halfway through a transaction."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _OutlivesItsReader):
            setattr(sys, name, _OutlivesItsReader(stream))


def safe(text: str | None, limit: int = 0) -> str:
    """Device strings are untrusted: show control characters escaped, never raw, on a terminal."""
    if text is None:
        return "-"
    # a byte that was not UTF-8 (read with surrogateescape) is shown as the byte, \xNN
    shown = "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c for c in text)
    shown = shown.encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in shown)
    if limit and len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return shown


def install_command(package_manager: str | None, requests: list[str]) -> str:
    """The command a user would type to install exactly these packages."""
    quoted = " ".join(shlex.quote(r) for r in requests)
    if package_manager in ("dnf", "dnf5"):
        return f"sudo {package_manager} install {quoted}"
    if package_manager == "zypper":
        return f"sudo zypper install {quoted}"
    if package_manager == "apt-get":
        return f"sudo apt-get install {quoted}"
    return f"install {quoted} with this system's package manager"


HEADINGS = {
    "missing": "missing: a package that is not installed has the driver",
    "loadable": "loadable: an installed driver matches, but the device is not bound",
    "unindexed": "unindexed: no installed driver matches, and there is no package index to ask",
    "unknown": "unknown: this kernel has no driver for them",
    "ignored": "ignored: left unbound on purpose",
    "bound": "bound",
}
ORDER = ("missing", "loadable", "unindexed", "unknown", "ignored", "bound")


def table(rows: list[tuple[str, ...]], indent: str = "  ") -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)
