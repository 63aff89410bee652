"""The real PackageKit, isolated: Debian's packagekitd (its apt backend) and the real polkitd on a
private bus with the system bus's policy, packagekitd's apt pointed at a test root.

    bus = SystemBus()                      # dbus-daemon, <type>system</type>, the real policy files
    polkitd = start_polkitd(bus)           # /usr/lib/polkit-1/polkitd, its own rules and actions
    pk = PackageKitd(bus, root).start()    # packagekitd --backend apt, APT_CONFIG naming the root
    ...                                    # kmodguard with DBUS_SYSTEM_BUS_ADDRESS=bus.address
    pk.stop()

packagekitd reads apt's configuration the way apt-get does: APT_CONFIG (kept with
--keep-environment) sets Dir to the root, so the root's sources, lists, apt.conf.d and dpkg
database are used and dpkg runs with --root. Its own state (/var/lib/PackageKit, /var/cache/PackageKit)
is a tmpfs in a mount namespace of its own: this machine's PackageKit, apt and dpkg are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGEKITD = "/usr/libexec/packagekitd"
POLKITD = "/usr/lib/polkit-1/polkitd"
# the policy files the distribution's system bus reads for these two services
POLICIES = ("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf",
            "/etc/dbus-1/system.d/org.freedesktop.PackageKit.conf")
STATE_DIRS = ("/var/lib/PackageKit", "/var/cache/PackageKit")

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- Debian's system.conf: nobody owns a name or calls a method unless a policy file allows it -->
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
{includes}
</busconfig>
"""


def preflight() -> None:
    missing = [p for p in (PACKAGEKITD, POLKITD, *POLICIES) if not os.path.exists(p)]
    if missing:
        raise AssertionError(f"the real PackageKit needs {', '.join(missing)}: tools/setup --test installs "
                             "packagekit and polkitd (tools/packages)")


class SystemBus:
    """dbus-daemon with the system bus's configuration and the services' real policy files."""

    def __init__(self):
        preflight()
        self.dir = Path(tempfile.mkdtemp(prefix="kmg-pkbus-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        socket = self.dir / "system_bus_socket"
        config = self.dir / "system.conf"
        config.write_text(BUS_CONFIG.format(socket=socket, includes="\n".join(
            f"  <include>{p}</include>" for p in POLICIES)))
        out = subprocess.run(["dbus-daemon", "--config-file", str(config), "--fork", "--nopidfile",
                              "--print-address=1", "--print-pid=1"], capture_output=True, text=True, timeout=30,
                             check=True)
        self.address, pid = out.stdout.split()
        self.pid = int(pid)
        self.env = {"DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def owner(self, name: str) -> bool:
        res = subprocess.run(["busctl", f"--address={self.address}", "status", name], capture_output=True,
                             text=True, timeout=10)
        return res.returncode == 0

    def wait_for(self, name: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.owner(name):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not come up on the test bus:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        with _gone():
            os.kill(self.pid, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_polkitd(bus: SystemBus) -> subprocess.Popen:
    """The real polkitd (it drops to its own user): the installed actions and rules decide."""
    log = bus.dir / "polkitd.log"
    proc = subprocess.Popen([POLKITD, "--no-debug"], env={**os.environ, **bus.env}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    bus.wait_for("org.freedesktop.PolicyKit1", proc, log)
    return proc


class PackageKitd:
    """packagekitd --backend apt for one root; a fresh daemon per root (apt reads its
    configuration once, when the backend loads)."""

    def __init__(self, bus: SystemBus, root: Path):
        self.bus, self.root = bus, root
        self.proc: subprocess.Popen | None = None
        self.log = root.parent / f"{root.name}-packagekitd.log"
        self.apt_config = root.parent / f".{root.name}-packagekitd-apt.conf"

    def start(self) -> "PackageKitd":
        self.apt_config.write_text(f'Dir "{self.root}/";\nDPkg::Options:: "--root={self.root}/";\n')
        mounts = " && ".join(f"mount -t tmpfs kmg-packagekit {d}" for d in STATE_DIRS)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C",
               "APT_CONFIG": str(self.apt_config), "DEBIAN_FRONTEND": "noninteractive", **self.bus.env}
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mkdir -p {" ".join(STATE_DIRS)} && {mounts} && exec "$0" "$@"',
             PACKAGEKITD, "--keep-environment", "--disable-timer", "--backend", "apt", "--verbose"],
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.bus.wait_for("org.freedesktop.PackageKit", self.proc, self.log)
        return self

    def transactions(self) -> list[str]:
        """The transactions packagekitd runs now (GetTransactionList)."""
        res = subprocess.run(["busctl", f"--address={self.bus.address}", "--json=short", "call",
                              "org.freedesktop.PackageKit", "/org/freedesktop/PackageKit", "org.freedesktop.PackageKit",
                              "GetTransactionList"], capture_output=True, text=True, timeout=30, check=True)
        return json.loads(res.stdout)["data"][0]

    def stop(self) -> None:
        if self.proc is None:
            return
        with _gone():
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with _gone():
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class _gone:
    """Ignore a process that has already ended."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is ProcessLookupError
