"""Running an external command: the one way kmodguard does it.

An argument list (never a shell), LC_ALL=C so that output parses the same everywhere, no stdin,
a session of its own, output captured (up to OUTPUT_CAP bytes a stream), and a hard deadline:
at the deadline the command's whole process group gets SIGTERM, then SIGKILL. When the command
itself has exited, its result stands even if a child it left behind (a daemon that called setsid,
out of reach of the group) still holds the pipes: kmodguard stops reading after EXIT_GRACE seconds
instead of waiting for that child.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import subprocess
import sys
import time

from .errors import KmodguardError


def _log():
    """The module's logger, with logging imported on first use: status imports this module (its
    package backend) without running anything, and logging is 3 ms of a cold start."""
    import logging

    return logging.getLogger(__name__)


def _debug(message: str, *args) -> None:
    """A debug line, only when logging is in use (the CLI sets it up for -v or the journal): else
    no handler can want it, and importing logging for it would cost every cold status 3 ms."""
    if "logging" in sys.modules:
        _log().debug(message, *args)


OUTPUT_CAP = 16 << 20  # bytes kept per stream; the rest is read and dropped
EXIT_GRACE = 2.0  # seconds to drain the pipes after the command exited
TERM_GRACE = 5.0  # seconds between SIGTERM and SIGKILL at the deadline


class CommandTimedOut(KmodguardError):
    """The command ran past its deadline and was stopped."""


def c_locale(extra: dict | None = None) -> dict[str, str]:
    """This process's environment with the C locale (and extra variables)."""
    return {**os.environ, "LC_ALL": "C", "LANG": "C", **(extra or {})}


def run(args: list[str], timeout: float, name: str | None = None, *, env_extra: dict | None = None, cwd=None,
        merge_stderr: bool = False, pass_fds: tuple[int, ...] = (), text: bool = True,
        timeout_hint: str | None = None, keep_lines: tuple[bytes, ...] = ()) -> subprocess.CompletedProcess:
    """Run args to completion within timeout seconds.

    keep_lines: keep only the stdout lines that start with one of these prefixes (a command whose
    whole output is far over OUTPUT_CAP, such as a Contents index, of which a few lines matter).

    Returns the CompletedProcess (stdout/stderr as str, or bytes with text=False; stderr is None
    with merge_stderr). Raises KmodguardError when the command cannot be started and
    CommandTimedOut (after stopping it) at the deadline.
    """
    return start(args, timeout, name, env_extra=env_extra, cwd=cwd, merge_stderr=merge_stderr, pass_fds=pass_fds,
                 text=text, timeout_hint=timeout_hint, keep_lines=keep_lines).result()


def start(args: list[str], timeout: float, name: str | None = None, *, env_extra: dict | None = None, cwd=None,
          merge_stderr: bool = False, pass_fds: tuple[int, ...] = (), text: bool = True,
          timeout_hint: str | None = None, keep_lines: tuple[bytes, ...] = ()) -> "Started":
    """Start args, as run() would, and return at once: the command works beside the caller (depmod
    beside the module reads, systemd-detect-virt beside a cold start) until Started.result(). Its
    deadline counts from now. Output is read only in result(): a command that writes more than a
    pipe holds waits until then."""
    name = name or os.path.basename(args[0])
    _debug("running %s", args)
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                                env=c_locale(env_extra), cwd=cwd, start_new_session=True, pass_fds=pass_fds)
    except OSError as exc:
        raise KmodguardError(f"cannot run {name}: {exc.strerror or exc}") from None
    return Started(proc, name, time.monotonic() + timeout, timeout, text=text, merge_stderr=merge_stderr,
                   timeout_hint=timeout_hint, keep_lines=keep_lines)


class Started:
    """A command start() started: result() waits for it (at most until its deadline)."""

    def __init__(self, proc: subprocess.Popen, name: str, deadline: float, timeout: float, *, text: bool,
                 merge_stderr: bool, timeout_hint: str | None, keep_lines: tuple[bytes, ...]):
        self._proc, self.name, self._deadline, self._timeout = proc, name, deadline, timeout
        self._text, self._merge, self._hint, self._keep = text, merge_stderr, timeout_hint, keep_lines

    def stop(self) -> None:
        """Kill the command's group now (its work is of no use); result() then returns at once."""
        _signal_group(self._proc, signal.SIGKILL)

    def result(self) -> subprocess.CompletedProcess:
        """The CompletedProcess, as run() returns it; CommandTimedOut (the group stopped) at the deadline."""
        proc = self._proc
        try:
            out, err, timed_out = _collect(proc, self._deadline, self._keep)
        except BaseException:
            _stop(proc, 0)
            raise
        finally:
            for pipe in (proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        if timed_out:
            _log().info("%s output before it was stopped:\n%s", self.name, (out + err).decode(errors="replace"))
            raise CommandTimedOut(f"{self.name} did not finish within {self._timeout:g} s and was stopped",
                                  hint=self._hint)
        decode = (lambda b: b.decode(errors="replace")) if self._text else (lambda b: b)
        return subprocess.CompletedProcess(proc.args, proc.returncode, decode(out),
                                           None if self._merge else decode(err))


def _collect(proc: subprocess.Popen, deadline: float, keep_lines: tuple[bytes, ...] = ()) -> tuple[bytes, bytes, bool]:
    """(stdout, stderr, timed out) read until both pipes end, or EXIT_GRACE after the command
    exited, or the deadline (then the group is stopped and what is buffered is read briefly)."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()} if proc.stderr else {proc.stdout: bytearray()}
    partial = bytearray()  # stdout's unfinished line, with keep_lines

    def add(fileobj, chunk: bytes) -> None:
        nonlocal partial
        buf = buffers[fileobj]
        if keep_lines and fileobj is proc.stdout:
            *lines, rest = (bytes(partial) + chunk).split(b"\n")
            partial = bytearray(rest if len(rest) < OUTPUT_CAP else b"")
            chunk = b"".join(line + b"\n" for line in lines if line.startswith(keep_lines))
        if len(buf) < OUTPUT_CAP:
            buf += chunk[:OUTPUT_CAP - len(buf)]
    timed_out = False
    drain_until = None
    with selectors.DefaultSelector() as sel:
        for pipe in buffers:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if drain_until is None:
                if proc.poll() is not None:
                    drain_until = now + EXIT_GRACE
                elif now >= deadline:
                    timed_out = True
                    _stop(proc, TERM_GRACE)
                    drain_until = time.monotonic() + 0.5
            elif now >= drain_until:
                break  # a child that left the group holds the pipes: its output is not the command's
            wait = 0.05 if drain_until is not None else min(0.2, max(deadline - now, 0.01))
            for key, _ in sel.select(wait):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    if keep_lines and key.fileobj is proc.stdout and partial:
                        add(proc.stdout, b"\n")  # the last line had no newline
                    continue
                add(key.fileobj, chunk)
    if proc.poll() is None:  # the pipes closed early and the command still runs: give it the rest of its time
        try:
            _wait(proc, max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc, TERM_GRACE)
    values = list(buffers.values())
    return bytes(values[0]), bytes(values[1]) if len(values) > 1 else b"", timed_out


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    """proc.wait(timeout), woken by the exit itself (a pidfd) rather than by Popen.wait's polling
    sleeps: the pipes usually close a moment before the command is reaped, and each poll that
    finds it still running sleeps 0.5 ms or more."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or before 5.3
        proc.wait(timeout=timeout)
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        raise subprocess.TimeoutExpired(proc.args, timeout)
    proc.wait()


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the command's process group (unless grace is 0), SIGKILL after grace seconds;
    reaps the command."""
    if grace:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def last_line(res: subprocess.CompletedProcess) -> str:
    """The last non-blank line of a command's output, for one-line error messages."""
    lines = [line for line in ((res.stderr or "") + (res.stdout or "")).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"
