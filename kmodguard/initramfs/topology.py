"""Which devices the system needs before the real root is mounted: the block stack under /, /usr and
the resume device (md, LVM, dm, multipath, NVMe multipath, btrfs), and a network root's NIC."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple

from ..paths import Paths

log = logging.getLogger("kmodguard.initramfs")


# File systems whose root comes over the network (a NIC is then needed in the initramfs).
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs",
                        "9p.tcp", "ocfs2"})
# root= values dracut serves from the network (modules.d/95nfs, 95iscsi, 95nbd, 95cifs, 40network).
NETWORK_ROOT_PREFIXES = ("nfs:", "nfs4:", "/dev/nfs", "cifs:", "iscsi:", "nbd:", "dhcp", "dhcp6", "nfs", "nfs4")
HV_NETVSC_CLASS = "f8615163-df3e-46c5-913f-f2d2f965ed0e"
VIRTIO_ID_NET = 1


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
