"""The scenario, inside the guest: set up, start udevd, let kmodguard judge and fix, report.

Run by stage2.sh (PID 1) with the project venv's Python, as root, on the overlay of the guest's
layer and the host's root. It reads OUT/scenario.json (written by harness.py), talks to the host
through marked serial lines ("KMG-E2E TAG {json}") and writes OUT/result.json plus logs into OUT
(the read-write 9p share). Everything it reports is read from the system itself: sysfs for
drivers, the rpm database and dnf's history for packages and transactions, lsinitrd for the
initramfs, a wrapper around dracut for who ran it. kmodguard's own JSON is kept as evidence
("kmodguard" in the result) but not used as the measure.

Flow:
  prepare()       policy, index, udev rules, the dracut wrapper; the host's own dnf/kmodguard/log
                  state is hidden under fresh tmpfs mounts so the guest starts clean
  start_udev()    systemd-udevd --daemon, trigger, settle (as at boot: installed drivers bind)
  startup_run()   kmodguard judges every device present at boot (and fixes in auto mode): this is
                  what handles cold-plugged devices
  READY           the host hot-plugs its devices now
  wait_hotplug()  every hot-plug port has its device and udev has settled
  react()         <<< PHASE 2: the only place that changes when `kmodguard daemon` exists >>>
  collect()       the result
"""

from __future__ import annotations

import json
import os
import shutil
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
AUTO_BUSES = ("pci", "virtio", "vmbus")  # kmodguard's default auto_buses (the scenarios keep it)
T0 = time.monotonic()
COMMANDS = OUT / "commands.log"  # every command the agent ran, with its output
KMG_LOG = OUT / "kmodguard.log"  # kmodguard's stderr (-v) and JSON of every invocation


def now() -> float:
    return time.monotonic() - T0


def mark(tag: str, **info) -> None:
    """A line the host's serial reader acts on (READY, DONE) or records (the rest)."""
    print(f"KMG-E2E {tag} {json.dumps(info)}", flush=True)


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


def kmodguard(*args: str, timeout: float = 1500, as_json: bool = True) -> tuple[int, dict | str | None, float, float]:
    """Run kmodguard -v ARGS [--json]; (exit code, its JSON document (or text), start, end)."""
    t = now()
    proc = run([*KMODGUARD, "-v", *args, *(["--json"] if as_json else [])], timeout=timeout, log=KMG_LOG)
    end = now()
    if not as_json:
        return proc.returncode, proc.stdout, t, end
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


def start_udev() -> None:
    run(["/lib/systemd/systemd-udevd", "--daemon"], check=True)
    run(["udevadm", "trigger", "--type=subsystems", "--action=add"])
    run(["udevadm", "trigger", "--type=devices", "--action=add"])
    run(["udevadm", "settle", "--timeout=120"])


# --- devices ---------------------------------------------------------------------------------

class Watch:
    """Kernel uevents for PCI devices (add, bind), timestamped as they arrive (pyudev, netlink)."""

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
                self.events.setdefault((dev.action, dev.sys_name), now())

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
    deadline = time.monotonic() + timeout
    while True:
        for d in devices:
            if not d.get("address"):
                d["address"] = device_under(d["port"])
        if all(d.get("address") for d in devices) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = [d["qemu"] for d in devices if not d.get("address")]
    if missing:
        mark("HOTPLUG-MISSING", devices=missing)
    run(["udevadm", "settle", "--timeout=120"])


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
    """Each dracut run: who ran it (the nearest package manager or kmodguard among its parents)."""
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
            names = [os.path.basename(a) for a in argv[:2]]
            if any(n in ("dnf", "dnf-3", "dnf5", "rpm", "yum") for n in names) or any("rpm-tmp" in a for a in argv):
                by = "package"
                break
            if "kmodguard" in names:
                by = "kmodguard"
                break
        calls.append({"uptime": float(parts[0] or 0), "by": by, "args": [a for a in args.split("\037") if a],
                      "parents": [" ".join(argv)[:200] for argv in chain]})
    return calls


def lsinitrd_modules() -> list[str]:
    proc = run(["lsinitrd", str(IMAGE)], timeout=600)
    found = set()
    for line in proc.stdout.splitlines():
        base = os.path.basename(line.split(" -> ")[0].rstrip())
        for sfx in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if base.endswith(sfx):
                found.add(base[: -len(sfx)].replace("-", "_"))
    return sorted(found)


# --- kmodguard --------------------------------------------------------------------------------

def judge(devices: list[dict], when: str) -> dict:
    """`kmodguard status --json`: record each device's verdict (the first one it gets)."""
    code, doc, start, end = kmodguard("status")
    by_id = {d["id"]: d for d in (doc or {}).get("devices", [])}
    for d in devices:
        seen = by_id.get(d.get("address") or "")
        if seen and "verdict" not in d:
            d["verdict"] = seen["verdict"]
            d["status"] = seen
            d["verdict_at"] = end
    return {"when": when, "command": "status", "exit": code, "start": start, "end": end, "doc": doc}


def fix(addresses: list[str], when: str) -> dict:
    """`kmodguard fix --yes --json [DEVICE...]`: install, depmod, load, re-probe, initramfs."""
    code, doc, start, end = kmodguard("fix", "--yes", *addresses)
    return {"when": when, "command": "fix", "exit": code, "start": start, "end": end, "doc": doc}


def needs_fix(devices: list[dict]) -> list[str]:
    return [d["address"] for d in devices if d.get("verdict") in ("missing", "loadable")]


def startup_run(devices: list[dict], runs: list[dict]) -> None:
    """What the daemon will do at start: judge every device, fix in auto mode. Cold-plugged devices
    are present now; their "event" is this moment."""
    t = now()
    for d in devices:
        d["address"] = device_under(d["port"])
        d["event"] = t
    runs.append(judge(devices, "startup"))
    # as the daemon's start-up run will: in auto mode, fix what needs it on the policy's auto_buses
    # (`kmodguard fix` with no DEVICE would also take platform devices, e.g. pcspkr from -extra)
    todo = [d["id"] for d in (runs[-1]["doc"] or {}).get("devices", [])
            if d.get("verdict") in ("missing", "loadable") and d.get("subsystem") in AUTO_BUSES]
    if SCENARIO["mode"] == "auto" and todo:
        runs.append(fix(todo, "startup"))


def react(devices: list[dict], runs: list[dict]) -> None:
    # <<< PHASE 2: replace this function's body with: start `kmodguard daemon` once (in prepare(),
    # before READY, so that it also does the start-up run), then wait until its snapshot
    # $KMODGUARD_RUNTIME_DIR/state.json lists every device of `devices` as judged and shows no fix
    # running; take each device's verdict from the snapshot (or from `kmodguard status`, which
    # attaches it). collect() stays as it is: it reads the system, not kmodguard. >>>
    runs.append(judge(devices, "hotplug"))
    todo = needs_fix(devices)
    if SCENARIO["mode"] == "auto" and todo:
        runs.append(fix(todo, "hotplug"))
    elif SCENARIO["mode"] == "offer":  # what an admin reads (phase 2 adds the daemon's MOTD)
        code, text, start, end = kmodguard("status", as_json=False)
        runs.append({"when": "hotplug", "command": "status-text", "exit": code, "start": start, "end": end,
                     "doc": None, "text": text})


# --- the result ---------------------------------------------------------------------------------

def install_done(runs: list[dict]) -> float | None:
    """When the package transaction ended: the fix's end minus the steps kmodguard timed after it."""
    for r in runs:
        steps = (r.get("doc") or {}).get("steps") or []
        names = [s["step"] for s in steps]
        if r["command"] == "fix" and "install" in names and steps[names.index("install")]["result"] == "done":
            after = sum(s["seconds"] for s in steps[names.index("install") + 1:])
            return r["end"] - after
    return None


def collect(devices: list[dict], runs: list[dict], before: dict, watch: Watch) -> dict:
    after = rpm_packages()
    new = sorted(n for n, tid in after.items() if before["rpm"].get(n) != tid)
    tids = sorted({after[n] for n in new})
    calls = dracut_calls()
    rebuilds = [c["by"] for c in calls]
    image_now = image_state()
    changed = image_now != before["image"]
    inside = lsinitrd_modules() if changed else SCENARIO["initial_initramfs_modules"]
    plan_packages: dict[str, list[str]] = {}
    acted: set[str] = set()  # devices a fix installed or loaded something for
    for r in runs:
        for a in (r.get("doc") or {}).get("devices", []) if r["command"] == "fix" else []:
            if a.get("action") in ("install", "load"):
                acted.add(a["id"])
            if a.get("action") == "install" and a.get("package"):
                plan_packages.setdefault(a["id"], []).append(a["package"])
    t_installed = install_done(runs)
    out_devices = []
    for d in devices:
        addr = d.get("address")
        driver = driver_of(addr) if addr else None
        module = module_of(addr) if addr else None
        event = d.get("event") if d["how"] == "coldplug" else (watch.first("add", addr or "") or d.get("event"))
        bound_at = watch.first("bind", addr or "") if driver else None
        if driver and bound_at is None:
            bound_at = event  # bound before the watch began (a cold-plugged device bound at boot)
        installed = [p for p in plan_packages.get(addr or "", []) if p in new]

        def rel(t, event=event):
            return round(t - event, 3) if t is not None and event is not None else None

        out_devices.append({
            "device": d["qemu"], "qemu_id": d["id"], "how": d["how"], "address": addr, "port": d["port"],
            "vendor": _read(PCI / addr / "vendor") if addr else None,
            "device_id": _read(PCI / addr / "device") if addr else None,
            "modalias": _read(PCI / addr / "modalias") if addr else None,
            "driver_override": override if (override := _read(PCI / addr / "driver_override") if addr else None)
            not in ("(null)", "") else None,  # the kernel says "(null)" when none is set
            "verdict": d.get("verdict"),
            "status": d.get("status"),
            "installed": installed,
            "driver": driver,
            "module": module,
            # the image is the machine's: name its (last) rebuilder for the devices that were acted on
            "initramfs_rebuilt_by": rebuilds[-1] if rebuilds and addr in acted else None,
            "initramfs_has_module": bool(module and module in inside),
            "timings": {"event_to_verdict_s": rel(d.get("verdict_at")),
                        "event_to_installed_s": rel(t_installed) if installed else None,
                        "event_to_bound_s": rel(bound_at)},
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
        "kmodguard": [{k: r.get(k) for k in ("when", "command", "exit", "start", "end", "doc", "text")} for r in runs],
        "agent_s": round(now(), 3),
    }


def save_logs() -> None:
    run(["dmesg"], log=OUT / "dmesg.txt")
    for p in ("/var/log/dnf.log", "/var/log/dnf.rpm.log", "/var/log/dnf.librepo.log", str(SCRIPTLET_LOG),
              str(DRACUT_CALLS)):
        if os.path.exists(p):
            shutil.copyfile(p, OUT / os.path.basename(p))


def main() -> int:
    devices = [dict(d) for d in SCENARIO["devices"]]
    cold = [d for d in devices if d["how"] == "coldplug"]
    hot = [d for d in devices if d["how"] == "hotplug"]
    runs: list[dict] = []
    try:
        prepare()
        start_udev()
        watch = Watch()
        before = {"rpm": rpm_packages(), "image": image_state()}
        startup_run(cold, runs)
        mark("READY", t=round(now(), 3))
        if hot:
            wait_hotplug(hot)
            react(hot, runs)
        result = collect(devices, runs, before, watch)
        (OUT / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        mark("DONE", t=round(now(), 3))
        return 0
    except BaseException:  # noqa: BLE001 - whatever it is, the host must hear of it
        (OUT / "agent-error.txt").write_text(traceback.format_exc())
        mark("ERROR", error=traceback.format_exc().strip().splitlines()[-1])
        return 1
    finally:
        try:
            save_logs()
        except Exception:  # noqa: BLE001 - the logs are a courtesy; the result (or the error) is already written
            traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
