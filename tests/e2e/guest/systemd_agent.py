"""The systemd guest's part of a scenario, one boot at a time (run by kmg-e2e.service).

systemd is PID 1: journald, udevd, the system bus and polkitd run as at any boot. The boot's role
(OUT/scenario.json's "boots", indexed by kmg_boot=N on the kernel command line) says what to do:

  main      install kmodguard from its RPMs (rpm -i, scriptlets and all), check that the RPM
            enabled nothing, enable the scenario's units as an image builder would and start
            them; READY (the host hot-plugs); the probes (restart mid-fix, no index, polkit); wait
            until kmodguard is done; the kernel upgrade when the scenario has one
  image     install and enable only, then power off: the cloud image (cloud-init is masked)
  instance  the cloud instance's first boot: cloud-init runs with the NoCloud seed (its user data
            drops kmodguard's policy), kmodguard-check.service after cloud-config.service
  again     the same instance booted again
  upgrade   kernel A again, on a copy of another scenario's root (the upgrade scenarios share the
            boot that installed kmodguard and fixed the device): the kernel upgrade only
  upgraded  the boot into kernel B after the upgrade

Each boot writes OUT/result-N.json, read from the system itself: drivers from sysfs, packages from
the rpm database, transactions from dnf's history, units from systemctl, events from the real
journal (journalctl -o json, saved as journal-N.json), initramfs contents from lsinitrd. It ends
with `systemctl poweroff` (the host then boots the next, or stops).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import agent as common  # noqa: E402  (its helpers: run, mark, sysfs, rpm database, dnf history)
from agent import OUT, SCENARIO, device_under, driver_of, mark, module_of, read_json, run  # noqa: E402

BOOT = next(int(w.split("=", 1)[1]) for w in Path("/proc/cmdline").read_text().split() if w.startswith("kmg_boot="))
ROLE, WHICH = SCENARIO["boots"][BOOT - 1]
KVER = os.uname().release
UNITS = ("kmodguard.service", "kmodguard-fix.service", "kmodguard-check.service")
# what `systemctl show` tells about a unit's hardening: kmodguard.service must run with all of it
HARDENING = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateDevices", "PrivateTmp",
             "CapabilityBoundingSet", "MemoryDenyWriteExecute", "RestrictAddressFamilies", "SystemCallFilter",
             "ProtectKernelTunables", "IPAddressDeny", "RestrictNamespaces")
REQUEST = Path("/var/lib/kmodguard/fix-request.json")
SNAPSHOT = Path("/run/kmodguard/state.json")
MOTD = Path("/run/motd.d/kmodguard")
POLKIT_RULE = Path("/etc/polkit-1/rules.d/50-kmg-e2e.rules")
FIXERS = ("kmgfix", "kmgfixer")  # the group a polkit rule lets fix, and its member
UNINDEXED_ID = "5286700606504ef88575b02c65f313d2"  # README: the cannot-judge (no index) MESSAGE_ID
DEST = ("org.kmodguard.Daemon1", "/org/kmodguard/Daemon1", "org.kmodguard.Daemon1")
T_START = time.time()
DEADLINE = time.monotonic() + max(120.0, SCENARIO["timeout"] - 180)


def systemctl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run(["systemctl", *args], timeout=timeout)


def show(unit: str, *props: str) -> dict[str, str]:
    out = systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def active(unit: str) -> str:
    return show(unit, "ActiveState")["ActiveState"]


def states() -> dict[str, str]:
    """{unit: ActiveState} of kmodguard's units in one systemctl call (each costs most of a second
    under TCG, beside the fix it waits for)."""
    out = systemctl("show", "--property=Id", "--property=ActiveState", *UNITS).stdout
    found: dict[str, str] = {}
    for block in out.split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in props:
            found[props["Id"]] = props.get("ActiveState", "")
    return found


def wait(what: str, done, timeout: float | None = None, step: float = 0.5):
    """Poll done() until it is true; on the deadline, report what was awaited and go on."""
    end = min(DEADLINE, time.monotonic() + timeout) if timeout else DEADLINE
    while True:
        value = done()
        if value:
            return value
        if time.monotonic() > end:
            mark("WAIT-TIMEOUT", what=what)
            return value
        time.sleep(step)


# --- installing kmodguard, as a package --------------------------------------------------------

def provision(start: bool) -> dict:
    """rpm -i the provides-only RPM and kmodguard's, scriptlets run; the image builder's steps."""
    rpms = sorted((OUT / "rpms").glob("*.rpm"), key=lambda p: not p.name.startswith("kmg-debian-provides"))
    rpm = ["rpm", "--force-debian"] if "--force-debian" in run(["rpm", "--help"]).stdout else ["rpm"]
    t = time.time()
    proc = run([*rpm, "-i", *map(str, rpms)], timeout=300)
    info = {"rpm_exit": proc.returncode, "rpm_output": (proc.stdout + proc.stderr)[-2000:],
            "seconds": round(time.time() - t, 1)}
    # waiver: Fedora's systemd reloads itself from a file trigger when a package adds units
    systemctl("daemon-reload")
    info["enabled_by_rpm"] = {u: systemctl("is-enabled", u).stdout.strip() for u in UNITS}
    conf = Path("/etc/kmodguard/kmodguard.toml")
    conf.write_text(SCENARIO["kmodguard_toml"])
    if "no-index" not in SCENARIO["probes"]:
        install_index()
    if not SCENARIO["dnf_plugin"]:
        disable_dnf_plugin()
    for unit in SCENARIO["enable"]:
        systemctl("enable", *(["--now"] if start else []), unit)
    info["enabled"] = {u: systemctl("is-enabled", u).stdout.strip() for u in UNITS}
    return info


def disable_dnf_plugin() -> None:
    plugin = Path("/etc/dnf/plugins/kmodguard.conf")  # the RPM's %config file
    plugin.write_text(plugin.read_text().replace("enabled=1", "enabled=0"))


def install_index() -> None:
    dest = Path("/var/lib/kmodguard/index")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(OUT / "index", dest, symlinks=True)


# --- devices -------------------------------------------------------------------------------------

def devices() -> list[dict]:
    out = []
    for d in SCENARIO["devices"]:
        address = device_under(d["port"])
        entry = {"device": d["qemu"], "id": d["id"], "address": address,
                 "driver": driver_of(address) if address else None,
                 "module": module_of(address) if address else None}
        link = Path(f"/sys/bus/pci/devices/{address}/driver")
        if entry["driver"]:
            entry["bound_unix"] = BOUND.setdefault(address, os.lstat(link).st_mtime)
        out.append(entry)
    return out


BOUND: dict[str, float] = {}  # address -> when the agent first saw it bound (or the link's time)


def watch_bound() -> None:
    for d in SCENARIO["devices"]:
        address = device_under(d["port"])
        if address and driver_of(address) and address not in BOUND:
            BOUND[address] = time.time()


def fix_idle(state: dict[str, str]) -> bool:
    """No fix runs and none is asked for: the fix and check units are not starting or running."""
    return (not REQUEST.exists() and state.get("kmodguard-fix.service") not in ("activating", "deactivating")
            and state.get("kmodguard-check.service") != "activating")


def settled(expect_bound: bool) -> bool:
    """kmodguard is done: every device is in sysfs, no fix runs or is asked for, the daemon (when
    it runs) has judged every device and runs no fix; and, when expected, every device is bound."""
    watch_bound()
    devs = devices()
    state = states()
    if any(d["address"] is None for d in devs) or not fix_idle(state):
        return False
    if state.get("kmodguard.service") == "active":
        snap = read_json(SNAPSHOT) or {}
        if snap.get("fix_running"):
            return False
        judged = {e.get("device") for e in snap.get("events", []) if e.get("kind") == "verdict"}
        if not expect_bound and any(d["address"] not in judged for d in devs):
            return False
    return all(d["driver"] for d in devs) if expect_bound else True


# --- probes ----------------------------------------------------------------------------------------

def transaction_running() -> bool:
    """A package transaction runs: some process is `dnf ... install` (the fix's child)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (any(os.path.basename(a.decode(errors="replace")) in ("dnf", "dnf-3") for a in argv[:2])
                    and b"install" in argv):
                return True
    return False


def restart_mid_fix() -> dict:
    """`systemctl restart kmodguard.service` while kmodguard-fix.service runs dnf's transaction."""
    # /proc first: a systemctl call costs most of a second under TCG
    seen = wait("kmodguard-fix.service running a dnf transaction",
                lambda: transaction_running() and active("kmodguard-fix.service") == "activating", timeout=420,
                step=0.1)
    if not seen:
        (OUT / "restart-probe-ps.txt").write_text(run(["ps", "-eo", "pid,ppid,etimes,args"]).stdout + "\n" + run(
            ["journalctl", "-b", "--no-pager", "-u", "kmodguard-fix.service", "-u", "kmodguard.service"]).stdout)
    before = show("kmodguard.service", "MainPID", "InvocationID")
    fix_before = show("kmodguard-fix.service", "ActiveState", "InvocationID", "MainPID")
    proc = systemctl("restart", "kmodguard.service")
    after = show("kmodguard.service", "MainPID", "InvocationID", "ActiveState")
    fix_after = show("kmodguard-fix.service", "ActiveState", "InvocationID", "MainPID")
    return {"during_transaction": bool(seen), "restart_exit": proc.returncode, "daemon_before": before,
            "daemon_after": after, "fix_before": fix_before, "fix_after": fix_after, "unix": time.time()}


def bus(user: str | None, member: str, signature: str = "", *args: str, timeout: int = 900) -> dict:
    cmd = ["busctl", "--system", f"--timeout={timeout}", "--json=short", "call", *DEST, member]
    if signature:
        cmd += [signature, *args]
    if user:  # the user with its own primary group (nobody's is nogroup on Debian) and its groups
        import pwd
        entry = pwd.getpwnam(user)
        cmd = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", *cmd]
    proc = run(cmd, timeout=timeout + 30)
    return {"user": user or "root", "member": member, "exit": proc.returncode, "stdout": proc.stdout[-3000:],
            "stderr": proc.stderr.strip()[-500:]}


def authorization(devs: list[dict]) -> dict:
    """The real polkitd with the shipped policy: nobody is refused, a polkit rule's group may fix,
    root's `kmodguard fix` goes through the daemon, GetStatus is everyone's."""
    first, second = devs[0], devs[1]
    out = {"nobody_status": bus("nobody", "GetStatus"),
           "nobody_fix": bus("nobody", "Fix", "asa{sv}", "1", first["address"], "0", timeout=120)}
    run(["groupadd", "-f", FIXERS[0]], check=True)
    run(["useradd", "-M", "-N", "-g", FIXERS[0], "-s", "/usr/sbin/nologin", FIXERS[1]], check=True)
    POLKIT_RULE.write_text(
        "// kmodguard e2e: members of kmgfix may fix devices (org.kmodguard.fix), without a password\n"
        "polkit.addRule(function(action, subject) {\n"
        f'    if (action.id == "org.kmodguard.fix" && subject.isInGroup("{FIXERS[0]}")) {{\n'
        "        return polkit.Result.YES;\n    }\n});\n")
    time.sleep(2)  # polkitd rereads its rules on change (inotify)
    out["member_fix"] = bus(FIXERS[1], "Fix", "asa{sv}", "1", first["address"], "0")
    out["member_fix_driver"] = driver_of(first["address"])
    proc = run(["kmodguard", "fix", "--yes", "--json", second["address"]], timeout=900)
    out["root_fix"] = {"exit": proc.returncode, "stderr": proc.stderr[-2000:], "stdout": proc.stdout[-3000:]}
    out["root_fix_driver"] = driver_of(second["address"])
    return out


# --- the upgrade --------------------------------------------------------------------------------

def upgrade() -> dict:
    kind = SCENARIO["upgrade"]
    b_kver, b_uname = SCENARIO["kernels"]["B"], SCENARIO["rpm_unames"]["B"]
    cmd = ["dnf", "-y", "upgrade"] if kind == "upgrade" else ["dnf", "-y", "install", f"kernel-core-uname-r = {b_uname}"]
    t = time.time()
    proc = run(cmd, timeout=1500)
    seconds = round(time.time() - t, 1)
    image = Path(f"/boot/initrd.img-{b_kver}")
    # evidence only: the indexes there are now (the kernel-install plugin derives B's)
    indexes = run(["kmodguard", "index", "list", "--json"]).stdout
    return {"indexes": indexes[-3000:], "command": cmd, "exit": proc.returncode, "seconds": seconds, "stdout": proc.stdout[-6000:],
            "stderr": proc.stderr[-3000:], "motd_kernel": common._read(Path("/run/motd.d/kmodguard-kernel")),
            "motd": common._read(MOTD), "image": str(image), "image_exists": image.exists(),
            "image_modules": common.lsinitrd_modules(image) if image.exists() else [],
            "kernel_modules_b": run(["rpm", "-q", f"kernel-modules-{b_uname.rsplit('.', 1)[0]}"]).stdout.strip(),
            "unix": t}


# --- what happened ---------------------------------------------------------------------------------

def module_transactions() -> list[dict]:
    """dnf's history: each transaction that installed a kernel module package (whoever ran it)."""
    db_path = Path("/var/lib/dnf/history.sqlite")
    if not db_path.exists():
        return []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT t.id, t.dt_begin, t.dt_end, t.cmdline, r.name, r.version, r.release, ti.action "
            "FROM trans t JOIN trans_item ti ON ti.trans_id = t.id JOIN rpm r ON r.item_id = ti.item_id "
            "ORDER BY t.id").fetchall()
    finally:
        db.close()
    by_id: dict[int, dict] = {}
    for tid, begin, end, cmdline, name, version, release, action in rows:
        t = by_id.setdefault(tid, {"id": tid, "begin": begin, "end": end, "cmdline": cmdline, "installed": []})
        if action == 1:  # libdnf's TransactionItemAction INSTALL
            t["installed"].append(f"{name}-{version}-{release}")
    return [t for t in by_id.values() if any(p.startswith("kernel-modules") for p in t["installed"])]


def journal() -> tuple[list[dict], list[dict]]:
    """This boot's journal, saved whole; (kmodguard's own entries, unit start/finish entries)."""
    proc = subprocess.run(["journalctl", "-b", "-o", "json", "--no-pager"], capture_output=True, text=True,
                          timeout=300, check=False)
    (OUT / f"journal-{BOOT}.json").write_text(proc.stdout)
    own, units = [], []
    keep = ("MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "_SYSTEMD_UNIT", "_PID", "__REALTIME_TIMESTAMP",
            "UNIT", "JOB_TYPE", "JOB_RESULT", "CODE_FUNC")
    for line in proc.stdout.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if not isinstance(e.get("MESSAGE"), str):
            continue
        small = {k: e[k] for k in keep if k in e}
        small.update({k: v for k, v in e.items() if k.isupper() and not k.startswith("_") and k not in small
                      and k.startswith(("DEVICE", "MODALIAS", "PACKAGE", "MODULE", "VERDICT", "KMODGUARD", "REQUEST",
                                        "EXIT", "REASON", "RECORD", "KVER", "COUNT"))})
        if e.get("SYSLOG_IDENTIFIER", "").startswith("kmodguard") or e.get("_SYSTEMD_UNIT", "").startswith("kmodguard"):
            own.append(small)
        if e.get("UNIT", "").startswith(("kmodguard", "cloud-")) and e.get("JOB_TYPE"):
            units.append(small)
        elif e.get("UNIT", "").startswith(("kmodguard", "cloud-")) and "MESSAGE_ID" in e:
            units.append(small)
    return own, units


def units() -> dict:
    out = {}
    for u in UNITS:
        props = show(u, "LoadState", "ActiveState", "SubState", "Result", "UnitFileState", "ExecMainStatus",
                     "NRestarts", "InvocationID")
        if props.get("LoadState") == "loaded":
            out[u] = props
    return out


def collect(extra: dict) -> dict:
    (OUT / f"ps-{BOOT}.txt").write_text(run(["ps", "-eo", "pid,ppid,etimes,stat,wchan:20,args"]).stdout)
    cloud_logs = Path("/run/cloud-init")  # the generator's and ds-identify's reasoning
    for f in sorted(cloud_logs.glob("*")) if cloud_logs.is_dir() else ():
        if f.is_file() and not f.is_symlink():
            (OUT / f"run-cloud-init-{BOOT}").mkdir(exist_ok=True)
            shutil.copyfile(f, OUT / f"run-cloud-init-{BOOT}" / f.name)
    own, unit_entries = journal()
    devs = devices()
    loaded, transactions = units(), module_transactions()
    ids = sorted({e["MESSAGE_ID"] for e in own if e.get("MESSAGE_ID")})
    failed = systemctl("--failed", "--plain", "--no-legend").stdout.split("\n")
    result = {
        "boot": BOOT, "role": ROLE, "kernel": KVER, "devices": devs, "units": loaded,
        "hardening": show("kmodguard.service", *HARDENING) if "kmodguard.service" in loaded else {},
        "message_ids": ids, "journal": own, "unit_journal": unit_entries,
        "module_transactions": len(transactions), "transactions_detail": transactions,
        "packages": common.rpm_packages(),
        "motd": common._read(MOTD),
        "status_text": systemctl("status", "--no-pager", "--lines=0", "kmodguard.service").stdout[-1500:],
        "snapshot": read_json(SNAPSHOT), "last_fix": read_json(Path("/var/lib/kmodguard/last-fix.json")),
        "failed_units": [f.split()[0] for f in failed if f.strip()],
        "system_state": systemctl("is-system-running").stdout.strip(),
        "scriptlets": common._read(Path(SCENARIO["scriptlet_log"])),
        "agent_started": T_START,
        **extra,
    }
    boot_unix = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    bound = [d["bound_unix"] for d in devs if d.get("bound_unix")]
    result["boot_to_bound_s"] = round(max(bound) - boot_unix, 1) if bound and len(bound) == len(devs) else None
    result["boot_unix"] = boot_unix
    return result


def main() -> int:
    mark("AGENT", boot=BOOT, role=ROLE, kernel=KVER)
    extra: dict = {}
    try:
        # is-system-running --wait: until the boot is done (cloud-init's stages included)
        extra["boot_state"] = systemctl("is-system-running", "--wait", timeout=900).stdout.strip()
        if ROLE in ("main", "image"):
            extra["provision"] = provision(start=ROLE == "main")
        if ROLE == "main":
            if "no-index" in SCENARIO["probes"]:
                # the daemon started without an index: it cannot judge; then the index, and a reload
                wait("the daemon's cannot-judge entry", lambda: UNINDEXED_ID in run(
                    ["journalctl", "-b", "-o", "cat", "--output-fields=MESSAGE_ID", "-u", "kmodguard.service"]).stdout,
                    timeout=60)
                install_index()
                systemctl("reload", "kmodguard.service")
                time.sleep(3)
            mark("READY")
            if any(d["how"] == "hotplug" for d in SCENARIO["devices"]):
                wait("the hot-plugged devices in sysfs", lambda: all(device_under(d["port"]) for d in SCENARIO["devices"]),
                     timeout=120)
            if "restart" in SCENARIO["probes"]:
                extra["restart"] = restart_mid_fix()
            wait("kmodguard to be done", lambda: settled(SCENARIO["mode"] == "auto"))
            extra["status"] = json.loads(run(["kmodguard", "status", "--json"]).stdout or "null")
            extra["motd_offered"] = common._read(MOTD)
            extra["transactions_offered"] = len(module_transactions())
            extra["status_offered"] = systemctl("status", "--no-pager", "--lines=0", "kmodguard.service").stdout
            if "authorization" in SCENARIO["probes"]:
                extra["authorization"] = authorization(devices())
                wait("the authorized fixes to end", lambda: settled(True), timeout=300)
            if SCENARIO["upgrade"]:
                extra["upgrade"] = upgrade()
        elif ROLE == "upgrade":
            if not SCENARIO["dnf_plugin"]:
                disable_dnf_plugin()
            wait("kmodguard to be done", lambda: settled(True), timeout=600)
            extra["upgrade"] = upgrade()
        elif ROLE in ("instance", "again", "upgraded"):
            wait("kmodguard to be done", lambda: settled(True), timeout=600)
            extra["cloud_init"] = run(["cloud-init", "status", "--long"]).stdout if ROLE != "upgraded" else None
        result = collect(extra)
    except Exception:
        (OUT / f"agent-error-{BOOT}.txt").write_text(traceback.format_exc())
        mark("ERROR", error=traceback.format_exc().strip().splitlines()[-1])
        result = {"boot": BOOT, "role": ROLE, "kernel": KVER, "error": traceback.format_exc(), **extra}
    (OUT / f"result-{BOOT}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    mark("DONE", boot=BOOT)
    subprocess.run(["sync"], check=False)
    # --no-block: queued at once; run to its end here, or the unit's end would kill it with the cgroup
    subprocess.run(["systemctl", "poweroff", "--no-block"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
