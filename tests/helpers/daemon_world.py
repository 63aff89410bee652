"""Real pieces around `kmodguard daemon` for its tests: a private system-like dbus-daemon with a
real policy (units/org.kmodguard.Daemon1.conf included as it ships), a umockdev testbed owned by
the test process (it adds devices and sends uevents), an sd_notify socket, a D-Bus client that
collects signals, and the daemon itself as a subprocess under umockdev's preload.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "units" / "org.kmodguard.Daemon1.conf"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- as Debian's and Fedora's system.conf: everyone may talk to the bus, nobody owns names or
       calls methods unless a policy file allows it -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
{policies}
</busconfig>
"""
# kmodguard's own policy as it ships, and root standing in for polkitd (dbusmock's)
KMODGUARD_POLICIES = f"""  <policy context="default">
    <!-- polkitd's own policy lets everyone ask it -->
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
  <policy user="root">
    <allow own="org.freedesktop.PolicyKit1"/>
    <allow send_type="method_call"/>
  </policy>
  <include>{POLICY}</include>"""


class SystemBus:
    """dbus-daemon with a system bus configuration on a private socket; stopped by its PID.
    policies: the configuration's policy part (kmodguard's own, and root standing in for polkitd)."""

    def __init__(self, policies: str = KMODGUARD_POLICIES):
        # in a directory every user can reach: the unprivileged callers of the tests connect too
        self.dir = Path(tempfile.mkdtemp(prefix="kmg-bus-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        tmp = self.dir
        self.socket = tmp / "system_bus_socket"
        config = tmp / "system.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket, policies=policies))
        out = subprocess.run(["dbus-daemon", "--config-file", str(config), "--fork", "--nopidfile",
                              "--print-address=1", "--print-pid=1"], capture_output=True, text=True, timeout=30,
                             check=True)
        address, pid = out.stdout.split()
        self.address, self.pid = address, int(pid)
        self.env = {"DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def owner(self, name: str) -> bool:
        res = subprocess.run(["busctl", f"--address={self.address}", "status", name], capture_output=True,
                             text=True, timeout=10)
        return res.returncode == 0

    def wait_for(self, name: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
        """Until `name` has an owner; fails with proc's log when proc ends or the time is up."""
        deadline = time.monotonic() + timeout
        while not self.owner(name):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not come up on the test bus:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

class Testbed:
    """A umockdev testbed: the daemon (preloaded) sees its sysfs and receives its uevents.

    The testbed lives in an agent process under umockdev-wrapper (umockdev_agent.py): sending a
    uevent looks the device up with libudev, which must see the testbed's sysfs, not this
    machine's. This process reads and writes the testbed's files directly."""

    __test__ = False  # not a pytest test class

    def __init__(self):
        self.proc = subprocess.Popen(["umockdev-wrapper", sys.executable, str(Path(__file__).parent / "umockdev_agent.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.root = json.loads(self.proc.stdout.readline())["root"]

    def _do(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        assert answer["ok"], cmd
        return answer

    def add(self, records: str) -> None:
        self._do(op="add", records=records)

    def uevent(self, syspath: str, action: str) -> None:
        self._do(op="uevent", syspaths=[syspath], action=action)

    def uevents(self, syspaths: list[str], action: str, pace: float | None = None) -> list[float]:
        """A burst: every event sent back to back, or `pace` seconds apart. Returns when each was
        sent (time.monotonic(), the same clock in every process of this machine)."""
        return self._do(op="uevent", syspaths=syspaths, action=action,
                        **({"pace": pace} if pace is not None else {}))["sent"]

    def remove(self, syspath: str) -> None:
        self._do(op="remove", syspath=syspath)

    def link(self, syspath: str, name: str, target: str) -> None:
        self._do(op="link", syspath=syspath, name=name, target=target)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


class NotifySocket:
    """What systemd's NOTIFY_SOCKET would receive (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1),
    read all the time, as systemd does (sd_notify blocks once a datagram queue is full)."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict]] = []
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data and self._closed:
                return
            m = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), m))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30) -> dict:
        def found():
            return next((m for _, m in self.messages if key in m and (value is None or m[key] == value)), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {key}{'=' + value if value else ''} on the notify socket within "
                                     f"{timeout} s; got {[m for _, m in self.messages]}")
            return found()

    def drain(self) -> list[dict]:
        with self._cond:
            return [m for _, m in self.messages]

    def close(self) -> None:
        self._closed = True
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class BusClient:
    """A dbus-next connection on a thread of its own: calls, and every signal of kmodguard's
    interface collected in order."""

    def __init__(self, address: str):
        self.signals: "queue.Queue[tuple[float, str, list]]" = queue.Queue()
        self.seen: list[tuple[float, str, list]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.bus = self._await(self._connect(address))

    def _await(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self, address):
        from dbus_next.aio import MessageBus
        from dbus_next import Message, MessageType

        bus = await MessageBus(bus_address=address).connect()

        def on_message(message):
            if message.message_type == MessageType.SIGNAL and message.interface == "org.kmodguard.Daemon1":
                self.signals.put((time.monotonic(), message.member, list(message.body)))
            elif message.message_type == MessageType.SIGNAL and message.member == "PropertiesChanged":
                self.signals.put((time.monotonic(), "PropertiesChanged",
                                  [message.body[0], {k: v.value for k, v in message.body[1].items()}]))

        bus.add_message_handler(on_message)
        for rule in ("type='signal',interface='org.kmodguard.Daemon1'",
                     "type='signal',interface='org.freedesktop.DBus.Properties',path='/org/kmodguard/Daemon1'"):
            await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
        return bus

    def call(self, member: str, signature: str = "", body=(), timeout: float = 300,
             interface: str = "org.kmodguard.Daemon1"):
        """The reply message (METHOD_RETURN or ERROR)."""
        from dbus_next import Message

        return self._await(self.bus.call(Message(destination="org.kmodguard.Daemon1", path="/org/kmodguard/Daemon1",
                                                 interface=interface, member=member, signature=signature,
                                                 body=list(body))), timeout)

    def get_property(self, name: str):
        reply = self.call("Get", "ss", ["org.kmodguard.Daemon1", name], interface="org.freedesktop.DBus.Properties")
        return reply.body[0].value

    def wait_signal(self, member: str, predicate=lambda body: True, timeout: float = 30) -> tuple[float, list]:
        for t, m, body in self.seen:
            if m == member and predicate(body):
                return t, body
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {member} signal within {timeout} s; seen: {[(m, b) for _, m, b in self.seen]}")
            try:
                t, m, body = self.signals.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append((t, m, body))
            if m == member and predicate(body):
                return t, body

    def drain(self) -> list[tuple[str, list]]:
        while True:
            try:
                self.seen.append(self.signals.get_nowait())
            except queue.Empty:
                return [(m, b) for _, m, b in self.seen]

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# umockdev hands uevents to a listener over a unix datagram socket, whose queue holds only
# net.unix.max_dgram_qlen (10) messages; when it is full umockdev's sender aborts. A real
# netlink socket buffers a whole burst (the daemon asks for 128 MiB). So the daemon runs in a
# network namespace of its own (it needs no network: the bus, the notify and umockdev sockets
# are paths) where that limit is raised, leaving this machine's setting alone.
DEEP_UEVENT_QUEUE = ["unshare", "--net", "--", sys.executable, "-c",
                     "import os, sys\n"
                     "open('/proc/sys/net/unix/max_dgram_qlen', 'w').write('4096')\n"
                     "os.execvp(sys.argv[1], sys.argv[1:])"]


class DaemonProcess:
    """`kmodguard daemon --json` under umockdev's preload; its stderr (JSON log lines) to a file."""

    def __init__(self, env: dict, testbed: Testbed, tmp: Path, *, notify: NotifySocket | None = None,
                 bus: SystemBus | None = None, wrap: list[str] | None = None, extra_env: dict | None = None,
                 args: list[str] = (), stdout: Path | None = None):
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.env = {**env, "UMOCKDEV_DIR": testbed.root, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        if notify:
            self.env["NOTIFY_SOCKET"] = notify.path
        if bus:
            self.env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        self.args = [*(wrap or []), *DEEP_UEVENT_QUEUE, "umockdev-wrapper", sys.executable, "-m", "kmodguard",
                     "daemon", "--json", *args]
        if bus is None:
            self.args.append("--no-bus")
        self.log = open(self.log_path, "wb")
        self.stdout = open(stdout, "wb") if stdout else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.stdout, stderr=self.log,
                                     start_new_session=True)
        self.snapshot_path = Path(env["KMODGUARD_RUNTIME_DIR"]) / "state.json"
        self._terminated = False

    def snapshot(self) -> dict | None:
        try:
            return json.loads(self.snapshot_path.read_text())
        except (OSError, ValueError):
            return None

    def wait_until(self, predicate, timeout: float = 60, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        snap = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the daemon exited ({self.proc.returncode}):\n{self.log_text()}"
            snap = self.snapshot()
            if snap is not None and predicate(snap):
                return snap
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what or predicate}; snapshot: {json.dumps(snap, indent=1)}\n"
                             f"log:\n{self.log_text()}")

    def wait_started(self, timeout: float = 60) -> dict:
        return self.wait_until(lambda s: s.get("pid") == self.daemon_pid(), timeout, "the first snapshot")

    def daemon_pid(self) -> int | None:
        # umockdev-wrapper execs python: the PID is the daemon's
        return self.proc.pid

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def terminate(self) -> None:
        """SIGTERM, once: a second one could land while asyncio tears its loop down (its handlers
        gone) and kill the daemon mid-exit, as no service manager would."""
        if not self._terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 30) -> int:
        self.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # a hung daemon fails its test, and is not left behind
            self.kill_group()
            raise
        finally:
            self.log.close()
            if self.stdout is not subprocess.DEVNULL:
                self.stdout.close()
        return rc

    def kill_group(self) -> None:
        """SIGKILL the daemon and everything in its session (a fix child runs in a session of its own)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if not self.log.closed:
            self.log.close()


def pci_record(addr: str, modalias: str, *, parent: str = "/devices/pci0000:00", driver: str | None = None,
               attrs: dict | None = None, links: dict | None = None) -> str:
    lines = [f"P: {parent}/{addr}", "E: SUBSYSTEM=pci", f"E: PCI_SLOT_NAME={addr}", f"E: MODALIAS={modalias}",
             f"A: modalias={modalias}", "A: driver_override=(null)"]
    if driver:
        lines.append(f"E: DRIVER={driver}")
        lines.append(f"L: driver=../../../bus/pci/drivers/{driver}")
    lines += [f"A: {k}={v}" for k, v in (attrs or {}).items()]
    lines += [f"L: {k}={v}" for k, v in (links or {}).items()]
    return "\n".join(lines) + "\n\n"
