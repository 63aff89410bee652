"""Running a package manager: kmodguard.process.run, with the hint a slow repository needs."""

from __future__ import annotations

import subprocess

from ..process import last_line, run as run_command

__all__ = ["last_line", "run"]

SLOW_HINT = ("its output is in the journal; raise timeouts.package_manager in /etc/kmodguard "
             "if the repositories are slow")


def run(args: list[str], timeout: float, name: str, env_extra: dict | None = None,
        cwd=None, keep_lines: tuple[bytes, ...] = ()) -> subprocess.CompletedProcess:
    return run_command(args, timeout, name, env_extra=env_extra, cwd=cwd, timeout_hint=SLOW_HINT,
                       keep_lines=keep_lines)
