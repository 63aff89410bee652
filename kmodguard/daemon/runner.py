"""Where the privileged fix runs: never inside the daemon's own process.

When systemd is PID 1 and kmodguard-fix.service is installed, the daemon starts that oneshot unit:
restarting the daemon (for example while its own package is upgraded) then never kills a package
transaction. Without systemd, the same command runs as a child process in a session of its own,
so that it too outlives the daemon. Either way the fix reads the daemon's request file and
records its report in STATE_DIR/last-fix.json; the daemon reads the outcome from there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from . import systemd

log = logging.getLogger(__name__)

FIX_UNIT = "kmodguard-fix.service"


# The kmodguard this daemon runs: the child imports it from there and from nowhere a caller chose.
_HOME = str(Path(__file__).resolve().parent.parent.parent)
_BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from kmodguard.cli import run; run()"


def fix_command(request: Path) -> list[str]:
    """The command the child process runs; the same as kmodguard-fix.service's ExecStart.

    Isolated (-I: no PYTHON* variables, no user site, neither the working directory nor a
    script's directory on sys.path) and started in / (ChildRunner): a ./kmodguard/__main__.py
    planted where the daemon was started must never run as root."""
    return [sys.executable, "-I", "-c", _BOOT, _HOME, "fix", "--yes", "--json", "--request", str(request)]


async def _run(args: list[str], progress: Callable[[str], None] | None = None, **kw) -> int:
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                                                start_new_session=True, **kw)
    assert proc.stderr is not None
    async for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        if line:
            log.info("fix: %s", line.removeprefix("kmodguard: "))
            if progress:
                progress(line.removeprefix("kmodguard: "))
    return await proc.wait()


class ChildRunner:
    """The fix as a child process that sees the daemon's paths (options included)."""

    name = "child process"

    def __init__(self, environment: dict[str, str]):
        self.environment = environment

    async def run(self, request: Path, progress: Callable[[str], None]) -> int:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        return await _run(fix_command(request), progress, env={**env, **self.environment}, cwd="/")


class UnitRunner:
    """kmodguard-fix.service: its TimeoutStartSec= is the fix's deadline (the fix's own package
    manager and dracut deadlines are shorter)."""

    name = FIX_UNIT

    async def run(self, request: Path, progress: Callable[[str], None]) -> int:
        # `systemctl start` waits for a oneshot unit to finish; its output goes to the journal.
        progress(f"running {FIX_UNIT} (journalctl -u {FIX_UNIT} shows its progress)")
        return await _run(["systemctl", "start", FIX_UNIT])


async def choose(environment: dict[str, str]) -> ChildRunner | UnitRunner:
    """The unit when systemd runs and it is installed, else a child process given `environment`."""
    if systemd.booted():
        try:
            proc = await asyncio.create_subprocess_exec(
                "systemctl", "show", "--property=LoadState", "--value", FIX_UNIT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                out = b""
            if out.decode().strip() == "loaded":
                return UnitRunner()
        except OSError:
            pass
        log.info("%s is not installed: fixes run as child processes", FIX_UNIT)
    return ChildRunner(environment)
