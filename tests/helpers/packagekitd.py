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
import signal
import subprocess
from pathlib import Path

import daemon_world

PACKAGEKITD = "/usr/libexec/packagekitd"
POLKITD = "/usr/lib/polkit-1/polkitd"
# the policy files the distribution's system bus reads for these two services
POLICIES = ("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf",
            "/etc/dbus-1/system.d/org.freedesktop.PackageKit.conf")
STATE_DIRS = ("/var/lib/PackageKit", "/var/cache/PackageKit")


def preflight() -> None:
    missing = [p for p in (PACKAGEKITD, POLKITD, *POLICIES) if not os.path.exists(p)]
    if missing:
        raise AssertionError(f"the real PackageKit needs {', '.join(missing)}: tools/setup --test installs "
                             "packagekit and polkitd (tools/packages)")


class SystemBus(daemon_world.SystemBus):
    """The test system bus (daemon_world.py: the default policy of Debian's system.conf) with the
    two services' real policy files in place of kmodguard's."""

    def __init__(self):
        preflight()
        super().__init__("\n".join(f"  <include>{p}</include>" for p in POLICIES))


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
