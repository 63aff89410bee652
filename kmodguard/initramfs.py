"""The initramfs: is a device needed before the real root is mounted, and regenerate it safely.

A driver belongs in the initramfs only when its device backs /, /usr or the resume device
(directly or through md / LVM / dm / multipath / NVMe-multipath stacks), or carries a network
root. Then the driver is persisted in a dracut.conf.d drop-in (so future kernels keep it) and the
image is rebuilt: dracut writes a temporary file next to the image, lsinitrd proves every required
module is inside, and only then is the temporary file renamed over the image. On any failure
(dracut exit status, timeout, a module missing from the result, a kill) the previous image is left
byte for byte as it was.

Unified kernel images and ostree/bootc deployments carry an initramfs kmodguard cannot regenerate:
they are reported (unsupported) and never touched.

Everything is read through Paths (sysfs, proc, boot_dir, dracut_conf_dir, root) so that a fake
system tree can stand in for the real one. dracut and lsinitrd get argument lists, never a shell.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from . import process
from .errors import InvalidInput, KmodguardError
from .fsutil import copy_atomic, fsync_dir, make_dir, write_atomic
from .paths import Paths

log = logging.getLogger(__name__)

DROP_IN = "90-kmodguard.conf"
DEFAULT_DRACUT_CONF_DIR = Path("/etc/dracut.conf.d")

# File systems whose root comes over the network (a NIC is then needed in the initramfs).
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs",
                        "9p.tcp", "ocfs2"})
# root= values dracut serves from the network (modules.d/95nfs, 95iscsi, 95nbd, 95cifs, 40network).
NETWORK_ROOT_PREFIXES = ("nfs:", "nfs4:", "/dev/nfs", "cifs:", "iscsi:", "nbd:", "dhcp", "dhcp6", "nfs", "nfs4")
HV_NETVSC_CLASS = "f8615163-df3e-46c5-913f-f2d2f965ed0e"
VIRTIO_ID_NET = 1
MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MODULE_FILE = re.compile(r"/lib/modules/[^/]+/.*?([^/\s]+)\.ko(?:\.(?:xz|zst|gz|bz2|lz4))?$")


class InitramfsDecision(NamedTuple):
    """Whether a fix rebuilds the initramfs, who does (the package's scriptlet or kmodguard), why."""

    rebuild: bool
    by: str | None  # "package" | "kmodguard" | None
    reason: str
    drivers: tuple[str, ...] = ()

    def as_json(self) -> dict:
        return {"rebuild": self.rebuild, "by": self.by, "reason": self.reason, "drivers": list(self.drivers)}


class InitramfsFailed(KmodguardError):
    """The initramfs could not be regenerated or verified; the previous image is unchanged."""

    name = "Failed"


def _norm(module: str) -> str:
    """Module names treat '-' and '_' alike (kmod does)."""
    return module.replace("-", "_")


# --- is a device needed before the real root is mounted? -------------------------------------


class _Mount(NamedTuple):
    mountpoint: str
    majmin: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts(paths: Paths) -> dict[str, _Mount]:
    """The mounts of / and /usr from PROC/self/mountinfo (the last one of each wins: overmounts)."""
    found: dict[str, _Mount] = {}
    try:
        text = (paths.proc / "self" / "mountinfo").read_text(errors="surrogateescape")
    except OSError as exc:
        log.debug("cannot read mountinfo: %s", exc)
        return found
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        mountpoint = _unescape(fields[4])
        if mountpoint in ("/", "/usr") and len(fields) > sep + 2:
            found[mountpoint] = _Mount(mountpoint, fields[2], fields[sep + 1], _unescape(fields[sep + 2]))
    return found


def _cmdline(paths: Paths) -> dict[str, str]:
    """key=value words of PROC/cmdline (the last one wins, as for the kernel); words after '--' are init's."""
    try:
        words = (paths.proc / "cmdline").read_text(errors="surrogateescape").split()
    except OSError:
        return {}
    params: dict[str, str] = {}
    for word in words:
        if word == "--":
            break
        key, eq, value = word.partition("=")
        params[key] = value if eq else ""
    return params


def _sysfs_path(syspath: str, paths: Paths) -> Path:
    """A device path as given by pyudev (/sys/devices/...), as a devpath (/devices/...) or under PATHS.sysfs."""
    sysfs = str(paths.sysfs).rstrip("/") or "/"
    if syspath == sysfs or syspath.startswith(sysfs + "/"):
        return Path(syspath)
    if syspath.startswith("/sys/"):
        return paths.sysfs / syspath[len("/sys/"):]
    return paths.sysfs / syspath.lstrip("/")


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="surrogateescape").strip()
    except OSError:
        return None


def _majmin(spec: str) -> str | None:
    """'8:2' or the kernel's legacy hexadecimal '802' (name_to_dev_t) as 'MAJ:MIN'."""
    m = re.fullmatch(r"(\d+):(\d+)", spec)
    if m:
        return f"{int(m.group(1))}:{int(m.group(2))}"
    if re.fullmatch(r"[0-9a-fA-F]{3,8}", spec):
        value = int(spec, 16)
        return f"{(value >> 8) & 0xFFF}:{(value & 0xFF) | ((value >> 12) & 0xFFF00)}"
    return None


def _block_by_majmin(majmin: str, paths: Paths) -> str | None:
    link = paths.sysfs / "dev" / "block" / majmin
    return _real(link) if os.path.lexists(link) else None


def _block_by_name(name: str, paths: Paths) -> str | None:
    for link in (paths.sysfs / "class" / "block" / name, paths.sysfs / "block" / name):
        if os.path.lexists(link):
            return _real(link)
    return None


def _block_by_dm_name(name: str, paths: Paths) -> str | None:
    try:
        entries = sorted(os.listdir(paths.sysfs / "class" / "block"))
    except OSError:
        return None
    for entry in entries:
        if entry.startswith("dm-") and _read(paths.sysfs / "class" / "block" / entry / "dm" / "name") == name:
            return _block_by_name(entry, paths)
    return None


_TAGS = {"UUID": "by-uuid", "PARTUUID": "by-partuuid", "LABEL": "by-label", "PARTLABEL": "by-partlabel"}


def _block_by_spec(spec: str, paths: Paths) -> str | None:
    """The sysfs block device for a root=/resume= style name: MAJ:MIN, UUID=, LABEL=, /dev/... ."""
    spec = spec.strip()
    if not spec:
        return None
    majmin = _majmin(spec)
    if majmin:
        return _block_by_majmin(majmin, paths) if majmin != "0:0" else None
    tag, eq, value = spec.partition("=")
    if eq and tag.upper() in _TAGS:
        spec = f"/dev/disk/{_TAGS[tag.upper()]}/{value.strip(chr(34))}"
    if not spec.startswith("/dev/"):
        return None
    if spec.startswith("/dev/mapper/"):
        found = _block_by_dm_name(spec[len("/dev/mapper/"):], paths)
        if found:
            return found
    # /dev lives under the system root; udev's links there are relative (../../sda2).
    node = paths.root / spec.lstrip("/")
    if os.path.lexists(node):
        try:
            st = os.stat(node)
            if st.st_rdev and (st.st_mode & 0o170000) == 0o060000:
                found = _block_by_majmin(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", paths)
                if found:
                    return found
        except OSError:
            pass
        return _block_by_name(os.path.basename(_real(node)), paths)
    return _block_by_name(spec[len("/dev/"):].replace("/", "!"), paths) or _block_by_name(os.path.basename(spec), paths)


def _name(block: str, paths: Paths) -> str:
    name = os.path.basename(block)
    dm_name = _read(Path(block) / "dm" / "name")
    return f"{name} ({dm_name})" if dm_name else name


def _under(syspath: str, marker: str) -> bool:
    return marker in syspath.split("/")


def _members(block: str, paths: Paths) -> list[str]:
    """What a block device is built from: slaves/ (md, dm, multipath) of it or of its whole disk, or
    the controllers of an NVMe multipath head. (Multi-device btrfs is handled by _btrfs_devices.)"""
    path = Path(block)
    disk = path.parent if (path / "partition").exists() else path
    members = []
    try:
        for entry in sorted(os.listdir(disk / "slaves")):
            members.append(_real(disk / "slaves" / entry))
    except OSError:
        pass
    if not members and _under(block, "nvme-subsystem"):
        # A native NVMe multipath head (/sys/devices/virtual/nvme-subsystem/nvme-subsysN/nvmeXnY):
        # its paths are the controllers the subsystem links to (under their PCI devices).
        subsys = disk.parent
        try:
            for entry in sorted(os.listdir(subsys)):
                if re.fullmatch(r"nvme\d+", entry) and os.path.islink(subsys / entry):
                    members.append(_real(subsys / entry))
        except OSError:
            pass
    return members


def _leaves(block: str, paths: Paths, chain: tuple[str, ...] = (), depth: int = 0) -> Iterator[tuple[tuple[str, ...], str]]:
    """(chain of names from the top, leaf real path) for every bottom device of a stack."""
    chain = chain + (_name(block, paths),)
    members = _members(block, paths) if depth < 16 else []
    if not members:
        yield chain, block
        return
    for member in members:
        if os.path.basename(member) in (c.split(" ")[0] for c in chain):
            continue  # a loop in a broken tree
        yield from _leaves(member, paths, chain, depth + 1)


def _btrfs_devices(block: str, paths: Paths) -> list[str]:
    """Every member of the multi-device btrfs that block belongs to (just block when none)."""
    root = paths.sysfs / "fs" / "btrfs"
    try:
        fsids = sorted(os.listdir(root))
    except OSError:
        return [block]
    for fsid in fsids:
        devices = root / fsid / "devices"
        try:
            members = [_real(devices / e) for e in sorted(os.listdir(devices))]
        except OSError:
            continue
        if block in members:
            return members
    return [block]


class _Role(NamedTuple):
    what: str  # "/", "/usr", "the resume device"
    tops: tuple[str, ...]  # sysfs block devices
    network: str | None  # why this role is served over the network


def _roles(paths: Paths) -> list[_Role]:
    params = _cmdline(paths)
    mounts = _mounts(paths)
    roles = []
    for where in ("/", "/usr"):
        mount = mounts.get(where)
        if mount is None:
            continue
        if mount.fstype in NETWORK_FS:
            roles.append(_Role(where, (), f"{where} is {mount.fstype} from {mount.source}"))
            continue
        top = _block_by_majmin(mount.majmin, paths) if not mount.majmin.startswith("0:") else None
        if top is None and mount.source.startswith("/dev/"):
            top = _block_by_spec(mount.source, paths)  # btrfs and others report an anonymous 0:N
        if top is None:
            continue
        tops = tuple(_btrfs_devices(top, paths)) if mount.fstype == "btrfs" else (top,)
        roles.append(_Role(where, tops, None))
    resume = _read(paths.sysfs / "power" / "resume")
    top = _block_by_spec(resume, paths) if resume and resume != "0:0" else None
    if top is None and params.get("resume"):
        top = _block_by_spec(params["resume"], paths)
    if top is not None:
        roles.append(_Role("the resume device", (top,), None))
    root = params.get("root", "")
    if "netroot" in params or root.startswith(NETWORK_ROOT_PREFIXES) or "rd.iscsi.firmware" in params \
            or "rd.iscsi.ibft" in params:
        what = f"netroot={params['netroot']}" if "netroot" in params else (f"root={root}" if root else "iSCSI firmware")
        roles.append(_Role("/", (), f"the root comes over the network ({what})"))
    return roles


def _network_leaf(leaf: str) -> str | None:
    parts = leaf.split("/")
    if any(re.fullmatch(r"session\d+", p) for p in parts):
        return "an iSCSI session"
    if "nvme-fabrics" in parts:
        return "NVMe over fabrics"
    if re.fullmatch(r"nbd\d+", os.path.basename(leaf)):
        return "a network block device"
    return None


def _is_network_controller(device: Path) -> bool:
    subsystem = os.path.basename(_real(device / "subsystem")) if os.path.lexists(device / "subsystem") else ""
    pci_class = _read(device / "class")
    if pci_class and subsystem in ("pci", ""):
        try:
            if (int(pci_class, 16) >> 16) == 0x02:
                return True
        except ValueError:
            pass
    if subsystem == "virtio":
        try:
            return int(_read(device / "device") or "-1", 16) == VIRTIO_ID_NET
        except ValueError:
            return False
    if subsystem == "vmbus":
        return (_read(device / "class_id") or "").strip("{}").lower() == HV_NETVSC_CLASS
    if subsystem == "xen":
        return (_read(device / "devtype") or "") == "vif"
    return False


def boot_critical(device_syspath: str, paths: Paths) -> str | None:
    """Why the device is needed before the real root is mounted, or None.

    The device is needed when it is an ancestor of (or is) a bottom device of the block stack under
    /, /usr or the resume device (through md, LVM/dm, multipath, NVMe multipath, multi-device btrfs),
    or when it is a network controller and the root comes over the network (root=nfs..., netroot=,
    iSCSI, NVMe-oF, nbd in the stack).
    """
    device = _sysfs_path(device_syspath, paths)
    real = _real(device)
    network_reasons = []
    for role in _roles(paths):
        if role.network:
            network_reasons.append(role.network)
            continue
        for top in role.tops:
            for chain, leaf in _leaves(top, paths):
                if leaf == real or leaf.startswith(real.rstrip("/") + "/"):
                    if len(chain) == 1:
                        return f"backs {role.what} ({chain[0]})"
                    return f"backs {role.what} through {' -> '.join(chain)}"
                why = _network_leaf(leaf)
                if why:
                    network_reasons.append(f"{role.what} is on {why} ({' -> '.join(chain)})")
    if network_reasons and _is_network_controller(device):
        return f"a network controller, and {network_reasons[0]}"
    return None


# --- what to do -------------------------------------------------------------------------------


def decide(modules: list[str], critical: dict[str, str], policy: str = "auto", rebuilt_by_package: bool = False,
           env: str | None = None):
    """Whether the initramfs must be rebuilt for these modules, and by whom.

    modules: the modules the plan loads; critical: {module: why it is needed at boot}
    (boot_critical); policy: the configuration's initramfs = auto | always | never;
    rebuilt_by_package: a package of the transaction runs dracut itself (Fedora's kernel-modules
    %posttrans); env: why this system's initramfs cannot be regenerated here (unsupported()), or None.
    Returns an InitramfsDecision (rebuild, by, reason, drivers).
    """

    if policy not in ("auto", "always", "never"):
        raise InvalidInput(f"initramfs must be one of auto, always, never, not {policy!r}")
    needed = [m for m in modules if m in critical]
    drivers = tuple(modules) if policy == "always" else tuple(needed)
    why = "; ".join(f"{m}: {critical[m]}" for m in needed)
    if policy == "never":
        reason = "initramfs = never in the configuration"
        return InitramfsDecision(False, None, reason + (f" (needed at boot: {why})" if needed else ""), ())
    if not drivers:
        return InitramfsDecision(False, None, "no device in the plan is needed before the real root is mounted", ())
    if policy == "always" and not needed:
        why = "initramfs = always in the configuration"
    if env:
        return InitramfsDecision(False, None, f"{why}; but {env}", drivers)
    if rebuilt_by_package:
        return InitramfsDecision(True, "package", f"{why}; the package's own scriptlet runs dracut, "
                                 "kmodguard persists the drivers and verifies the image", drivers)
    return InitramfsDecision(True, "kmodguard", why, drivers)


def image_path(kver: str, paths: Paths) -> Path:
    """The initramfs of kver: BOOT/initramfs-KVER.img (Fedora, RHEL), or an existing initrd-KVER (SUSE)
    or initrd.img-KVER (Debian, Ubuntu)."""
    default = paths.boot_dir / f"initramfs-{kver}.img"
    if not default.exists():
        for name in (f"initrd-{kver}", f"initrd.img-{kver}"):
            if (paths.boot_dir / name).is_file():
                return paths.boot_dir / name
    return default


def _install_layout(paths: Paths) -> str | None:
    layout = None
    for conf in (paths.root / "usr/lib/kernel/install.conf", paths.root / "etc/kernel/install.conf"):
        text = _read(conf)
        for line in (text or "").splitlines():
            key, eq, value = line.strip().partition("=")
            if eq and key.strip() == "layout":
                layout = value.strip().strip("\"'")
    return layout


def _esp_dirs(paths: Paths) -> list[Path]:
    boot = paths.boot_dir
    return [boot / "efi" / "EFI" / "Linux", boot / "EFI" / "Linux", boot.parent / "efi" / "EFI" / "Linux"]


def _uki_for(kver: str, paths: Paths) -> Path | None:
    """A unified kernel image of kver on the ESP or XBOOTLDR: [TOKEN-]KVER[+TRIES[-DONE]].efi."""
    pattern = re.compile(r"(?:.*-)?" + re.escape(kver) + r"(?:\+\d+(?:-\d+)?)?\.efi", re.IGNORECASE)
    for d in _esp_dirs(paths):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if pattern.fullmatch(name):
                return d / name
    return None


def unsupported(paths: Paths) -> str | None:
    """Why this system's initramfs for paths.kver cannot be regenerated here (reported, never touched)."""
    if (paths.root / "run" / "ostree-booted").exists():
        return ("an image-mode system (ostree/bootc): the initramfs is part of the deployment; "
                "enable client-side regeneration with 'rpm-ostree initramfs --enable' or rebuild the image")
    if _install_layout(paths) == "uki":
        return ("kernel-install uses layout=uki (/etc/kernel/install.conf): the initramfs is inside a "
                "signed unified kernel image that dracut here does not replace")
    uki = _uki_for(paths.kver, paths)
    if uki is not None:
        return (f"kernel {paths.kver} boots from a unified kernel image ({uki}): its initramfs is built in and "
                "signed; kmodguard does not regenerate it")
    if (paths.installed_modules / "vmlinuz-virt.efi").exists() and not image_path(paths.kver, paths).exists():
        return (f"kernel {paths.kver} is a unified kernel image (kernel-uki-virt: "
                f"{paths.installed_modules / 'vmlinuz-virt.efi'}); its initramfs cannot be regenerated here")
    return None


# --- persist ----------------------------------------------------------------------------------


_ADD_DRIVERS = re.compile(r"""^\s*add_drivers\s*\+?=\s*(["'])(.*?)\1\s*(?:#.*)?$""")


def persisted_drivers(paths: Paths) -> list[str]:
    """The drivers in kmodguard's dracut drop-in (sorted), [] when there is none."""
    text = _read(paths.dracut_conf_dir / DROP_IN) or ""
    names: dict[str, str] = {}
    for line in text.splitlines():
        m = _ADD_DRIVERS.match(line)
        if m:
            for name in m.group(2).split():
                if MODULE_NAME.match(name):
                    names.setdefault(_norm(name), name)
    return sorted(names.values())


def persist_drivers(modules: Iterable[str], paths: Paths) -> Path:
    """Merge modules into DRACUT_CONF_DIR/90-kmodguard.conf (add_drivers+=" a b "), atomically.

    Idempotent: the file is rewritten only when its set of drivers changes. dracut sources the file
    with bash, so only plain module names are accepted.
    """
    modules = list(modules)
    for m in modules:
        if not isinstance(m, str) or not MODULE_NAME.match(m):
            raise InvalidInput(f"not a kernel module name: {m!r}")
    path = paths.dracut_conf_dir / DROP_IN
    names = {_norm(n): n for n in persisted_drivers(paths)}
    for m in modules:
        names.setdefault(_norm(m), m)
    drivers = sorted(names.values())
    text = ("# Written by kmodguard: drivers of devices needed before the real root is mounted.\n"
            "# kmodguard merges into this file; dracut keeps these drivers for every new kernel.\n"
            f'add_drivers+=" {" ".join(drivers)} "\n')
    if _read(path) == text.strip():
        return path
    paths.dracut_conf_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())
    log.info("dracut drop-in %s: %s", path, " ".join(drivers))
    return path


# --- snapshot and verification -----------------------------------------------------------------


def snapshot_path(kver: str, paths: Paths) -> Path:
    return paths.state_dir / f"{image_path(kver, paths).name}.before-kmodguard"


def snapshot(kver: str, paths: Paths) -> Path | None:
    """Copy the current image to STATE_DIR/<image>.before-kmodguard (atomically); None when there is no image."""
    image = image_path(kver, paths)
    if not image.is_file():
        return None
    dest = snapshot_path(kver, paths)
    make_dir(paths.state_dir)
    try:
        copy_atomic(image, dest, dest.with_name(f".{dest.name}.tmp"))
    except OSError as exc:
        raise InitramfsFailed(f"cannot keep a copy of {image} in {paths.state_dir}: {exc.strerror or exc}") from None
    return dest


def restore(kver: str, paths: Paths) -> bool:
    """Put the snapshot back over the image (atomically). False when there is no snapshot."""
    snap = snapshot_path(kver, paths)
    if not snap.is_file():
        return False
    image = image_path(kver, paths)
    try:
        copy_atomic(snap, image, image.with_name(f".{image.name}.kmodguard-restore"))
    except OSError as exc:
        raise InitramfsFailed(f"cannot restore {image} from {snap}: {exc.strerror or exc}") from None
    return True


def _builtin(paths: Paths) -> set[str]:
    text = _read(paths.installed_modules / "modules.builtin") or ""
    return {_norm(os.path.basename(line).split(".ko")[0]) for line in text.splitlines() if line.strip()}


def _tool(name: str) -> str:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}", f"/sbin/{name}")
                                       if os.path.exists(p)), name)


def image_modules(image: Path, timeout: float = 120) -> set[str]:
    """The kernel modules inside an initramfs image (normalized names), as lsinitrd lists them."""
    try:
        proc = process.run([_tool("lsinitrd"), str(image)], timeout, "lsinitrd", text=False)
    except KmodguardError as exc:
        raise InitramfsFailed(f"lsinitrd {image}: {exc.message}") from None
    if proc.returncode != 0:
        raise InitramfsFailed(f"lsinitrd {image} failed (exit {proc.returncode})",
                              hint=_tail(proc.stderr or proc.stdout))
    found = set()
    for line in proc.stdout.decode(errors="replace").splitlines():
        line = line.split(" -> ")[0].rstrip()
        m = MODULE_FILE.search(line)
        if m:
            found.add(_norm(m.group(1)))
    return found


def missing_from_image(kver: str, modules: Iterable[str], paths: Paths, timeout: float = 120) -> list[str]:
    """Which of modules the current image lacks (built-in modules never count as missing)."""
    image = image_path(kver, paths)
    wanted = [m for m in modules if _norm(m) not in _builtin(paths)]
    if not wanted:
        return []
    if not image.is_file():
        return list(wanted)
    inside = image_modules(image, timeout)
    return [m for m in wanted if _norm(m) not in inside]


def _tail(data: bytes | str | None, lines: int = 12) -> str | None:
    if not data:
        return None
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return "\n".join(text.strip().splitlines()[-lines:]) or None


# --- rebuild ----------------------------------------------------------------------------------


class _Lock:
    """An exclusive lock on STATE_DIR/initramfs.lock, also held by dracut and its children.

    dracut inherits the locked descriptor: when the process that started it is killed, the lock
    stays held until the orphaned dracut ends, so no new rebuild races it for the temporary file.
    """

    def __init__(self, paths: Paths, timeout: float):
        self.path = paths.state_dir / "initramfs.lock"
        try:
            make_dir(paths.state_dir)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InitramfsFailed(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise InitramfsFailed(f"another initramfs rebuild is still running (lock {self.path})") from None
                time.sleep(0.1)

    def close(self) -> None:
        os.close(self.fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def dracut_command(kver: str, modules: Iterable[str], out: Path, paths: Paths,
                   dracut_args: Iterable[str] = ()) -> list[str]:
    """The dracut argument list rebuild runs (extra dracut_args come last, so they win)."""
    args = [_tool("dracut"), "--kver", kver, "-k", str(paths.installed_modules)]
    if paths.dracut_conf_dir.is_dir():
        args += ["--confdir", str(paths.dracut_conf_dir)]
    modules = [m for m in modules]
    if modules:
        args += ["--add-drivers", " ".join(modules)]
    args += ["--force", *dracut_args, str(out)]
    return args


def rebuild(kver: str, modules: Iterable[str], paths: Paths, timeout: float = 600,
            dracut_args: Iterable[str] = ()) -> None:
    """Regenerate BOOT/initramfs-KVER.img with modules inside, or leave it byte for byte as it was.

    dracut --kver KVER -k MODULES_DIR [--confdir DRACUT_CONF_DIR] --add-drivers "..." --force
    [dracut_args] TMP writes a temporary file next to the image; lsinitrd must list every module
    (built-in ones excepted); then the file is fsynced and renamed over the image. The caller keeps
    a snapshot() from before any package transaction (a package's own scriptlet may rewrite the
    image in place); this function needs none, the rename is atomic. Raises InitramfsFailed on any failure; the temporary file
    is removed, and one left by an earlier killed run is removed first.
    """
    modules = list(modules)
    for m in modules:
        if not isinstance(m, str) or not MODULE_NAME.match(m):
            raise InvalidInput(f"not a kernel module name: {m!r}")
    dracut_args = [str(a) for a in dracut_args]
    paths = paths.with_kver(kver)  # the modules directory of this kernel, unless one is given
    why_not = unsupported(paths)
    if why_not:
        raise InitramfsFailed(f"the initramfs of {kver} is not rebuilt: {why_not}")
    image = image_path(kver, paths)
    if not image.is_file():
        raise InitramfsFailed(f"there is no initramfs at {image} to rebuild",
                              hint="this system may not boot from a dracut initramfs here")
    deadline = time.monotonic() + timeout
    lock = _Lock(paths, timeout)
    tmp = image.with_name(f".{image.name}.kmodguard-new")
    try:
        _unlink(tmp)  # left by an earlier run that was killed
        builtin = _builtin(paths)
        loadable = [m for m in modules if _norm(m) not in builtin]
        cmd = dracut_command(kver, loadable, tmp, paths, dracut_args)
        log.info("rebuilding %s: %s", image, " ".join(cmd))
        try:
            proc = process.run(cmd, max(deadline - time.monotonic(), 0.1), "dracut", merge_stderr=True,
                               pass_fds=(lock.fd,), text=False)
        except process.CommandTimedOut:
            raise InitramfsFailed(f"dracut did not finish within {timeout:g} s; the previous image is unchanged") \
                from None
        except KmodguardError as exc:
            raise InitramfsFailed(exc.message) from None
        output = proc.stdout
        if proc.returncode != 0:
            raise InitramfsFailed(f"dracut failed (exit {proc.returncode}); the previous image is unchanged",
                                  hint=_tail(output))
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise InitramfsFailed("dracut wrote no image; the previous image is unchanged", hint=_tail(output))
        inside = image_modules(tmp, timeout=max(min(deadline - time.monotonic(), 300), 10))
        absent = [m for m in loadable if _norm(m) not in inside]
        if absent:
            raise InitramfsFailed(f"the new initramfs lacks {', '.join(absent)}; the previous image is unchanged",
                                  hint=_tail(output))
        try:
            mode = os.stat(image).st_mode & 0o7777
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, image)
            fsync_dir(image.parent)
        except OSError as exc:
            raise InitramfsFailed(f"cannot replace {image}: {exc.strerror or exc}; the previous image is unchanged") \
                from None
        log.info("rebuilt %s with %s", image, ", ".join(modules) or "no extra drivers")
    finally:
        try:
            _unlink(tmp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot remove %s: %s", tmp, exc)
        lock.close()
