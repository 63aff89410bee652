"""Running a package manager: argument list, LC_ALL=C, no stdin, its own session, a hard timeout."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from ..errors import KmodguardError

log = logging.getLogger(__name__)


def run(args: list[str], timeout: float, name: str, env_extra: dict | None = None,
        cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", **(env_extra or {})}
    log.debug("running %s", args)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        log.info("%s output before it was stopped:\n%s", name, (out + err).decode(errors="replace"))
        raise KmodguardError(f"{name} did not finish within {timeout:.0f} s and was stopped",
                             hint="its output is in the journal; raise timeouts.package_manager in "
                                  "/etc/kmodguard if the repositories are slow") from None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def last_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in (res.stderr + res.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"
