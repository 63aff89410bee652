"""udev events for an asyncio loop: a pyudev Monitor whose fd the loop watches (add_reader),
drained with poll(0). No thread, no timer: an idle daemon sleeps in epoll.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Callable

import pyudev

from ..devices import udev_context

log = logging.getLogger(__name__)

ACTIONS = frozenset({"add", "remove", "bind", "unbind", "change", "move"})
RECEIVE_BUFFER = 128 * 1024 * 1024  # what udevd itself asks for: an SR-IOV storm must not overflow it


def udevd_running(run_dir: str = "/run/udev") -> bool:
    """libudev's own test (udev_queue_get_udev_is_active): udevd's control socket exists."""
    return os.path.exists(os.path.join(run_dir, "control"))


class UdevWatch:
    """Delivers (action, syspath, properties) for every device event to `on_event`, and calls
    `on_overflow` when the kernel dropped events (the caller then rescans everything).

    Judge a device after udev has run its rules, not on the raw kernel event: when udevd runs,
    listen on its "udev" source (it re-broadcasts after its rules, e.g. 80-drivers.rules loading
    an installed module); otherwise on the kernel's.
    """

    def __init__(self, loop, on_event: Callable[[str, str, dict], None], on_overflow: Callable[[], None],
                 context: pyudev.Context | None = None, source: str | None = None):
        self.loop = loop
        self.on_event = on_event
        self.on_overflow = on_overflow
        self.context = context or udev_context()
        self.source = source or ("udev" if udevd_running() else "kernel")
        self.monitor = pyudev.Monitor.from_netlink(self.context, source=self.source)
        try:
            self.monitor.set_receive_buffer_size(RECEIVE_BUFFER)  # SO_RCVBUFFORCE: needs CAP_NET_ADMIN
        except (OSError, ValueError) as exc:
            log.debug("keeping the default netlink receive buffer: %s", exc)
        self.monitor.start()
        loop.add_reader(self.monitor.fileno(), self._drain)

    def close(self) -> None:
        self.loop.remove_reader(self.monitor.fileno())

    def _drain(self) -> None:
        while True:
            try:
                device = self.monitor.poll(0)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    log.warning("udev events were lost (the receive buffer overflowed): rescanning every device")
                    self.on_overflow()
                    continue
                log.warning("reading a udev event failed: %s", exc)
                return
            if device is None:
                return
            action = device.action
            if action not in ACTIONS:
                continue
            try:
                properties = dict(device.properties)
            except UnicodeDecodeError:  # hostile values: the judging reads sysfs itself
                properties = {}
            self.on_event(action, device.sys_path, properties)
