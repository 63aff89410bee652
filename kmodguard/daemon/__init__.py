"""kmodguard's daemon: `kmodguard daemon`, the ExecStart of kmodguard.service.

  service.py  the daemon itself: coldplug, udev bursts, decisions, offers, fixes, snapshot, MOTD
  monitor.py  pyudev's monitor on the asyncio loop
  runner.py   where a fix runs: kmodguard-fix.service under systemd, else a child process
  bus.py      the D-Bus front (org.kmodguard.Daemon1) with authorization
  systemd.py  sd_notify, the watchdog, journal MESSAGE_IDs
"""

from __future__ import annotations

import asyncio
import logging
import os

from .. import config as config_mod
from ..paths import Paths

log = logging.getLogger("kmodguard.daemon")


async def _main(paths: Paths, use_bus: bool) -> None:
    from .service import Daemon

    daemon = Daemon(paths, config_mod.load(paths.config_dir))
    bus = None
    if use_bus:
        from ..dbus import quiet_answered_errors
        from .bus import serve

        quiet_answered_errors(asyncio.get_running_loop())  # no traceback per refused call
        bus = await serve(daemon, os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or None)
    try:
        await daemon.run()
    finally:
        if bus is not None:
            bus.disconnect()


def run(paths: Paths, use_bus: bool = True) -> int:
    paths.runtime_dir.mkdir(parents=True, exist_ok=True)
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(_main(paths, use_bus))
    return 0
