"""kmodguard as it ships, in a guest that boots the real systemd as PID 1.

    scn = SystemdScenario(name="sd-auto", hotplug=["intel-hda"], probes=["restart"])
    run = run_systemd(scn)         # Run: .doc (`run --init systemd --json`), .result, .results_dir

The same QEMU guest as harness.py (Debian's real kernel, TCG, the host's root over 9p under the
guest's own layer), but /init execs /lib/systemd/systemd (kmg_init=systemd on the kernel command
line): journald, udevd, dbus-daemon --system and the real polkitd start as at any boot, and
guest/kmg-e2e.service runs guest/systemd_agent.py, which installs kmodguard from the RPMs made here
(packaging/build-rpm, plus a provides-only RPM for what dpkg holds) with `rpm -i` and its
scriptlets, then plays the scenario's part of that boot and powers off.

A scenario is one or more boots of the same root: with more than one, the upper layer is an ext4
file system on a virtio-blk disk (a sparse file here), so that what a boot installs is there at the
next, and each boot may run another kernel (the upgrade scenarios boot kernel B second). The boot's
role tells the agent what to do (systemd_agent.py): main (install kmodguard, enable its units, the
hot-plugs, probes, an upgrade), image (install and enable only, as an image builder: cloud-init is
masked), instance (the first boot of a cloud instance: cloud-init runs with the NoCloud seed),
again (the same instance booted once more), upgraded (the boot into kernel B).

Units the host enables that make no sense in a guest are masked on the kernel command line (read
from the host's /etc/systemd/system/*.wants, never hard-coded), cloud-init's units too unless the
boot is a cloud instance's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness
import rpmbuild
from artifacts import REPO, SCRIPTLET_LOG, Build, ensure_build, rpm_uname
from harness import SESSION, HarnessError, Run, Scenario, Device, QMP, VM, log, preflight

KMODGUARD_UNITS = ("kmodguard.service", "kmodguard-fix.service", "kmodguard-check.service")
DISK_SIZE = 4 << 30  # sparse; the upgrade writes kernel B (about 150 MB) and its initramfs
BOOT_TIMEOUT = 240.0  # QEMU start to the agent's first mark: systemd's boot under TCG takes ~30 s
# Debian packages that hold what kmodguard's RPM requires: rpm cannot see dpkg's database, so a
# provides-only RPM (kmg-debian-provides) says they are there. Every requirement must be named here.
DEBIAN_OF = {
    "kmod": "kmod", "kmod-libs": "libkmod2", "python3-cffi": "python3-cffi", "python3-pyudev": "python3-pyudev",
    "python3-dbus-next": "python3-dbus-next", "python3-systemd": "python3-systemd", "python3-rpm": "python3-rpm",
    "python3": "python3", "/usr/bin/python3": "python3", "/bin/sh": "dash", "/usr/bin/sh": "dash",
    "systemd": "systemd", "systemd-udev": "udev", "dbus": "dbus", "polkit": "polkitd",
}


@dataclass
class SystemdScenario:
    name: str
    hotplug: list[str] = field(default_factory=list)
    coldplug: list[str] = field(default_factory=list)
    mode: str | None = "auto"  # None: the image says nothing (cloud-init's user data does)
    initramfs: str = "auto"
    enable: list[str] = field(default_factory=lambda: ["kmodguard.service"])  # by the image builder
    user_data: str | None = None  # cloud-init user data: the boots are image, instance(, again)
    again: bool = False  # a cloud scenario: boot the same instance once more
    upgrade: str | None = None  # "upgrade" (dnf upgrade) | "install" (dnf install kernel-core-uname-r = B)
    dnf_plugin: bool = True
    probes: list[str] = field(default_factory=list)  # restart | no-index | authorization
    timeout: float = 1200.0
    memory: int = 2048
    # the root is a copy of this scenario's (its first boot is this scenario's first): the upgrade
    # scenarios share the boot that installs kmodguard and fixes the device under kernel A
    base: str | None = None
    keep_disk: bool = False  # a base: its disk stays in its results directory for the others

    def boots(self) -> list[tuple[str, str]]:
        """(role, which kernel: A or B) of each boot, the base's first when there is one."""
        if self.user_data is not None:
            return [("image", "A"), ("instance", "A")] + ([("again", "A")] if self.again else [])
        if self.base:
            return [("main", "A"), ("upgrade", "A"), ("upgraded", "B")]
        if self.upgrade:
            return [("main", "A"), ("upgraded", "B")]
        return [("main", "A")]

    def devices(self) -> list[Device]:
        return Scenario(hotplug=self.hotplug, coldplug=self.coldplug).devices()

    def kmodguard_toml(self) -> str:
        return (
            "# written by tests/e2e/systemd_guest.py for this scenario\n"
            + (f'mode = "{self.mode}"\n' if self.mode else "")
            + f'initramfs = "{self.initramfs}"\n'
            "# the guest's /etc/os-release is Debian's (the host's root); its kernel packages are dnf's\n"
            'backend = "dnf"\n'
            "[timeouts]\n"
            f"settle = {harness.SETTLE}\n")


SYSTEMD_GUEST_NEEDS = {  # path on this machine (the guest runs the host's files) -> its Debian package
    "/lib/systemd/systemd": "systemd", "/usr/lib/polkit-1/polkitd": "polkitd", "/usr/bin/cloud-init": "cloud-init",
    "/usr/sbin/mkfs.ext4": "e2fsprogs", "/usr/bin/setpriv": "util-linux", "/usr/bin/busctl": "systemd",
    "/usr/bin/journalctl": "systemd", "/usr/bin/kernel-install": "systemd", "/usr/bin/lsinitrd": "dracut-core",
}


def preflight_systemd() -> None:
    missing = [f"{path} ({pkg})" for path, pkg in SYSTEMD_GUEST_NEEDS.items() if not os.path.exists(path)]
    if missing:
        raise HarnessError(f"the systemd guest needs {', '.join(missing)}: tools/setup --test installs them")


def masked_units(cloud: bool) -> list[str]:
    """Every unit the host enables (its /etc/systemd/system/*.wants), which would start in the
    guest too; the serial getty; cloud-init's units unless this boot is a cloud instance's."""
    found = set()
    etc = Path("/etc/systemd/system")
    for wants in etc.glob("*.wants"):
        found.update(p.name for p in wants.iterdir())
    found.add("serial-getty@ttyS0.service")
    found.discard("remote-fs.target")
    cloud_units = {u.name for u in Path("/lib/systemd/system").glob("cloud-*")
                   if u.name.endswith((".service", ".socket", ".timer"))}
    if cloud:
        found -= cloud_units - {"cloud-init-hotplugd.socket", "cloud-init-hotplugd.service"}
    else:
        found |= cloud_units
    return sorted(found)


def make_rpms(where: Path) -> list[Path]:
    """kmodguard's RPM from this checkout (packaging/build-rpm) and kmg-debian-provides, which
    provides every capability that RPM requires (rpm cannot see dpkg's packages), with the Debian
    package behind each in its description. An unknown requirement fails here, by name."""
    proc = subprocess.run([str(REPO / "packaging" / "build-rpm"), str(where)], capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"packaging/build-rpm failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rpm = Path(proc.stdout.strip().splitlines()[-1])
    requires = subprocess.run(["rpm", "-qpR", str(rpm)], capture_output=True, text=True, check=True).stdout
    names = sorted({line.split()[0] for line in requires.splitlines()
                    if line.strip() and not line.startswith(("rpmlib(", "config("))})
    wanted = [n for n in names if not n.startswith(("python3.", "python(abi)"))]
    unknown = [n for n in wanted if n not in DEBIAN_OF]
    if unknown:
        raise HarnessError(f"kmodguard's RPM requires {unknown}: name the Debian package of each in "
                           "systemd_guest.DEBIAN_OF")
    readme = "".join(f"{n}: Debian's {DEBIAN_OF.get(n, 'python3 and its python3-* packages')}\n" for n in names)
    provides = rpmbuild.build_rpm(where / "provides", "kmg-debian-provides", "1", "1", provides=tuple(names),
                                  files={"/usr/share/doc/kmg-debian-provides/README": readme.encode()})
    return [provides, rpm]


def make_disk(path: Path) -> Path:
    """The persistent upper layer: an empty ext4 file system on a sparse file."""
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    harness._run(["mkfs.ext4", "-q", "-F", "-L", "kmg-e2e", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                  str(path)])
    return path


def _scenario_json(scn: SystemdScenario, build: Build, devices: list[Device]) -> dict:
    return {
        "name": scn.name,
        "init": "systemd",
        "kver": build.kver,
        "kernels": {"A": build.kver, "B": build.upgrade_kver},
        "rpm_unames": {"A": rpm_uname(build.kver), "B": rpm_uname(build.upgrade_kver)},
        "mode": scn.mode,
        "initramfs": scn.initramfs,
        "enable": scn.enable,
        "upgrade": scn.upgrade,
        "dnf_plugin": scn.dnf_plugin,
        "probes": scn.probes,
        "boots": scn.boots(),
        "devices": [{"qemu": d.qemu, "id": d.id, "how": d.how, "port": d.port} for d in devices],
        "kmodguard_toml": scn.kmodguard_toml(),
        "timeout": scn.timeout,
        "scriptlet_log": SCRIPTLET_LOG,
        "initramfs_image": build.manifest["initial_initramfs"]["path"],
        "udev_rules": "",
    }


def _seed(out: Path, scn: SystemdScenario) -> str:
    """cloud-init's NoCloud seed in the results share; its kernel command-line word."""
    seed = out / "seed"
    seed.mkdir()
    (seed / "meta-data").write_text(f"instance-id: kmg-e2e-{scn.name}\nlocal-hostname: kmg-e2e\n")
    (seed / "user-data").write_text(scn.user_data or "")
    return "ds=nocloud;s=file:///run/e2e/out/seed/"


def run_systemd(scn: SystemdScenario, keep: bool = False, results_root: Path | None = None,
                base: Run | None = None) -> Run:
    """Boot the scenario's boots; with scn.base, `base` is that scenario's finished Run (kept, with
    its disk): its root is copied and its first boot's result stands as this one's first."""
    t0 = time.monotonic()
    preflight()
    preflight_systemd()
    build = ensure_build()
    devices = scn.devices()
    boots = scn.boots()
    out = Path(tempfile.mkdtemp(prefix=f"kmodguard-e2e-{scn.name}-", dir=results_root))
    out.chmod(0o755)
    qmp_dir = Path(tempfile.mkdtemp(prefix="kmg-qmp-", dir="/tmp"))
    ok: bool | None = False
    vm = None
    try:
        rpms = SESSION.once("kmodguard-rpms", make_rpms)
        (out / "rpms").mkdir()
        for f in rpms:
            shutil.copyfile(f, out / "rpms" / f.name)
        shutil.copytree(SESSION.index(build, False), out / "index", symlinks=True)
        (out / "scenario.json").write_text(json.dumps(_scenario_json(scn, build, devices), indent=1) + "\n")
        first = 1
        if scn.base:
            if base is None or base.results_dir is None or not (base.results_dir / "disk.img").exists():
                raise HarnessError(f"{scn.name} starts from {scn.base}'s root, which is not there")
            disk = out / "disk.img"
            harness._run(["cp", "--sparse=always", "--reflink=auto", base.results_dir / "disk.img", disk])
            shutil.copyfile(base.results_dir / "result-1.json", out / "result-1.json")
            first = 2
        else:
            disk = make_disk(out / "disk.img") if len(boots) > 1 or scn.keep_disk else None
        deadline = t0 + scn.timeout
        repo = build.upgrade_repo  # kernel A's packages, and B's for the upgrade
        marks: list = []
        hotplug_at: dict[str, float] = {}
        seed = _seed(out, scn) if scn.user_data is not None else ""
        for n, (role, which) in list(enumerate(boots, 1))[first - 1:]:
            kver = build.kver if which == "A" else build.upgrade_kver
            cloud = role in ("instance", "again")
            args = ["kmg_init=systemd", f"kmg_boot={n}", "systemd.show_status=1", "systemd.unit=multi-user.target",
                    *(f"systemd.mask={u}" for u in masked_units(cloud))]
            if disk is not None:
                args.append("kmg_disk")
            if cloud:
                args.append(seed)
            log(f"{scn.name}: boot {n} ({role}, kernel {kver})")
            _plug_state(devices, n)
            vm = VM(build, SESSION.initrd(build, kver), repo, out, qmp_dir / "qmp", devices, scn.memory, vmlinuz=build.vmlinuz_of(kver), kernel_args=tuple(args), disk=disk,
                    serial_name=f"serial-{n}.log")
            vm.start()
            qmp = QMP(qmp_dir / "qmp")
            try:
                vm.wait_for("AGENT", min(deadline, time.monotonic() + BOOT_TIMEOUT), f"boot {n} to start the agent")
                if role == "main" and any(d.how == "hotplug" for d in devices):
                    vm.wait_for("READY", deadline, "kmodguard.service to be ready")
                    for d in devices:
                        if d.how == "hotplug":
                            qmp.execute("device_add", driver=d.qemu, id=d.id, bus=d.port_id)
                            hotplug_at[d.id] = round(time.monotonic() - vm.t0, 3)
                vm.wait_for("DONE", deadline, f"the agent to finish boot {n} ({role})")
            finally:
                qmp.close()
            vm.wait_exit(120)  # the agent ends the boot with systemctl poweroff
            marks.append([(t, tag, info) for t, tag, info in vm.marks])
            vm.kill()
            vm = None
        results = [json.loads((out / f"result-{n}.json").read_text()) for n in range(1, len(boots) + 1)]
        ok = True
        doc = document(scn, build, results, time.monotonic() - t0, marks, hotplug_at, out if keep else None)
        return Run(doc, {"boots": results}, out if keep else None, marks)
    except HarnessError as exc:
        ok = None
        err = type(exc)(f"{exc}\nresults kept in {out} (serial-N.log, journal-N.json, commands.log, result-N.json)")
        err.results_dir = out
        raise err from None
    finally:
        if vm is not None:
            vm.kill()
        shutil.rmtree(qmp_dir, ignore_errors=True)
        disk_img = out / "disk.img"
        if disk_img.exists() and not (ok and scn.keep_disk):
            disk_img.unlink()  # 4 GiB sparse: never kept
        if ok and not keep:
            shutil.rmtree(out, ignore_errors=True)
        elif ok is False:
            log(f"results kept in {out}")


def _plug_state(devices: list[Device], boot: int) -> None:
    """From the second boot on, hot-plugged devices are there from the start (QEMU's command line),
    as a device stays attached to an instance across its reboots."""
    if boot > 1:
        for d in devices:
            d.how = "coldplug" if d.how == "hotplug" else d.how


def document(scn: SystemdScenario, build: Build, results: list[dict], wall: float, marks: list,
             hotplug_at: dict, results_dir: Path | None) -> dict:
    """What `tests/e2e/run --init systemd --json` prints (tests/e2e/run --help documents it)."""
    last = results[-1]
    message_ids = sorted({m for r in results for m in r.get("message_ids", [])})
    offsets = [harness.clock_offset(boot_marks) for boot_marks in marks]
    timings: dict = {}
    first = results[0]
    agent = next((t for t, tag, _ in marks[0] if tag == "AGENT"), None) if marks else None
    ready = next((t for t, tag, _ in marks[0] if tag == "READY"), None) if marks else None
    timings["boot_to_agent_s"] = round(agent, 1) if agent is not None else None
    timings["boot_to_ready_s"] = round(ready, 1) if ready is not None else None
    if offsets and offsets[0] is not None:
        for d in first.get("devices", []):
            bound = d.get("bound_unix")
            if d.get("id") in hotplug_at and bound:
                timings.setdefault("device_add_to_bound_s", {})[d["device"]] = round(
                    bound + offsets[0] - hotplug_at[d["id"]], 1)
    up = next((r["upgrade"] for r in results if r.get("upgrade")), {})
    if up.get("seconds") is not None:
        timings["upgrade_transaction_s"] = up["seconds"]
    if len(results) > 1:
        b = results[-1]
        timings["reboot_to_bound_s"] = b.get("boot_to_bound_s")
    return {
        "scenario": scn.name,
        "init": "systemd",
        "kernels": [r.get("kernel") for r in results],
        "mode": scn.mode,
        "units": last.get("units", {}),
        "message_ids": message_ids,
        "boots": [{"kernel": r.get("kernel"), "role": r.get("role"),
                   "devices": [{"device": d["device"], "address": d.get("address"), "driver": d.get("driver")}
                               for d in r.get("devices", [])]} for r in results],
        "transactions": last.get("module_transactions"),
        "timings": timings,
        "wall_s": round(wall, 1),
        "results": str(results_dir) if results_dir else None,
    }
