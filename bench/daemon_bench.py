"""The daemon: uevent -> published verdict latency, a 256-event burst, and an idle daemon.

All on the synthetic world, with the real pieces of tests/test_daemon.py: a umockdev testbed (its
uevents reach the daemon's pyudev monitor), a private system-like dbus-daemon, the daemon as a
subprocess, a D-Bus client timing the signals.

- latency: a device's driver link is removed and put back, with an unbind / bind uevent each
  time; each event makes one signal (DeviceNeedsDriver / DeviceResolved). Latency is the signal's
  arrival minus the event's sending minus the configured settle window (the daemon waits that
  long on purpose). Baseline, same run: the same uevents into a bare pyudev monitor process that
  writes a line per event (umockdev's delivery and a process wake-up: the floor).
- burst: 256 VF add events sent as fast as umockdev delivers them; decisions made (goal 1) and
  the time from the window's close (last event + settle) to the last of the 256 signals.
- idle: 60 s (10 with --quick) of a daemon with nothing to do: CPU ticks used (goal 0) and RSS
  (goal <= 30 MiB); then the same with WATCHDOG_USEC set, counting wake-ups (context switches)
  against the watchdog period.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

import _common  # noqa: E402
import synthetic  # noqa: E402
from daemon_world import BusClient, DaemonProcess, NotifySocket, SystemBus, Testbed, pci_record  # noqa: E402

SYSPCI = "/sys/devices/pci0000:00"
GPU = synthetic.ALIAS["gpu"]

BARE_LISTENER = r"""
import sys, pyudev
m = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
m.start()
print("ready", flush=True)
for device in iter(m.poll, None):
    print(device.action, flush=True)
"""


def _volatile(tmp: Path) -> Path:
    """The runtime directory on a tmpfs, as /run is on a real system (here /run may be on disk)."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="kmg-bench-run-", dir=shm)) if shm.is_dir() else tmp


def _world(tmp: Path) -> dict:
    world = synthetic.make_world(tmp / "world")
    volatile = _volatile(tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMODGUARD_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update({"KMODGUARD_MODULES_DIR": str(world.installed), "KMODGUARD_INDEX_DIR": str(tmp / "index"),
                "KMODGUARD_STATE_DIR": str(tmp / "state"), "KMODGUARD_RUNTIME_DIR": str(volatile / "run"),
                "KMODGUARD_CONFIG_DIR": str(tmp / "etc"), "KMODGUARD_MODPROBE_DIRS": str(world.modprobe_d),
                "KMODGUARD_FIRMWARE_DIRS": str(world.firmware), "KMODGUARD_MOTD_DIR": str(volatile / "motd.d"),
                "KMODGUARD_CONTAINER": "none", "PYTHONPATH": str(HERE.parent)})
    for name, payload in world.packages.items():
        subprocess.run([sys.executable, "-m", "kmodguard", "index", "build", "--kver", world.kver, "--package", name,
                        "--version", "1", "--request", f"{name}-uname-r = {world.kver}", "--from-dir", str(payload)],
                       env=env, check=True, capture_output=True)
    (tmp / "etc").mkdir()
    return env


def _policy(env: dict, settle: float) -> None:
    Path(env["KMODGUARD_CONFIG_DIR"], "kmodguard.toml").write_text(f"[timeouts]\nsettle = {settle}\n")


def _pctl(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def latency(tmp: Path, env: dict, n: int) -> dict:
    settle = 0.005
    _policy(env, settle)
    bus, testbed = SystemBus(), Testbed()
    notify = NotifySocket(tmp / "notify-lat.sock")
    device = f"{SYSPCI}/0000:00:05.0"
    link = Path(testbed.root) / device.lstrip("/") / "driver"
    try:
        testbed.add(pci_record("0000:00:05.0", GPU, driver="kmg_gpu"))
        d = DaemonProcess(env, testbed, tmp, notify=notify, bus=bus, args=["--kver", synthetic.KVER])
        notify.wait_for("READY", "1", timeout=60)
        client = BusClient(bus.address)
        lat = []
        for i in range(n):
            if i % 2 == 0:
                link.unlink()
                t = time.monotonic()
                testbed.uevent(device, "unbind")
                t_sig, _ = client.wait_signal("DeviceNeedsDriver", lambda b: True, timeout=10)
            else:
                os.symlink("../../../bus/pci/drivers/kmg_gpu", link)
                t = time.monotonic()
                testbed.uevent(device, "bind")
                t_sig, _ = client.wait_signal("DeviceResolved", lambda b: b[1] == "bound", timeout=10)
            client.seen.clear()
            lat.append(t_sig - t - settle)
        client.close()
        d.stop()
        # the floor: the same uevents into a bare pyudev listener
        bare = subprocess.Popen(["umockdev-wrapper", sys.executable, "-c", BARE_LISTENER],
                                env={**os.environ, "UMOCKDEV_DIR": testbed.root}, stdout=subprocess.PIPE, text=True)
        assert bare.stdout.readline().strip() == "ready"
        floor = []
        for i in range(n):
            t = time.monotonic()
            testbed.uevent(device, "change")
            bare.stdout.readline()
            floor.append(time.monotonic() - t)
        bare.kill()
        bare.wait()
    finally:
        testbed.close()
        bus.stop()
        notify.close()
    return {"events": n, "settle_s": settle, "median_s": statistics.median(lat), "p99_s": _pctl(lat, 0.99),
            "max_s": max(lat), "floor_median_s": statistics.median(floor), "floor_p99_s": _pctl(floor, 0.99)}


def burst(tmp: Path, env: dict, n: int = 256) -> dict:
    settle = 1.0
    _policy(env, settle)
    bus, testbed = SystemBus(), Testbed()
    notify = NotifySocket(tmp / "notify-burst.sock")
    pf = "0000:00:04.0"
    try:
        testbed.add(pci_record(pf, synthetic.ALIAS["installed"], driver="kmg_core_nic",
                               attrs={"sriov_numvfs": str(n), "sriov_drivers_autoprobe": "1"}))
        d = DaemonProcess(env, testbed, tmp, notify=notify, bus=bus, args=["--kver", synthetic.KVER])
        notify.wait_for("READY", "1", timeout=60)
        client = BusClient(bus.address)
        before = d.snapshot()["decisions"]
        vfs = [f"0000:01:{i // 8:02x}.{i % 8}" for i in range(n)]
        testbed.add("".join(pci_record(vf, GPU, parent=f"/devices/pci0000:00/{pf}", links={"physfn": f"../{pf}"})
                            for vf in vfs))
        t0 = time.monotonic()
        testbed.uevents([f"{SYSPCI}/{pf}/{vf}" for vf in vfs], "add")  # paced by umockdev's queue
        t_last_sent = time.monotonic()
        last = max(client.wait_signal("DeviceNeedsDriver", lambda b, vf=vf: b[0] == vf, timeout=60)[0] for vf in vfs)
        decisions = d.snapshot()["decisions"] - before
        client.close()
        d.stop()
    finally:
        testbed.close()
        bus.stop()
        notify.close()
    return {"events": n, "decisions": decisions, "sending_s": t_last_sent - t0, "settle_s": settle,
            "decided_after_window_s": last - (t_last_sent + settle)}


def idle(tmp: Path, env: dict, seconds: float, watchdog_usec: int | None) -> dict:
    _policy(env, 2.0)
    testbed = Testbed()
    notify = NotifySocket(tmp / f"notify-idle-{watchdog_usec}.sock")
    try:
        extra = {"WATCHDOG_USEC": str(watchdog_usec)} if watchdog_usec else {}
        d = DaemonProcess(env, testbed, tmp, notify=notify, args=["--kver", synthetic.KVER, "--no-bus"], extra_env=extra)
        notify.wait_for("READY", "1", timeout=60)
        time.sleep(1.0)
        pid = d.proc.pid
        ticks0, switches0 = _ticks(pid), _switches(pid)
        time.sleep(seconds)
        ticks, switches = _ticks(pid) - ticks0, _switches(pid) - switches0
        status = _status(pid)
        d.stop()
    finally:
        testbed.close()
        notify.close()
    return {"seconds": seconds, "cpu_ticks": ticks, "wakeups": switches,
            "rss_bytes": int(status["VmRSS"].split()[0]) * 1024, "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024,
            "watchdog_period_s": watchdog_usec / 2e6 if watchdog_usec else None}


def _status(pid: int) -> dict:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def _switches(pid: int) -> int:
    """Times the process went to sleep and was woken (preemptions are not wake-ups)."""
    return int(_status(pid)["voluntary_ctxt_switches"])


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="kmg-bench-daemon-") as tmp:
        tmp = Path(tmp)
        env = _world(tmp)
        volatile = Path(env["KMODGUARD_RUNTIME_DIR"]).parent
        _common.progress("daemon: uevent -> signal latency")
        lat = latency(tmp, env, 200 if quick else 1000)
        _common.progress("daemon: a burst of 256 events")
        b = burst(tmp, env)
        seconds = 10.0 if quick else 60.0
        _common.progress(f"daemon: idle for {seconds:.0f} s, without and with a watchdog")
        quiet = idle(tmp, env, seconds, None)
        dog = idle(tmp, env, seconds, 10_000_000)
        if volatile != tmp:
            shutil.rmtree(volatile, ignore_errors=True)
    row = _common.row
    rows = [
        row("daemon", "uevent -> signal, median (minus settle)", lat["median_s"], "s", "-", True,
            lat["floor_median_s"], "bare pyudev listener", lat["median_s"] / lat["floor_median_s"]),
        row("daemon", "uevent -> signal, p99 (minus settle)", lat["p99_s"], "s", "p99 < 20 ms", lat["p99_s"] < 0.020,
            lat["floor_p99_s"], "bare pyudev listener", lat["p99_s"] / lat["floor_p99_s"]),
        row("daemon", "256 events in a burst: decisions", b["decisions"], "", "1", b["decisions"] == 1),
        row("daemon", "256-event burst: window close -> 256th signal", b["decided_after_window_s"], "s",
            "(reported)", True),
        row("daemon", f"idle {seconds:.0f} s: CPU ticks", quiet["cpu_ticks"], "", "0", quiet["cpu_ticks"] == 0),
        row("daemon", "idle: RSS", quiet["rss_bytes"] / _common.MiB, "MiB", "<= 30 MiB",
            quiet["rss_bytes"] <= 30 * _common.MiB),
        row("daemon", f"idle {seconds:.0f} s, watchdog 10 s: wake-ups", dog["wakeups"], "",
            f"~{seconds / 5:.0f} (one per 5 s)", dog["wakeups"] <= seconds / 5 + 2),
    ]
    return {"rows": rows, "details": {"latency": lat, "burst": b, "idle": quiet, "idle_watchdog": dog}}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)["details"], indent=1))
