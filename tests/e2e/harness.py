"""Run one end-to-end scenario: Debian's real kernel in QEMU (TCG), devices hot- or cold-plugged,
`kmodguard daemon` (under the real udevd, on the real system bus) judging and fixing them inside
the guest by itself, the outcome read from the guest's own system.

    scn = Scenario(hotplug=["intel-hda"], name="hda")
    res = run_scenario(scn)          # Run: .doc (the JSON document of `run --json`), .result, .results_dir

The pieces (see tests/e2e/README.md for the whole picture):

  artifacts.ensure_build()  cached RPMs, repositories and the guest's layer (built once)
  Session                per-process, in a temporary directory: the boot initramfs (busybox + the
                         9p/overlay modules, with guest/init.sh) and the package indexes, made with
                         the current kmodguard (`kmodguard index build --from-dir`), so the index
                         format always matches the code under test
  VM                     the QEMU process: q35, TCG, -smp 1, one pcie-root-port per device at a fixed
                         address (0000:00:10.0 + i), four 9p shares (host root, layer, repository,
                         results), QMP on a short unix socket, the serial console read by a thread
                         that timestamps every line into serial.log and acts on "KMG-E2E TAG {json}"
  guest/agent.py         the scenario inside the guest: udevd, dbus-daemon, kmodguard daemon, the
                         wait on the daemon's snapshot; writes result.json into the results share

QEMU is always killed: try/finally around every run, an atexit hook over every VM still alive, and
`setpriv --pdeathsig KILL` so that it dies with the process that started it even on SIGKILL.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from artifacts import REPO, SCRIPTLET_LOG, Build, ensure_build

GUEST = HERE / "guest"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PORT_BASE = 0x10  # root port i sits at 0000:00:(0x10+i).0; q35's own devices use 00:00.0 and 00:1f.x
MAX_DEVICES = 14
LPC = "0000:00:1f.0"  # q35's ICH9 LPC bridge: lpc_ich, which kmodguard's default policy ignores
# The guest's timeouts.settle (see Scenario.kmodguard_toml and tests/e2e/README.md)
SETTLE = 2.0
BOOT_TIMEOUT = 180.0  # kernel + initramfs + switch_root, under TCG
DEFAULT_TIMEOUT = 900.0


class HarnessError(RuntimeError):
    """The scenario could not be run to its end (QEMU, the guest agent, the build)."""

    results_dir: Path | None = None  # where the logs were kept


class ScenarioTimeout(HarnessError):
    pass


def log(msg: str) -> None:
    print(f"e2e: {msg}", file=sys.stderr, flush=True)


# --- the scenario ------------------------------------------------------------------------------

@dataclass
class Device:
    qemu: str  # QEMU's device name (intel-hda, megasas, ...)
    how: str  # hotplug | coldplug
    index: int  # its root port
    passthrough: bool = False  # claimed for vfio-pci by a driverctl-style udev rule

    @property
    def id(self) -> str:
        return f"{'hp' if self.how == 'hotplug' else 'cp'}{self.index}"

    @property
    def port_id(self) -> str:
        return f"rp{self.index}"

    @property
    def port(self) -> str:
        return f"0000:00:{PORT_BASE + self.index:02x}.0"


@dataclass
class Scenario:
    hotplug: list[str] = field(default_factory=list)
    coldplug: list[str] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)  # hot-plugged, claimed by a udev rule
    mode: str = "auto"  # kmodguard's policy mode: auto | offer
    initramfs: str = "auto"  # kmodguard's policy initramfs: auto | always | never
    full_modules: bool = False  # the whole kernel-modules package instead of the trimmed one
    timeout: float = DEFAULT_TIMEOUT
    memory: int = 2048  # MiB; the full kernel-modules puts 240 MB into the guest's tmpfs
    name: str = "scenario"

    def devices(self) -> list[Device]:
        devs = [Device(q, "coldplug", 0) for q in self.coldplug]
        devs += [Device(q, "hotplug", 0) for q in self.hotplug]
        devs += [Device(q, "hotplug", 0, passthrough=True) for q in self.passthrough]
        if len(devs) > MAX_DEVICES:
            raise HarnessError(f"at most {MAX_DEVICES} devices (one root port each)")
        for i, d in enumerate(devs):
            d.index = i
        return devs

    def udev_rules(self) -> str:
        lines = []
        for d in self.devices():
            if d.passthrough:
                # what driverctl set-override does, as a rule: claim the device before any driver can
                lines += [f"# driverctl-style: the device behind root port {d.port} ({d.qemu}) is for passthrough",
                          (f'ACTION=="add", SUBSYSTEM=="pci", KERNELS=="{d.port}", KERNEL!="{d.port}", '
                           f'ATTR{{driver_override}}="vfio-pci"')]
        return "\n".join(lines) + ("\n" if lines else "")

    def kmodguard_toml(self) -> str:
        return (
            "# written by tests/e2e/harness.py for this scenario\n"
            f'mode = "{self.mode}"\n'
            f'initramfs = "{self.initramfs}"\n'
            "# The guest's /etc/os-release is Debian's (the host's root): the distribution's own package\n"
            "# manager would be apt; this guest's kernel packages are dnf's.\n"
            'backend = "dnf"\n'
            "# (q35's LPC bridge and pcspkr need nothing here: the default ignore.modules has lpc_ich, pcspkr)\n"
            "[timeouts]\n"
            "# kmodguard's default, written out: udev's events of back-to-back QMP hot-plugs reach the\n"
            "# daemon within 0.1 s of each other under TCG, so one window takes them all, as one burst\n"
            f"settle = {SETTLE}\n")


# --- per-process pieces: boot initramfs, indexes ------------------------------------------------

def _run(cmd: list, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "LC_ALL": "C", **kw.pop("env", {})}, **kw)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


TOOLS = ("qemu-system-x86_64", "busybox", "cpio", "modprobe", "depmod", "rpm", "rpmbuild", "rpmsign", "rpmkeys",
         "createrepo_c", "gpg", "dnf", "dracut", "lsinitrd", "udevadm", "dbus-daemon", "busctl")
BUS_POLICY = REPO / "units" / "org.kmodguard.Daemon1.conf"  # installed in the guest's system.d


def preflight() -> None:
    """Every host tool the harness (or, through the shared root, the guest) needs; fail, never skip."""
    missing = [t for t in TOOLS if not (shutil.which(t) or os.access(f"/usr/sbin/{t}", os.X_OK)
                                        or os.access(f"/sbin/{t}", os.X_OK))]
    if not os.access("/lib/systemd/systemd-udevd", os.X_OK):
        missing.append("/lib/systemd/systemd-udevd")
    if missing:
        raise HarnessError(f"missing on this machine: {', '.join(missing)} (tools/setup --test installs them: "
                           "qemu-system-x86 busybox-static cpio kmod rpm createrepo-c gnupg dnf dracut-core udev "
                           "dbus-daemon systemd)")
    if not BUS_POLICY.is_file() or not os.path.isfile("/usr/share/dbus-1/system.conf"):
        raise HarnessError(f"the guest's system bus needs /usr/share/dbus-1/system.conf (dbus-system-bus-common) "
                           f"and kmodguard's policy {BUS_POLICY}")
    if not VENV_PYTHON.exists():
        raise HarnessError(f"{VENV_PYTHON} is missing: the guest runs kmodguard from the project venv "
                           "(tools/setup makes it)")


def kmodguard_python() -> str:
    return str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


class Session:
    """What each process makes once, in its own temporary directory (removed at exit)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.dir: Path | None = None
        self.made: dict = {}

    def _dir(self) -> Path:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="kmodguard-e2e-session-"))
            atexit.register(shutil.rmtree, self.dir, True)
        return self.dir

    def initrd(self, build: Build, kver: str | None = None) -> Path:
        kver = kver or build.kver
        with self.lock:
            key = ("initrd", kver)
            if key not in self.made:
                self.made[key] = make_initrd(build, self._dir() / f"initrd-{kver}", kver)
            return self.made[key]

    def once(self, key: str, make):
        """make(directory) once per process, in a directory of its own (the kmodguard RPMs)."""
        with self.lock:
            if key not in self.made:
                where = self._dir() / key
                where.mkdir()
                self.made[key] = make(where)
            return self.made[key]

    def index(self, build: Build, full: bool) -> Path:
        with self.lock:
            key = ("index", full)
            if key not in self.made:
                self.made[key] = make_index(build, full, self._dir() / ("index-full" if full else "index-trim"))
            return self.made[key]


SESSION = Session()


def make_initrd(build: Build, work: Path, kver: str) -> Path:
    """busybox, the modules that mount 9p, overlay and the ext4 disk (in modprobe's order, from
    kernel KVER's own tree: artifacts.Build.initrd_modules), guest/init.sh as /init, guest/stage2.sh
    and guest/kmg-e2e.service, as a newc cpio. /e2e.env tells the guest where the project is: the
    checkout's own path, shell-quoted (it may hold spaces, lie under /tmp or in a 0700 home).
    Nothing of it goes on the kernel command line."""
    root = work / "root"
    for d in ("bin", "dev", "proc", "sys", "modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    src = build.initrd_modules(kver)
    names = (src / "modules.list").read_text().split()
    for name in names:
        shutil.copyfile(src / name, root / "modules" / name)
    (root / "modules.list").write_text("".join(f"{n}\n" for n in names))
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, root / "bin" / "busybox")
    for name, dest in (("init.sh", "init"), ("stage2.sh", "stage2.sh"), ("kmg-e2e.service", "kmg-e2e.service")):
        shutil.copyfile(GUEST / name, root / dest)
        (root / dest).chmod(0o644 if dest.endswith(".service") else 0o755)
    (root / "e2e.env").write_text(f"KMG_PROJECT={shlex.quote(str(REPO))}\n"
                                  f"KMG_PYTHON={shlex.quote(str(VENV_PYTHON))}\n")
    try:  # the kernel opens /dev/console for /init before anything is mounted
        os.mknod(root / "dev" / "console", 0o20600, os.makedev(5, 1))
    except OSError:
        pass  # not root: init.sh reopens the console after mounting devtmpfs
    entries = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    out = work / "initrd.img"
    with open(out, "wb") as f:
        proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root, stdout=f,
                              input="\n".join(entries).encode(), stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
    return out


def make_index(build: Build, full: bool, dest: Path) -> Path:
    """kmodguard's index of the packages the guest does not have, built on the host with the
    current kmodguard. --from-dir, because the provide is not the kernel release (see artifacts.py);
    kernel-modules' %posttrans runs dracut (--rebuilds-initramfs), kernel-modules-extra's does not."""
    version = build.rpm_uname.rpartition(".")[0]  # 6.1.0-56: the RPM's VERSION-RELEASE
    env = {"KMODGUARD_INDEX_DIR": str(dest), "KMODGUARD_STATE_DIR": str(dest.parent / "state")}
    packages = (("kernel-modules", "kernel-modules-full" if full else "kernel-modules-trim", True),
                ("kernel-modules-extra", "kernel-modules-extra", False))
    for name, payload, rebuilds in packages:
        cmd = [kmodguard_python(), "-m", "kmodguard", "index", "build", "--json", "--kver", build.kver,
               "--package", name, "--version", version, "--request", build.request(name),
               "--from-dir", build.payload(payload)]
        if rebuilds:
            cmd.append("--rebuilds-initramfs")
        _run(cmd, env=env)
    return dest


# --- QEMU ----------------------------------------------------------------------------------------

_LIVE: set[VM] = set()


def _kill_all() -> None:
    for vm in list(_LIVE):
        vm.kill()


atexit.register(_kill_all)


class QMP:
    """QEMU's machine protocol over a unix socket: JSON lines; events are skipped."""

    def __init__(self, path: Path, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise HarnessError(f"cannot connect to QMP at {path}") from None
                time.sleep(0.1)
        self.f = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.f.readline()
        if not line:
            raise HarnessError("QMP closed the connection")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise HarnessError(f"QMP {command} {arguments}: {reply['error'].get('desc', reply['error'])}")

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def qemu_option(value: str) -> str:
    """A value inside one QEMU -device/-virtfs option string: ',' is the separator, ',,' a comma."""
    return value.replace(",", ",,")


class VM:
    def __init__(self, build: Build, initrd: Path, repo: Path, out: Path, qmp_path: Path, devices: list[Device],
                 memory: int, vmlinuz: Path | None = None, kernel_args: tuple[str, ...] = (),
                 disk: Path | None = None, serial_name: str = "serial.log"):
        self.build, self.initrd, self.repo, self.out, self.qmp_path = build, initrd, repo, out, qmp_path
        self.devices, self.memory = devices, memory
        self.vmlinuz = vmlinuz or build.vmlinuz
        self.kernel_args, self.disk, self.serial_name = kernel_args, disk, serial_name
        self.proc: subprocess.Popen | None = None
        self.marks: list[tuple[float, str, dict]] = []
        self.cond = threading.Condition()
        self.t0 = 0.0
        self.reader: threading.Thread | None = None

    def command(self) -> list[str]:
        kernel_args = ["console=ttyS0", "quiet", "panic=-1", "loglevel=4", *self.kernel_args]
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-m", str(self.memory), "-smp", "1",
               "-kernel", str(self.vmlinuz), "-initrd", str(self.initrd), "-append", " ".join(kernel_args),
               "-display", "none", "-vga", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
               "-net", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        # the project has a share of its own: the guest mounts it at its own path, which the host's
        # root may not show (a checkout under /tmp: the guest mounts a tmpfs there)
        for tag, path, ro in (("hostroot", "/", True), ("layer", self.build.layer, True), ("repo", self.repo, True),
                              ("project", REPO, True), ("out", self.out, False)):
            opts = f"local,path={qemu_option(str(path))},mount_tag={tag},security_model=none"
            opts += ",readonly=on" if ro else ""
            opts += ",multidevs=remap" if tag == "hostroot" else ""
            cmd += ["-virtfs", opts]
        if self.disk is not None:  # the systemd guest's persistent upper layer (/dev/vda)
            cmd += ["-drive", f"file={qemu_option(str(self.disk))},format=raw,if=virtio,cache=unsafe"]
        for d in self.devices:
            # one root port per device (QEMU 7.2 q35 hot-plugs through ACPI per port); pref32-reserve:
            # devices with a big prefetchable BAR (bochs-display) get no space without it
            cmd += ["-device", (f"pcie-root-port,id={d.port_id},bus=pcie.0,addr=0x{PORT_BASE + d.index:x},"
                                f"chassis={d.index + 1},slot={d.index + 1},pref32-reserve=32M")]
            if d.how == "coldplug":
                cmd += ["-device", f"{d.qemu},id={d.id},bus={d.port_id}"]
        return cmd

    def start(self) -> None:
        cmd = self.command()
        with open(self.out / "qemu-command.txt", "a") as f:
            f.write(" ".join(cmd) + "\n")
        setpriv = shutil.which("setpriv")
        if setpriv:  # QEMU dies with us, even when we are killed with SIGKILL
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        self.t0 = time.monotonic()
        # audio devices (intel-hda's codecs, ES1370, AC97) get QEMU's silent backend
        env = {**os.environ, "QEMU_AUDIO_DRV": "none"}
        with open(self.out / "qemu-stderr.txt", "wb") as stderr:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                                         env=env, start_new_session=True)
        _LIVE.add(self)
        self.reader = threading.Thread(target=self._read_serial, daemon=True)
        self.reader.start()

    def _read_serial(self) -> None:
        assert self.proc and self.proc.stdout
        with open(self.out / self.serial_name, "w", encoding="utf-8", errors="replace") as log_file:
            for raw in self.proc.stdout:
                t = time.monotonic() - self.t0
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                log_file.write(f"[{t:8.3f}] {line}\n")
                log_file.flush()
                pos = line.find("KMG-E2E ")
                if pos >= 0:
                    tag, _, rest = line[pos + 8:].partition(" ")
                    try:
                        info = json.loads(rest) if rest.strip() else {}
                    except ValueError:
                        info = {"text": rest}
                    with self.cond:
                        self.marks.append((t, tag, info))
                        self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def mark(self, tag: str) -> tuple[float, dict] | None:
        for t, name, info in self.marks:
            if name == tag:
                return t, info
        return None

    def wait_for(self, tag: str, deadline: float, what: str) -> tuple[float, dict]:
        """Wait for a serial mark; fail early on the agent's ERROR or on QEMU's exit."""
        with self.cond:
            while True:
                found = self.mark(tag)
                if found:
                    return found
                err = self.mark("ERROR")
                if err:  # let the agent save its logs (it marks EXIT when done) before QEMU is killed
                    grace = time.monotonic() + 60
                    while not self.mark("EXIT") and self.proc and self.proc.poll() is None \
                            and time.monotonic() < grace:
                        self.cond.wait(1.0)
                    raise HarnessError(f"the guest agent failed: {err[1].get('error')} (agent-error.txt)")
                if self.proc and self.proc.poll() is not None and not (self.reader and self.reader.is_alive()):
                    raise HarnessError(f"QEMU exited (status {self.proc.returncode}) before {what}; "
                                       f"see serial.log and qemu-stderr.txt")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ScenarioTimeout(f"timed out waiting for {what}")
                self.cond.wait(min(left, 1.0))

    def wait_exit(self, timeout: float) -> None:
        try:
            assert self.proc
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.reader is not None:
            self.reader.join(5)
        _LIVE.discard(self)


# --- a run ---------------------------------------------------------------------------------------

@dataclass
class Run:
    doc: dict  # what `run --json` prints
    result: dict  # the guest agent's full result.json
    results_dir: Path | None  # kept (failure, or keep=True), else None
    marks: list


def clock_offset(marks: list) -> float | None:
    """Host clock (seconds since QEMU started) minus guest clock (unix time): every mark carries the
    guest's time when it was written ("unix") and the host stamps it when it reads it, so each gives
    the offset plus that mark's delay; the smallest is the closest."""
    found = [t - info["unix"] for t, _, info in marks if isinstance(info.get("unix"), (int, float))]
    return min(found) if found else None


def _daemon_doc(result: dict) -> dict:
    """What the daemon did, in short: its exit, decisions, fixes and the signals it sent."""
    d = result.get("daemon") or {}
    signals = [s for s in (result.get("bus") or {}).get("signals", []) if s.get("interface") == "org.kmodguard.Daemon1"]
    return {
        "exit_code": d.get("exit_code"),
        "snapshot_removed": d.get("snapshot_removed"),
        "bus": d.get("bus"),
        "settle": d.get("settle"),
        "decisions": d.get("decisions"),
        "fixes": [{k: f.get(k) for k in ("requested_by", "devices", "exit_code", "outcomes")} for f in d.get("fixes", [])],
        "errors": [e.get("message") for e in (d.get("log") or {}).get("errors", [])],
        # [member, first two arguments]: DeviceNeedsDriver/DeviceResolved start with the device id,
        # FixProgress/RemediationFinished with the request id (and the message or the exit code)
        "signals": [[s["member"], *s["args"][:2]] for s in signals if s["member"] != "PropertiesChanged"],
    }


def _document(scn: Scenario, devices: list[Device], result: dict, wall: float, marks: list, results: Path | None,
              build: Build, hotplug_at: dict) -> dict:
    by_id = {d["qemu_id"]: d for d in result["devices"]}
    offset = clock_offset(marks)
    out = []
    for d in devices:
        r = by_id.get(d.id, {})
        timings = dict(r.get("timings", {}))
        clock = r.get("clock") or {}
        if d.id in hotplug_at:
            # device_add_at_s: when QMP's device_add returned (host clock, seconds since QEMU started);
            # the guest's times on the host's clock through the marks' offset
            timings["device_add_at_s"] = hotplug_at[d.id]
            for key, name in (("uevent", "device_add_to_event_s"), ("verdict", "device_add_to_verdict_s")):
                if offset is not None and clock.get(key) is not None:
                    timings[name] = round(clock[key] + offset - hotplug_at[d.id], 3)
        out.append({
            "device": d.qemu,
            "how": d.how,
            "passthrough": d.passthrough,
            "address": r.get("address"),
            "verdict": r.get("verdict"),
            "installed": r.get("installed", []),
            "driver": r.get("driver"),
            "module": r.get("module"),
            "driver_override": r.get("driver_override"),
            "initramfs_rebuilt_by": r.get("initramfs_rebuilt_by"),
            "initramfs_has_module": r.get("initramfs_has_module", False),
            "candidates": [{k: c.get(k) for k in ("module", "package", "version", "request")}
                           for c in ((r.get("status") or {}).get("candidates") or [])],
            "decision": (r.get("verdict_event") or {}).get("decision"),
            "fix": r.get("fix"),
            "timings": timings,
        })
    phases = {tag.lower() + "_s": round(t, 3) for t, tag, _ in marks
              if tag in ("INIT", "STAGE2", "READY", "SETTLED", "DONE")}
    return {
        "scenario": scn.name,
        "kernel": build.kver,
        "package_set": "full" if scn.full_modules else "trimmed",
        "mode": scn.mode,
        "initramfs_policy": scn.initramfs,
        "devices": out,
        "transactions": result["transactions"],
        "rpm_transactions": result["rpm_transactions"],
        "packages_installed": result["packages_installed"],
        "initramfs": {k: result["initramfs"][k] for k in ("rebuilds", "changed", "drop_in")},
        "daemon": _daemon_doc(result),
        "phases": phases,
        "wall_s": round(wall, 1),
        "results": str(results) if results else None,
    }


def run_scenario(scn: Scenario, keep: bool = False, results_root: Path | None = None) -> Run:
    """Boot, plug, let kmodguard act, collect. Raises HarnessError (ScenarioTimeout) when the run
    cannot finish; the results directory is then kept and named in the message. With keep=True
    it is kept in any case (Run.results_dir), else removed after a complete run."""
    t0 = time.monotonic()
    preflight()
    build = ensure_build()
    devices = scn.devices()
    if not devices:
        raise HarnessError("no device to plug: give --hotplug, --coldplug or --passthrough")
    for d in devices:
        if any(c in d.qemu for c in ",= \n"):
            raise HarnessError(f"{d.qemu!r} is a QEMU device name, not an option string")
    out = Path(tempfile.mkdtemp(prefix=f"kmodguard-e2e-{scn.name}-", dir=results_root))
    out.chmod(0o755)
    qmp_dir = Path(tempfile.mkdtemp(prefix="kmg-qmp-", dir="/tmp"))  # unix socket paths: < 108 bytes
    vm = None
    ok: bool | None = False
    try:
        shutil.copytree(SESSION.index(build, scn.full_modules), out / "index", symlinks=True)
        (out / "scenario.json").write_text(json.dumps({
            "name": scn.name,
            "kver": build.kver,
            "mode": scn.mode,
            "initramfs": scn.initramfs,
            "devices": [{"qemu": d.qemu, "id": d.id, "how": d.how, "port": d.port, "passthrough": d.passthrough}
                        for d in devices],
            "udev_rules": scn.udev_rules(),
            "kmodguard_toml": scn.kmodguard_toml(),
            "dbus_policy": str(BUS_POLICY),
            "timeout": scn.timeout,
            "scriptlet_log": SCRIPTLET_LOG,
            "initramfs_image": build.manifest["initial_initramfs"]["path"],
            "initial_initramfs_modules": build.manifest["initial_initramfs"]["modules"],
        }, indent=1) + "\n")
        vm = VM(build, SESSION.initrd(build), build.repo(scn.full_modules), out, qmp_dir / "qmp", devices, scn.memory)
        deadline = t0 + scn.timeout
        vm.start()
        qmp = QMP(qmp_dir / "qmp")
        try:
            vm.wait_for("STAGE2", min(deadline, time.monotonic() + BOOT_TIMEOUT), "the guest to boot")
            vm.wait_for("READY", deadline, "the guest to get ready (udevd, the bus, kmodguard daemon's start-up scan)")
            hotplug_at = {}
            for d in devices:
                if d.how == "hotplug":  # back to back, as fast as QMP answers
                    qmp.execute("device_add", driver=d.qemu, id=d.id, bus=d.port_id)
                    hotplug_at[d.id] = round(time.monotonic() - vm.t0, 3)
            vm.wait_for("DONE", deadline, "kmodguard daemon to finish with the devices in the guest")
        finally:
            qmp.close()
        vm.wait_exit(60)
        result = json.loads((out / "result.json").read_text())
        ok = True
        doc = _document(scn, devices, result, time.monotonic() - t0, vm.marks, out if keep else None, build, hotplug_at)
        return Run(doc, result, out if keep else None, vm.marks)
    except HarnessError as exc:
        ok = None  # reported in the exception
        err = type(exc)(f"{exc}\nresults kept in {out} (serial.log, daemon.log, bus-monitor.log, snapshots.log, "
                        "kmodguard.log, dmesg.txt, dnf.log)")
        err.results_dir = out
        raise err from None
    finally:
        if vm is not None:
            vm.kill()
        shutil.rmtree(qmp_dir, ignore_errors=True)
        if ok and not keep:
            shutil.rmtree(out, ignore_errors=True)
        elif ok is False:  # interrupted (a signal, an unexpected error)
            log(f"results kept in {out}")
