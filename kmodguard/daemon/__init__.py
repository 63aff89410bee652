"""kmodguard's daemon: `kmodguard daemon`, the ExecStart of kmodguard.service.

  service.py  the daemon itself: coldplug, udev bursts, decisions, offers, fixes, snapshot, MOTD
  monitor.py  pyudev's monitor on the asyncio loop
  runner.py   where a fix runs: kmodguard-fix.service under systemd, else a child process
  bus.py      the D-Bus front (org.kmodguard.Daemon1) with authorization
  systemd.py  sd_notify and the watchdog (MESSAGE_IDs: kmodguard.journal)
"""

from __future__ import annotations

import asyncio
import logging
import os

from .. import config as config_mod
from ..paths import Paths

log = logging.getLogger("kmodguard.daemon")


EXIT_LOST_BUS = 1  # non-zero: systemd's Restart=on-failure starts a daemon that owns the name again


async def _main(paths: Paths, use_bus: bool) -> int:
    from .service import Daemon

    daemon = Daemon(paths, config_mod.load(paths.config_dir))
    bus = None
    if use_bus:
        from ..dbus import quiet_answered_errors
        from .bus import serve

        quiet_answered_errors(asyncio.get_running_loop())  # no traceback per refused call
        bus = await serve(daemon, os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or None)
    lost = []
    watcher = None
    if bus is not None:
        async def watch_bus() -> None:
            # The bus may drop the daemon (a reply over its message limit, dbus-daemon restarted):
            # a daemon without its name serves nobody, so it exits and is restarted.
            try:
                await bus.wait_for_disconnect()
                why = "the bus closed the connection"
            except Exception as exc:  # dbus-next raises what cut the connection
                why = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
            lost.append(why)
            log.error("lost the system bus connection (%s): exiting so that the service manager restarts kmodguard",
                      why)
            daemon.stop()

        watcher = asyncio.get_running_loop().create_task(watch_bus())
    try:
        await daemon.run()
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
        if bus is not None and not lost:
            bus.disconnect()
    return EXIT_LOST_BUS if lost else 0


def run(paths: Paths, use_bus: bool = True) -> int:
    from ..fsutil import make_dir

    make_dir(paths.runtime_dir)
    make_dir(paths.state_dir)
    return asyncio.run(_main(paths, use_bus))
