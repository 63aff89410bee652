"""The scenario, inside the guest: set up, start udevd, the system bus and `kmodguard daemon`, let
the daemon react to the devices, report.

Run by stage2.sh (PID 1) with the project venv's Python, as root, on the overlay of the guest's
layer and the host's root. It reads OUT/scenario.json (written by harness.py), talks to the host
through marked serial lines ("KMG-E2E TAG {json}") and writes OUT/result.json plus logs into OUT
(the read-write 9p share). Everything it reports about the outcome is read from the system itself:
sysfs for drivers, the rpm database and dnf's history for packages and transactions, lsinitrd for
the initramfs, a wrapper around dracut for who ran it. What kmodguard said (its snapshot, its log,
its fix records, its D-Bus signals) is kept as evidence and for the timings.

Flow:
  prepare()        policy, index, udev rules, the dracut wrapper, kmodguard's D-Bus policy; the
                   host's own dnf/kmodguard/log state is hidden under fresh tmpfs mounts
  start_udev()     systemd-udevd --daemon, trigger, settle (as at boot: installed drivers bind)
  SystemBus        the real `dbus-daemon --system` (the host's system.conf, kmodguard's policy in
                   /usr/share/dbus-1/system.d) and `busctl monitor` of kmodguard's signals
  Daemon           `kmodguard daemon --json`; its start-up scan (coldplug) judges every device and,
                   in mode auto, fixes the cold-plugged ones; READY once its first snapshot is there
  READY            the host hot-plugs its devices now
  wait_hotplug()   every hot-plug port has its device
  settle()         the daemon's snapshot has a verdict for every device, no fix runs, and every
                   device it took on (mode auto) is covered by a finished fix
  stop             `kmodguard status --json` and the MOTD while the daemon runs; SIGTERM; the bus
  collect()        the result
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/run/e2e/out")
SCENARIO = json.loads((OUT / "scenario.json").read_text())
KVER = SCENARIO["kver"]
KMODGUARD = [str(Path(sys.executable).parent / "kmodguard")]
PCI = Path("/sys/bus/pci/devices")
IMAGE = Path(SCENARIO["initramfs_image"])  # /boot/initrd.img-KVER: see artifacts.boot_image()
DRACUT_CALLS = Path("/run/e2e/dracut-calls.log")
DRACUT_REAL = Path("/run/e2e/dracut.real")
SCRIPTLET_LOG = Path(SCENARIO["scriptlet_log"])
DNF_HISTORY = Path("/var/lib/dnf/history.sqlite")
# kmodguard's own places, at their defaults (the guest is the machine: no KMODGUARD_* variable is set)
SNAPSHOT = Path("/run/kmodguard/state.json")
LAST_FIX = Path("/var/lib/kmodguard/last-fix.json")
MOTD = Path("/run/motd.d/kmodguard")
BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.kmodguard.Daemon1.conf")  # where the package puts it
NEEDS_ACTION = ("missing", "loadable")
T0 = time.monotonic()
COMMANDS = OUT / "commands.log"  # every command the agent ran, with its output
KMG_LOG = OUT / "kmodguard.log"  # kmodguard's stderr (-v) and JSON of every command the agent ran
DAEMON_LOG = OUT / "daemon.log"  # `kmodguard daemon --json`'s stderr: one JSON object a line
BUS_LOG = OUT / "bus-monitor.log"  # busctl monitor --json=short: one D-Bus message a line
SNAPSHOTS = OUT / "snapshots.log"  # every distinct snapshot the agent read, one a line


def now() -> float:
    return time.monotonic() - T0


def mark(tag: str, **info) -> None:
    """A line the host's serial reader acts on (READY, DONE) or records (the rest). "unix" is the
    guest's clock when the line was written: the host, which timestamps every line as it reads it,
    lines its own clock up with the guest's from these."""
    print(f"KMG-E2E {tag} {json.dumps({**info, 'unix': round(time.time(), 6)})}", flush=True)


def run(cmd: list[str], timeout: float = 600, log: Path = COMMANDS, check: bool = False) -> subprocess.CompletedProcess:
    t = now()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired as exc:
        with open(log, "a") as f:
            f.write(f"=== [{t:.2f}] {cmd} TIMED OUT after {timeout} s\n{exc.stdout}\n{exc.stderr}\n")
        raise
    with open(log, "a") as f:
        f.write(f"=== [{t:.2f} +{now() - t:.2f} s] exit {proc.returncode}: {' '.join(cmd)}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


def kmodguard(*args: str, timeout: float = 600) -> tuple[int, dict | None, float, float]:
    """Run kmodguard -v ARGS --json; (exit code, its JSON document, start, end)."""
    t = now()
    proc = run([*KMODGUARD, "-v", *args, "--json"], timeout=timeout, log=KMG_LOG)
    end = now()
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = None
    return proc.returncode, doc, t, end


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# --- set-up ----------------------------------------------------------------------------------

DRACUT_WRAPPER = f"""#!/bin/sh
# kmodguard e2e: record who runs dracut (the chain of parent processes), then run the real dracut
{{
  cut -d' ' -f1 /proc/uptime | tr -d '\\n'
  p=$PPID
  while [ "${{p:-0}}" -gt 1 ]; do
    printf '\\036'; tr '\\0' '\\037' < /proc/$p/cmdline
    p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status)
  done
  printf '\\035'; printf '%s\\037' "$@"; printf '\\n'
}} >> {DRACUT_CALLS} 2>/dev/null
exec {DRACUT_REAL} "$@"
"""


# The host's root is the live lower layer: the host's own package-manager, kmodguard and log state
# would show through (and change under the guest while the host works). Fresh tmpfs mounts hide it
# at once, so that dnf's history, kmodguard's state and the logs are the guest's own.
PRIVATE_DIRS = ("/var/lib/dnf", "/var/cache/dnf", "/var/lib/kmodguard", "/etc/kmodguard", "/var/lib/rpm-state",
                "/var/log")


def prepare() -> None:
    for d in PRIVATE_DIRS:
        Path(d).mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d], check=True)
    # the host may itself run in a container (docker's marker file); this guest is a virtual machine
    for f in ("/.dockerenv", "/etc/udev/rules.d/70-kmodguard-e2e.rules"):
        remove(Path(f))
    conf = Path("/etc/kmodguard")
    (conf / "kmodguard.toml").write_text(SCENARIO["kmodguard_toml"])
    shutil.copytree(OUT / "index", "/var/lib/kmodguard/index", symlinks=True)
    if SCENARIO["udev_rules"]:
        Path("/etc/udev/rules.d").mkdir(parents=True, exist_ok=True)
        Path("/etc/udev/rules.d/70-kmodguard-e2e.rules").write_text(SCENARIO["udev_rules"])
    # who runs dracut: the package's %posttrans, or kmodguard
    dracut = Path(shutil.which("dracut") or "/usr/bin/dracut")
    shutil.copy2(dracut, DRACUT_REAL)
    dracut.write_text(DRACUT_WRAPPER)
    dracut.chmod(0o755)
    # kmodguard's D-Bus policy where its package installs it (units/README.md), from this checkout
    BUS_POLICY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SCENARIO["dbus_policy"], BUS_POLICY)


def start_udev() -> None:
    run(["/lib/systemd/systemd-udevd", "--daemon"], check=True)
    run(["udevadm", "trigger", "--type=subsystems", "--action=add"])
    run(["udevadm", "trigger", "--type=devices", "--action=add"])
    run(["udevadm", "settle", "--timeout=120"])


# --- devices ---------------------------------------------------------------------------------

class Watch:
    """Kernel uevents for PCI devices (add, bind), timestamped (guest unix time) as they arrive."""

    def __init__(self):
        import pyudev

        self.events: dict[tuple[str, str], float] = {}
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self.monitor.filter_by("pci")
        self.monitor.start()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            dev = self.monitor.poll()
            if dev is not None:
                self.events.setdefault((dev.action, dev.sys_name), time.time())

    def first(self, action: str, address: str) -> float | None:
        return self.events.get((action, address))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def device_under(port: str) -> str | None:
    """The PCI address of the device behind a root port (0000:00:10.0 -> 0000:01:00.0)."""
    for entry in sorted(PCI.iterdir()) if PCI.is_dir() else ():
        if os.path.basename(os.path.dirname(os.path.realpath(entry))) == port:
            return entry.name
    return None


def driver_of(address: str) -> str | None:
    link = PCI / address / "driver"
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def module_of(address: str) -> str | None:
    link = PCI / address / "driver" / "module"
    return os.path.basename(os.path.realpath(link)) if os.path.exists(link) else None


def wait_hotplug(devices: list[dict], timeout: float = 120) -> None:
    """Until every hot-plug port has its device (sysfs); udev and kmodguard take it from there."""
    deadline = time.monotonic() + timeout
    while True:
        for d in devices:
            if not d.get("address"):
                d["address"] = device_under(d["port"])
        if all(d.get("address") for d in devices) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = [d["qemu"] for d in devices if not d.get("address")]
    mark("HOTPLUG-SEEN", addresses=[d.get("address") for d in devices], missing=missing)


# --- the system's own records ------------------------------------------------------------------

def rpm_packages() -> dict[str, str]:
    """name -> install transaction id, from the rpm database."""
    out = run(["rpm", "-qa", "--qf", "%{NAME}\t%{INSTALLTID}\n"], check=True).stdout
    return dict(line.split("\t") for line in out.splitlines() if "\t" in line)


def dnf_transactions() -> list[dict]:
    if not DNF_HISTORY.exists():
        return []
    db = sqlite3.connect(f"file:{DNF_HISTORY}?mode=ro", uri=True)
    try:  # the columns vary between libdnf versions (comment came later): take them all
        cur = db.execute("SELECT * FROM trans ORDER BY id")
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        db.close()
    return rows


def image_state() -> dict | None:
    try:
        st = IMAGE.stat()
    except OSError:
        return None
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def dracut_calls() -> list[dict]:
    """Each dracut run: who ran it (the nearest package manager or kmodguard among its parents:
    the daemon's fix runs as `python -m kmodguard fix`, the daemon as `.venv/bin/kmodguard daemon`)."""
    calls = []
    text = DRACUT_CALLS.read_text(errors="replace") if DRACUT_CALLS.exists() else ""
    for line in text.split("\n"):  # not splitlines(): it also splits on the separators used here
        if not line:
            continue
        head, _, args = line.partition("\035")
        parts = head.split("\036")
        chain = [[a for a in p.split("\037") if a] for p in parts[1:]]
        by = None
        for argv in chain:
            names = [os.path.basename(a) for a in argv[:3]]
            if any(n in ("dnf", "dnf-3", "dnf5", "rpm", "yum") for n in names[:2]) or any("rpm-tmp" in a for a in argv):
                by = "package"
                break
            if "kmodguard" in names[:2] or names[1:3] == ["-m", "kmodguard"]:
                by = "kmodguard"
                break
        calls.append({"uptime": float(parts[0] or 0), "by": by, "args": [a for a in args.split("\037") if a],
                      "parents": [" ".join(argv)[:200] for argv in chain]})
    return calls


def lsinitrd_modules(image: Path = IMAGE) -> list[str]:
    proc = run(["lsinitrd", str(image)], timeout=600)
    found = set()
    for line in proc.stdout.splitlines():
        base = os.path.basename(line.split(" -> ")[0].rstrip())
        for sfx in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if base.endswith(sfx):
                found.add(base[: -len(sfx)].replace("-", "_"))
    return sorted(found)


# --- the system bus --------------------------------------------------------------------------------

class SystemBus:
    """The real system bus, as a distribution starts it: `dbus-daemon --system` with the host's
    /usr/share/dbus-1/system.conf (it forks, drops to the messagebus user, listens on
    /run/dbus/system_bus_socket, reads system.d where prepare() put kmodguard's policy), and a
    monitor of everything kmodguard's object emits and of who owns its name (`busctl monitor`,
    one JSON message a line, into BUS_LOG)."""

    MATCHES = ("type='signal',path='/org/kmodguard/Daemon1'",
               "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='org.kmodguard.Daemon1'")

    def __init__(self, timeout: float = 60):
        Path("/run/dbus").mkdir(parents=True, exist_ok=True)
        out = run(["dbus-daemon", "--system", "--print-pid=1"], timeout=timeout, check=True).stdout
        self.pid = int(out.split()[0])
        self.err_path = OUT / "bus-monitor.err"
        with open(BUS_LOG, "wb") as out_f, open(self.err_path, "wb") as err_f:
            self.monitor = subprocess.Popen(
                ["busctl", "--system", "monitor", "--json=short", *(f"--match={m}" for m in self.MATCHES)],
                stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, env={**os.environ, "LC_ALL": "C"})
        deadline = time.monotonic() + timeout
        while "Monitoring bus message stream" not in (_read(self.err_path) or ""):  # BecomeMonitor succeeded
            if self.monitor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"busctl monitor did not start (exit {self.monitor.poll()}): {_read(self.err_path)}")
            time.sleep(0.05)

    def wait_released(self, timeout: float = 10) -> bool:
        """Until the monitor has seen org.kmodguard.Daemon1 lose its owner (a stopped daemon's last word)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(s["member"] == "NameOwnerChanged" and s["args"][2:] == [""] for s in self.signals()):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.monitor.poll() is None:
            self.monitor.terminate()
            try:
                self.monitor.wait(10)
            except subprocess.TimeoutExpired:
                self.monitor.kill()
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    @staticmethod
    def signals() -> list[dict]:
        """Every signal the monitor saw: t (the monitor's receive time, guest unix), sender, member, args."""
        out = []
        for line in (BUS_LOG.read_text(errors="replace") if BUS_LOG.exists() else "").splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") != "signal":
                continue
            args = (msg.get("payload") or {}).get("data") or []
            sig = {"t": (msg.get("timestamp-realtime") or 0) / 1e6, "sender": msg.get("sender"),
                   "interface": msg.get("interface"), "member": msg.get("member"), "args": args}
            if sig["member"] == "RemediationFinished" and len(args) == 3:
                try:
                    sig["record"] = json.loads(args[2])
                except ValueError:
                    sig["record"] = None
            out.append(sig)
        return out


# --- kmodguard daemon --------------------------------------------------------------------------------

class Daemon:
    """`kmodguard daemon --json`, as kmodguard.service runs it (without systemd: fixes run as its
    child processes). Its stderr goes to DAEMON_LOG. poll() reads its snapshot (state.json) when it
    changed and keeps every event any snapshot showed (a snapshot holds the last 64), the first
    entry each held device had (its candidates), and every fix record."""

    def __init__(self):
        self.started = time.time()
        with open(DAEMON_LOG, "wb") as err, open(OUT / "daemon.stdout", "wb") as out:
            self.proc = subprocess.Popen([*KMODGUARD, "daemon", "--json"], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env={**os.environ, "LC_ALL": "C"})
        self.snapshot: dict | None = None
        self.first_snapshot: dict | None = None
        self.events: list[dict] = []
        self._seen: set[str] = set()
        self._stamp = None
        self.held: dict[str, dict] = {}  # device id -> the first entry the snapshot held it with
        self.fix_records: dict[str, dict] = {}  # request id -> last-fix record
        self.exit_code: int | str | None = None
        self.after_stop: dict = {}

    def poll(self) -> dict | None:
        try:
            st = SNAPSHOT.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return self.snapshot
        if stamp == self._stamp:
            return self.snapshot
        snap = read_json(SNAPSHOT)
        if snap is None:  # replaced under us (write_atomic renames, so this is rare): next time
            return self.snapshot
        self._stamp = stamp
        with open(SNAPSHOTS, "a") as f:
            f.write(json.dumps({"read_at": round(time.time(), 3), **snap}, separators=(",", ":")) + "\n")
        self.snapshot = snap
        if self.first_snapshot is None:
            self.first_snapshot = snap
        for event in snap.get("events", []):
            key = json.dumps(event, sort_keys=True)
            if key not in self._seen:
                self._seen.add(key)
                self.events.append(event)
        for held in snap.get("devices", []):
            self.held.setdefault(held["id"], held)
        if snap.get("last_fix") and snap["last_fix"].get("id"):
            self.fix_records[snap["last_fix"]["id"]] = snap["last_fix"]
        return snap

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_first_snapshot(self, timeout: float = 300) -> dict:
        """Its start-up scan (coldplug) is its first decision: wait for the snapshot that shows it."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.poll()
            if snap and snap.get("decisions", 0) >= 1:
                return snap
            if not self.alive():
                raise RuntimeError(f"kmodguard daemon exited with status {self.proc.returncode} before its first "
                                   "snapshot (daemon.log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kmodguard daemon wrote no snapshot within {timeout:.0f} s (daemon.log)")
            time.sleep(0.1)

    # --- what the events say -----------------------------------------------------------------------

    def verdicts(self, device_id: str) -> list[dict]:
        return [e for e in self.events if e.get("kind") == "verdict" and e.get("device") == device_id]

    def first_verdict(self, device_id: str) -> dict | None:
        found = self.verdicts(device_id)
        return found[0] if found else None

    def fixes(self) -> list[dict]:
        """Each fix the daemon ran: its fix-started and fix-finished events and its record."""
        finished = {e["request"]: e for e in self.events if e.get("kind") == "fix-finished"}
        out = []
        for e in self.events:
            if e.get("kind") == "fix-started":
                rid = e["request"]
                out.append({"request": rid, "devices": e.get("devices", []), "requested_by": e.get("requested_by"),
                            "started_t": e["t"], "finished_t": (finished.get(rid) or {}).get("t"),
                            "exit_code": (finished.get(rid) or {}).get("exit_code"),
                            "outcomes": (finished.get(rid) or {}).get("outcomes"),
                            "record": self.fix_records.get(rid)})
        return out

    def fix_for(self, device_id: str) -> dict | None:
        """The first fix that took this device on (and finished)."""
        for f in self.fixes():
            if device_id in f["devices"] and f["finished_t"] is not None:
                return f
        return None

    def since(self) -> float | None:
        try:
            return datetime.datetime.fromisoformat((self.first_snapshot or {})["since"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return None

    def waiting_for(self, devices: list[dict]) -> list[str]:
        """Why the daemon is not done with these devices yet ([] when it is): each needs a verdict
        (a device that was bound at boot gets none from the start-up scan), no fix may run, and in
        mode auto each device it holds for an install or a load needs a finished fix covering it."""
        snap = self.snapshot
        if snap is None:
            return ["no snapshot yet"]
        why = []
        for d in devices:
            addr = d.get("address")
            if not addr:
                continue  # never appeared (reported as such)
            first = self.first_verdict(addr)
            if first is None:
                if not (d["how"] == "coldplug" and driver_of(addr)):
                    why.append(f"{addr}: no verdict yet")
                continue
            if SCENARIO["mode"] == "auto" and first["verdict"] in NEEDS_ACTION:
                action = (self.held.get(addr) or {}).get("action")
                if action in ("install", "load", None) and self.fix_for(addr) is None:
                    why.append(f"{addr}: {first['verdict']} (action {action}), no finished fix covers it yet")
        if snap.get("fix_running"):
            why.append("a fix is running")
        return why

    def settle(self, devices: list[dict], timeout: float) -> float:
        """Wait until the daemon is done with the devices (waiting_for); returns when (guest unix)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            why = self.waiting_for(devices)
            if not why:
                return time.time()
            if not self.alive():
                raise RuntimeError(f"kmodguard daemon exited with status {self.proc.returncode} while "
                                   f"{'; '.join(why)} (daemon.log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kmodguard daemon not done after {timeout:.0f} s: {'; '.join(why)} "
                                   "(daemon.log, snapshots.log)")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM, as systemctl stop sends it: it must exit 0 and take its snapshot and MOTD along."""
        if not self.alive():
            self.exit_code = self.proc.returncode
            return
        self.poll()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self.exit_code = f"killed: no exit {timeout:.0f} s after SIGTERM"
        self.after_stop = {"snapshot_removed": not SNAPSHOT.exists(), "motd_removed": not MOTD.exists()}

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> dict:
        """daemon.log: its structured events (kmodguard_event), warnings, errors, lines that are not JSON."""
        events, warnings, errors, other = [], [], [], []
        for line in (DAEMON_LOG.read_text(errors="replace") if DAEMON_LOG.exists() else "").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                other.append(line)
                continue
            if doc.get("level") in ("error", "critical"):
                errors.append(doc)
            elif doc.get("level") == "warning":
                warnings.append(doc)
            if doc.get("kmodguard_event"):
                events.append({k: doc.get(k) for k in ("t", "level", "kmodguard_event", "device", "modalias",
                                                       "package", "module", "kmodguard_verdict", "kmodguard_request",
                                                       "kmodguard_exit_code", "message")})
        return {"events": events, "warnings": warnings, "errors": errors, "not_json": other[:50]}

    def summary(self) -> dict:
        last_fix = read_json(LAST_FIX)
        if last_fix and last_fix.get("id"):
            self.fix_records.setdefault(last_fix["id"], last_fix)
        snap = self.snapshot or {}
        return {
            "pid": self.proc.pid,
            "exit_code": self.exit_code,
            **self.after_stop,
            "since": self.since(),
            "first_snapshot_decisions": (self.first_snapshot or {}).get("decisions"),
            "snapshot": snap,  # the last one read while it ran
            "bus": snap.get("bus"),
            "settle": snap.get("settle"),
            "decisions": snap.get("decisions"),
            "events": self.events,
            "held": self.held,
            "fixes": self.fixes(),
            "last_fix": last_fix,
            "log": self.log(),
        }


# --- the result ---------------------------------------------------------------------------------

def install_end(record: dict | None) -> float | None:
    """When the package transaction of a fix ended (guest unix): the fix's start plus its steps up to
    and including install (kmodguard times each step), if install did something."""
    report = (record or {}).get("report") or {}
    steps = report.get("steps") or []
    names = [s.get("step") for s in steps]
    if "install" not in names or steps[names.index("install")].get("result") != "done" or not record.get("started"):
        return None
    return record["started"] + sum(s.get("seconds") or 0 for s in steps[: names.index("install") + 1])


def collect(devices: list[dict], runs: list[dict], before: dict, watch: Watch, daemon: Daemon,
            signals: list[dict]) -> dict:
    after = rpm_packages()
    new = sorted(n for n, tid in after.items() if before["rpm"].get(n) != tid)
    tids = sorted({after[n] for n in new})
    calls = dracut_calls()
    rebuilds = [c["by"] for c in calls]
    image_now = image_state()
    changed = image_now != before["image"]
    inside = lsinitrd_modules() if changed else SCENARIO["initial_initramfs_modules"]
    summary = daemon.summary()
    since = summary["since"]
    out_devices = []
    for d in devices:
        addr = d.get("address")
        driver = driver_of(addr) if addr else None
        module = module_of(addr) if addr else None
        first = daemon.first_verdict(addr) if addr else None
        fix = daemon.fix_for(addr) if addr else None
        record = (fix or {}).get("record")
        # what the fix planned for this device (its plan's devices), and what of it the rpm database has now
        planned = [a for a in ((record or {}).get("report") or {}).get("devices", []) if a.get("id") == addr]
        installed = [a["package"] for a in planned if a.get("action") == "install" and a.get("package") in new]
        acted = any(a.get("action") in ("install", "load") for a in planned)
        # the event: when udev's event reached the daemon (uevent_t); for a device present at boot, the
        # daemon's start (its start-up scan is that device's event)
        event = (first or {}).get("uevent_t") or (since if d["how"] == "coldplug" else None)
        kernel_add = watch.first("add", addr or "")
        bound_at = watch.first("bind", addr or "") if driver else None
        if driver and bound_at is None and fix and (fix.get("outcomes") or {}).get(addr) == "now-bound":
            bound_at = fix["finished_t"]  # the fix saw it bound (its re-probe) before it reported
        if driver and bound_at is None and d["how"] == "coldplug":
            bound_at = event  # bound at boot, before the daemon started
        t_installed = install_end(record) if installed else None

        def rel(t, event=event):
            return round(t - event, 3) if t is not None and event is not None else None

        out_devices.append({
            "device": d["qemu"], "qemu_id": d["id"], "how": d["how"], "address": addr, "port": d["port"],
            "vendor": _read(PCI / addr / "vendor") if addr else None,
            "device_id": _read(PCI / addr / "device") if addr else None,
            "modalias": _read(PCI / addr / "modalias") if addr else None,
            "driver_override": override if (override := _read(PCI / addr / "driver_override") if addr else None)
            not in ("(null)", "") else None,  # the kernel says "(null)" when none is set
            "verdict": (first or {}).get("verdict"),  # kmodguard's FIRST verdict: its first verdict event
            "verdict_event": first,
            "verdicts": [{k: e.get(k) for k in ("t", "verdict", "decision")} for e in daemon.verdicts(addr or "")],
            "status": daemon.held.get(addr or ""),  # the daemon's entry while it held the device (candidates)
            "fix": {k: (fix or {}).get(k) for k in ("request", "requested_by", "devices", "exit_code")} if fix else None,
            "installed": installed,
            "driver": driver,
            "module": module,
            # the image is the machine's: name its (last) rebuilder for the devices that were acted on
            "initramfs_rebuilt_by": rebuilds[-1] if rebuilds and acted else None,
            "initramfs_has_module": bool(module and module in inside),
            # guest unix times: the host lines them up with its own clock (harness._document)
            "clock": {"kernel_add": kernel_add, "uevent": event, "verdict": (first or {}).get("t"),
                      "installed": t_installed, "fix_finished": (fix or {}).get("finished_t"), "bound": bound_at},
            "timings": {"event_to_verdict_s": rel((first or {}).get("t")),
                        "event_to_installed_s": rel(t_installed),
                        "event_to_fix_finished_s": rel((fix or {}).get("finished_t")),
                        "event_to_bound_s": rel(bound_at),
                        "kernel_add_to_event_s": (round(event - kernel_add, 3)
                                                  if kernel_add is not None and event is not None
                                                  and d["how"] == "hotplug" else None)},
        })
    dnf = dnf_transactions()
    installed_info = {}
    for name in new:
        q = run(["rpm", "-q", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}\t%{SIGPGP:pgpsig}\t%{RSAHEADER:pgpsig}\n",
                 name]).stdout.strip()
        provides = run(["rpm", "-q", "--provides", name]).stdout.split("\n")
        files = run(["rpm", "-ql", name]).stdout.splitlines()
        installed_info[name] = {"nevra_sig": q, "uname_r": [p for p in provides if "-uname-r" in p],
                                "modules": sum(1 for f in files if ".ko" in os.path.basename(f))}
    dropin = Path("/etc/dracut.conf.d/90-kmodguard.conf")
    return {
        "devices": out_devices,
        "transactions": len(dnf),
        "dnf_history": dnf,
        "rpm_transactions": len(tids),
        "packages_installed": new,
        "packages": installed_info,
        "rpm_qa": sorted(after),
        "initramfs": {"rebuilds": rebuilds, "calls": calls, "changed": changed, "modules": inside,
                      "drop_in": dropin.read_text() if dropin.exists() else None,
                      "scriptlet_log": SCRIPTLET_LOG.read_text() if SCRIPTLET_LOG.exists() else ""},
        "daemon": summary,
        "bus": {"signals": signals},
        "kmodguard": [{k: r.get(k) for k in ("when", "command", "exit", "start", "end", "doc", "text")} for r in runs],
        "agent_s": round(now(), 3),
    }


def save_logs() -> None:
    run(["dmesg"], log=OUT / "dmesg.txt")
    for p in ("/var/log/dnf.log", "/var/log/dnf.rpm.log", "/var/log/dnf.librepo.log", str(SCRIPTLET_LOG),
              str(DRACUT_CALLS), str(LAST_FIX)):
        if os.path.exists(p):
            shutil.copyfile(p, OUT / os.path.basename(p))


def main() -> int:
    devices = [dict(d) for d in SCENARIO["devices"]]
    cold = [d for d in devices if d["how"] == "coldplug"]
    hot = [d for d in devices if d["how"] == "hotplug"]
    runs: list[dict] = []
    bus: SystemBus | None = None
    daemon: Daemon | None = None
    # the agent's own deadline, inside the host's: so that a daemon that never settles is reported
    # from here, with the logs saved, rather than killed with the guest
    deadline = time.monotonic() + max(30.0, SCENARIO["timeout"] - 60.0)
    try:
        prepare()
        start_udev()
        watch = Watch()
        before = {"rpm": rpm_packages(), "image": image_state()}
        for d in cold:
            d["address"] = device_under(d["port"])
        bus = SystemBus()
        daemon = Daemon()  # its start-up scan judges the cold-plugged devices (and fixes them in mode auto)
        first = daemon.wait_first_snapshot()
        mark("READY", decisions=first.get("decisions"), daemon_pid=daemon.proc.pid)
        if hot:
            wait_hotplug(hot)
        done_at = daemon.settle(devices, deadline - time.monotonic())
        mark("SETTLED", waited_s=round(done_at - daemon.started, 3))
        # what a person checks while it runs: `kmodguard status` (with the daemon's snapshot attached) and the MOTD
        code, doc, start, end = kmodguard("status")
        runs.append({"when": "settled", "command": "status", "exit": code, "start": start, "end": end, "doc": doc})
        motd = _read(MOTD) if MOTD.exists() else None
        runs.append({"when": "settled", "command": "motd", "exit": None, "start": end, "end": end, "doc": None,
                     "text": motd})
        daemon.stop()
        bus.wait_released()  # the bus's NameOwnerChanged for the name the daemon gave up reaches the monitor
        bus.stop()
        result = collect(devices, runs, before, watch, daemon, SystemBus.signals())
        (OUT / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        mark("DONE", t=round(now(), 3))
        return 0
    except BaseException:  # noqa: BLE001 - whatever it is, the host must hear of it
        (OUT / "agent-error.txt").write_text(traceback.format_exc())
        mark("ERROR", error=traceback.format_exc().strip().splitlines()[-1])
        return 1
    finally:
        for stop in ((daemon.kill if daemon else None), (bus.stop if bus else None), save_logs):
            try:
                if stop:
                    stop()
            except Exception:  # noqa: BLE001 - the logs are a courtesy; the result (or the error) is already written
                traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
