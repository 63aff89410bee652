"""The initramfs: which devices are needed before the real root is mounted, the dracut drop-in, and
a rebuild with the real dracut and lsinitrd that leaves the previous image byte for byte on failure.

boot_critical reads a system tree laid out as the kernel lays out sysfs (block devices under their
controllers, /sys/dev/block and /sys/class/block links, slaves/ links of md and dm, an NVMe
multipath subsystem, an iSCSI session) plus proc's mountinfo and cmdline; one test reads this
machine's real /sys and /proc. Rebuilds run the real dracut on a depmod'ed tree of synthetic
modules (dracut only copies them) and check the result with the real lsinitrd.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import synthetic
REPO = Path(__file__).resolve().parents[2]
from kmodguard import initramfs
from kmodguard.initramfs import InitramfsDecision
from kmodguard.errors import InvalidInput
from kmodguard.initramfs import InitramfsFailed
from kmodguard.paths import Paths

KVER = synthetic.KVER


# --- a system tree as the kernel and udev lay it out --------------------------------------------


class FakeSystem:
    """sysfs, proc and /dev in a plain directory tree; every link is relative, as the kernel makes them."""

    def __init__(self, base: Path):
        self.sys, self.proc, self.root = base / "sys", base / "proc", base / "root"
        for d in (self.sys / "dev" / "block", self.sys / "class" / "block", self.sys / "block", self.sys / "power",
                  self.proc / "self", self.root / "dev"):
            d.mkdir(parents=True, exist_ok=True)
        self.resume("0:0")
        self.cmdline("BOOT_IMAGE=(hd0,gpt2)/vmlinuz ro quiet")
        self.mounts()

    def paths(self, **kw) -> Paths:
        return Paths(kver=KVER, sysfs=self.sys, proc=self.proc, root=self.root, **kw)

    @staticmethod
    def link(link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, link.parent), link)

    def device(self, devpath: str, subsystem: str | None = None, **attrs: str) -> Path:
        d = self.sys / devpath
        d.mkdir(parents=True, exist_ok=True)
        for key, value in attrs.items():
            (d / key).write_text(value + "\n")
        if subsystem:
            bus = self.sys / "bus" / subsystem
            (bus / "devices").mkdir(parents=True, exist_ok=True)
            self.link(d / "subsystem", bus)
            self.link(bus / "devices" / d.name, d)
        return d

    def pci(self, addr: str, pci_class: int) -> Path:
        return self.device(f"devices/pci0000:00/{addr}", "pci", **{"class": f"0x{pci_class:06x}", "vendor": "0x1af4"})

    def block(self, d: Path, majmin: str, *, partition: int | None = None, dm_name: str | None = None) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        (d / "dev").write_text(majmin + "\n")
        (d / "slaves").mkdir(exist_ok=True)
        (d / "holders").mkdir(exist_ok=True)
        self.link(d / "subsystem", self.sys / "class" / "block")
        self.link(self.sys / "dev" / "block" / majmin, d)
        self.link(self.sys / "class" / "block" / d.name, d)
        if partition is None:
            self.link(self.sys / "block" / d.name, d)
        else:
            (d / "partition").write_text(f"{partition}\n")
        if dm_name:
            (d / "dm").mkdir()
            (d / "dm" / "name").write_text(dm_name + "\n")
        return d

    def slaves(self, d: Path, *members: Path) -> None:
        for m in members:
            self.link(d / "slaves" / m.name, m)

    def mounts(self, *entries: tuple[str, str, str, str]) -> None:
        lines = ["22 27 0:21 / /proc rw,relatime shared:12 - proc proc rw",
                 "23 27 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw"]
        for i, (mountpoint, majmin, fstype, source) in enumerate(entries):
            lines.append(f"{40 + i} 1 {majmin} / {mountpoint} rw,relatime shared:{i + 1} - {fstype} {source} rw")
        lines.append("60 27 0:40 / /tmp rw,nosuid,nodev shared:20 - tmpfs tmpfs rw,size=4096k")
        (self.proc / "self" / "mountinfo").write_text("\n".join(lines) + "\n")

    def cmdline(self, text: str) -> None:
        (self.proc / "cmdline").write_text(text + "\n")

    def resume(self, majmin: str) -> None:
        (self.sys / "power" / "resume").write_text(majmin + "\n")


P = "devices/pci0000:00"


@pytest.fixture
def system(tmp_path) -> FakeSystem:
    """A server: root on LVM on md RAID1 over a SATA disk and a SAS disk, /usr-capable multipath over
    an FC HBA, an NVMe namespace behind native NVMe multipath, an iSCSI disk, a NIC, a GPU, and a
    virtio-net and a virtio-blk device."""
    s = FakeSystem(tmp_path / "system")
    s.pci("0000:00:03.0", 0x020000)  # NIC
    s.pci("0000:00:05.0", 0x010601)  # AHCI
    s.pci("0000:00:06.0", 0x010700)  # SAS HBA
    s.pci("0000:00:07.0", 0x030000)  # GPU
    s.pci("0000:00:08.0", 0x0C0400)  # Fibre Channel HBA
    s.pci("0000:00:09.0", 0x010802)  # NVMe
    s.pci("0000:00:0a.0", 0x020000)  # virtio-net transport
    s.pci("0000:00:0b.0", 0x010000)  # virtio-blk transport
    s.device(f"{P}/0000:00:0a.0/virtio0", "virtio", device="0x0001", vendor="0x1af4")
    s.device(f"{P}/0000:00:0b.0/virtio1", "virtio", device="0x0002", vendor="0x1af4")

    sda = s.block(s.sys / P / "0000:00:05.0/ata1/host0/target0:0:0/0:0:0:0/block/sda", "8:0")
    sda1 = s.block(sda / "sda1", "8:1", partition=1)
    sda2 = s.block(sda / "sda2", "8:2", partition=2)
    sdb = s.block(s.sys / P / "0000:00:06.0/host1/port-1:0/end_device-1:0/target1:0:0/1:0:0:0/block/sdb", "8:16")
    sdb1 = s.block(sdb / "sdb1", "8:17", partition=1)
    sdb2 = s.block(sdb / "sdb2", "8:18", partition=2)
    sdc = s.block(s.sys / P / "0000:00:08.0/host2/rport-2:0-0/target2:0:0/2:0:0:0/block/sdc", "8:32")
    sdd = s.block(s.sys / P / "0000:00:08.0/host2/rport-2:0-1/target2:0:1/2:0:1:0/block/sdd", "8:48")
    s.block(s.sys / "devices/platform/host7/session1/target7:0:0/7:0:0:0/block/sde", "8:64")
    s.block(s.sys / P / "0000:00:0b.0/virtio1/block/vda", "252:0")

    md0 = s.block(s.sys / "devices/virtual/block/md0", "9:0")
    s.slaves(md0, sda2, sdb2)
    s.block(md0 / "md0p1", "259:8", partition=1)
    dm0 = s.block(s.sys / "devices/virtual/block/dm-0", "253:0", dm_name="vg-root")
    s.slaves(dm0, md0)
    dm1 = s.block(s.sys / "devices/virtual/block/dm-1", "253:1", dm_name="vg-swap")
    s.slaves(dm1, md0)
    dm2 = s.block(s.sys / "devices/virtual/block/dm-2", "253:2", dm_name="mpatha")
    s.slaves(dm2, sdc, sdd)

    ctrl = s.device(f"{P}/0000:00:09.0/nvme/nvme0", "nvme")
    subsys = s.device("devices/virtual/nvme-subsystem/nvme-subsys0", "nvme-subsystem")
    s.link(subsys / "nvme0", ctrl)
    ns = s.block(subsys / "nvme0n1", "259:0")
    s.block(ns / "nvme0n1p1", "259:1", partition=1)
    s.block(ns / "nvme0n1p2", "259:2", partition=2)

    s.link(s.root / "dev/disk/by-uuid/5d1c7e0a-swap", s.root / "dev/nvme0n1p2")
    s.link(s.root / "dev/mapper/vg-root", s.root / "dev/dm-0")
    return s


def pcidev(addr: str) -> str:
    return f"/sys/devices/pci0000:00/{addr}"  # as pyudev names it on the real system


# --- boot_critical ------------------------------------------------------------------------------


def test_root_on_lvm_on_md_makes_both_disk_controllers_critical_and_nothing_else(system):
    system.mounts(("/", "253:0", "ext4", "/dev/mapper/vg-root"), ("/boot", "8:1", "ext4", "/dev/sda1"))
    paths = system.paths()
    assert initramfs.boot_critical(pcidev("0000:00:05.0"), paths) == "backs / through dm-0 (vg-root) -> md0 -> sda2"
    assert initramfs.boot_critical(pcidev("0000:00:06.0"), paths) == "backs / through dm-0 (vg-root) -> md0 -> sdb2"
    # the same device named as a devpath, under PATHS.sysfs, or through a bus link
    assert initramfs.boot_critical("/devices/pci0000:00/0000:00:06.0", paths) is not None
    assert initramfs.boot_critical(str(system.sys / "bus/pci/devices/0000:00:06.0"), paths) is not None
    for other in ("0000:00:03.0", "0000:00:07.0", "0000:00:08.0", "0000:00:09.0", "0000:00:0a.0"):
        assert initramfs.boot_critical(pcidev(other), paths) is None, other
    assert initramfs.boot_critical("/sys/devices/pci0000:00/0000:00:0a.0/virtio0", paths) is None


def test_usr_on_multipath_and_resume_on_nvme_multipath(system):
    system.mounts(("/", "8:1", "xfs", "/dev/sda1"), ("/usr", "253:2", "xfs", "/dev/mapper/mpatha"))
    system.resume("259:2")
    paths = system.paths()
    assert initramfs.boot_critical(pcidev("0000:00:05.0"), paths) == "backs / (sda1)"
    assert initramfs.boot_critical(pcidev("0000:00:08.0"), paths) == "backs /usr through dm-2 (mpatha) -> sdc"
    assert initramfs.boot_critical(pcidev("0000:00:09.0"), paths) == "backs the resume device through nvme0n1p2 -> nvme0"
    assert initramfs.boot_critical(pcidev("0000:00:06.0"), paths) is None  # md0 is not in use here


@pytest.mark.parametrize("resume, controller", [
    ("UUID=5d1c7e0a-swap", "0000:00:09.0"),  # through /dev/disk/by-uuid
    ("/dev/sdb1", "0000:00:06.0"),
    ("8:32", "0000:00:08.0"),
    ("/dev/mapper/vg-swap", "0000:00:05.0"),  # dm by name, down through md0
    ("/dev/md0p1", "0000:00:06.0"),  # a partition of an md array: the array's slaves
])
def test_resume_from_the_kernel_command_line(system, resume, controller):
    system.mounts(("/", "252:0", "ext4", "/dev/vda"))
    system.cmdline(f"BOOT_IMAGE=/vmlinuz root=/dev/vda ro resume={resume} quiet -- --init-arg resume=8:0")
    paths = system.paths()
    why = initramfs.boot_critical(pcidev(controller), paths)
    assert why is not None and why.startswith("backs the resume device"), why
    assert initramfs.boot_critical(pcidev("0000:00:0b.0"), paths) == "backs / (vda)"
    assert initramfs.boot_critical(pcidev("0000:00:07.0"), paths) is None


def test_no_resume_device_and_a_local_root_leave_the_rest_alone(system):
    system.mounts(("/", "252:0", "ext4", "/dev/vda"))
    paths = system.paths()
    assert initramfs.boot_critical(pcidev("0000:00:0b.0"), paths) == "backs / (vda)"
    assert initramfs.boot_critical("/sys/devices/pci0000:00/0000:00:0b.0/virtio1", paths) == "backs / (vda)"
    for other in ("0000:00:03.0", "0000:00:05.0", "0000:00:06.0", "0000:00:08.0", "0000:00:09.0"):
        assert initramfs.boot_critical(pcidev(other), paths) is None, other


def test_multi_device_btrfs_root_needs_every_member(system):
    system.mounts(("/", "0:33", "btrfs", "/dev/sda1"))  # btrfs reports an anonymous device number
    devices = system.sys / "fs/btrfs/0c9bd2c6-6e4f-4a8a-8e38-6a3a2a1c6f11/devices"
    system.link(devices / "sda1", system.sys / "class/block/sda1")
    system.link(devices / "sdb1", system.sys / "class/block/sdb1")
    paths = system.paths()
    assert initramfs.boot_critical(pcidev("0000:00:05.0"), paths) == "backs / (sda1)"
    assert initramfs.boot_critical(pcidev("0000:00:06.0"), paths) == "backs / (sdb1)"


@pytest.mark.parametrize("mount, cmdline", [
    (("/", "0:45", "nfs4", "10.0.0.1:/export/root"), "root=nfs4:10.0.0.1:/export/root ip=dhcp rw"),
    (("/", "0:45", "nfs", "10.0.0.1:/export/root"), "root=/dev/nfs nfsroot=10.0.0.1:/export/root ip=dhcp"),
    (("/", "8:64", "ext4", "/dev/sde"), "root=UUID=0b3e rd.iscsi.initiator=iqn.2024-01.org.example:client"),
    (("/", "8:64", "ext4", "/dev/sde"), "root=dhcp netroot=iscsi:10.0.0.1::::iqn.2024-01.org.example:root"),
])
def test_a_network_root_makes_network_controllers_critical(system, mount, cmdline):
    system.mounts(mount)
    system.cmdline(cmdline)
    paths = system.paths()
    nic = initramfs.boot_critical(pcidev("0000:00:03.0"), paths)
    assert nic is not None and nic.startswith("a network controller"), nic
    virtio_net = initramfs.boot_critical("/sys/devices/pci0000:00/0000:00:0a.0/virtio0", paths)
    assert virtio_net is not None and "network" in virtio_net
    for other in ("0000:00:05.0", "0000:00:06.0", "0000:00:07.0", "0000:00:09.0"):
        assert initramfs.boot_critical(pcidev(other), paths) is None, other
    assert initramfs.boot_critical("/sys/devices/pci0000:00/0000:00:0b.0/virtio1", paths) is None


def test_this_machines_root_controller_on_the_real_sysfs():
    """The real /sys and /proc: the controller under / (found here through stat, not mountinfo)."""
    st = os.stat("/")
    if os.major(st.st_dev) == 0:
        pytest.skip("/ is not on a block device on this machine (overlay, tmpfs, btrfs)")
    leaf = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    ancestors = [p for p in Path(leaf).parents if (p / "subsystem").exists()
                 and os.path.basename(os.path.realpath(p / "subsystem")) == "pci"]
    if not ancestors:
        pytest.skip(f"the root device {leaf} has no PCI controller")
    paths = Paths()
    why = initramfs.boot_critical(str(ancestors[0]), paths)
    assert why is not None and why.startswith("backs /"), why
    # a PCI device that no block device sits under, and no NIC, is not critical
    blocks = [os.path.realpath(p) for p in Path("/sys/class/block").iterdir()]
    for dev in sorted(Path("/sys/bus/pci/devices").iterdir()):
        real = os.path.realpath(dev)
        if not any(b.startswith(real + "/") for b in blocks) and not (dev / "class").read_text().startswith("0x02"):
            assert initramfs.boot_critical(str(dev), paths) is None, dev
            break
    else:
        pytest.skip("every PCI device here carries a block device or is a NIC")


# --- decide -------------------------------------------------------------------------------------


def test_decide():
    why = "backs / through md0 -> sda2"
    d = initramfs.decide(["kmg_nic", "ahci"], {"ahci": why}, "auto", False, None)
    assert isinstance(d, InitramfsDecision)
    assert (d.rebuild, d.by, d.drivers) == (True, "kmodguard", ("ahci",)) and why in d.reason
    d = initramfs.decide(["ahci"], {"ahci": why}, "auto", True, None)
    assert (d.rebuild, d.by, d.drivers) == (True, "package", ("ahci",))
    d = initramfs.decide(["kmg_gpu"], {}, "auto", False, None)
    assert (d.rebuild, d.by, d.drivers) == (False, None, ())
    d = initramfs.decide(["kmg_gpu", "ahci"], {"ahci": why}, "never", False, None)
    assert (d.rebuild, d.by) == (False, None) and "never" in d.reason and "ahci" in d.reason
    d = initramfs.decide(["kmg_gpu", "ahci"], {}, "always", False, None)
    assert (d.rebuild, d.by, d.drivers) == (True, "kmodguard", ("kmg_gpu", "ahci"))
    d = initramfs.decide(["ahci"], {"ahci": why}, "auto", False, "an image-mode system (ostree/bootc)")
    assert (d.rebuild, d.by) == (False, None) and "ostree" in d.reason and d.drivers == ("ahci",)
    with pytest.raises(InvalidInput):
        initramfs.decide(["ahci"], {}, "sometimes", False, None)


# --- UKI and ostree: reported, never touched ----------------------------------------------------


def tree_state(d: Path) -> dict:
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None,
                                    p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.fixture
def boot_system(tmp_path) -> Paths:
    root, boot = tmp_path / "root", tmp_path / "root" / "boot"
    boot.mkdir(parents=True)
    (boot / f"initramfs-{KVER}.img").write_bytes(b"the image that boots today\n" * 1000)
    return Paths(kver=KVER, root=root, boot_dir=boot, state_dir=tmp_path / "state",
                 dracut_conf_dir=root / "etc/dracut.conf.d", modules_dir=tmp_path / "no-modules" / KVER)


@pytest.mark.parametrize("setup, words", [
    (lambda r: (r / "run").mkdir() or (r / "run/ostree-booted").touch(), "ostree"),
    (lambda r: (r / "etc/kernel").mkdir(parents=True) or (r / "etc/kernel/install.conf").write_text(
        "# kernel-install\nlayout=uki\n"), "layout=uki"),
    (lambda r: (r / "boot/efi/EFI/Linux").mkdir(parents=True) or (
        r / f"boot/efi/EFI/Linux/3f9e1c0aa1b24b0f8a0c1d2e3f405162-{KVER}.efi").write_bytes(b"MZ"), "unified kernel image"),
    (lambda r: (r / "efi/EFI/Linux").mkdir(parents=True) or (
        r / f"efi/EFI/Linux/fedora-{KVER}+3-0.efi").write_bytes(b"MZ"), "unified kernel image"),
])
def test_uki_and_ostree_are_reported_and_not_touched(boot_system, setup, words):
    paths = boot_system
    assert initramfs.unsupported(paths) is None
    setup(paths.root)
    why = initramfs.unsupported(paths)
    assert why is not None and words in why, why
    before = tree_state(paths.root)
    with pytest.raises(InitramfsFailed) as exc:
        initramfs.rebuild(KVER, ["kmg_core_nic"], paths, timeout=30)
    assert words in str(exc.value)
    assert tree_state(paths.root) == before
    assert not paths.state_dir.exists()  # not even a snapshot
    d = initramfs.decide(["ahci"], {"ahci": "backs /"}, "auto", False, why)
    assert d.rebuild is False and words in d.reason


def test_a_uki_of_another_kernel_does_not_count(boot_system):
    esp = boot_system.boot_dir / "efi/EFI/Linux"
    esp.mkdir(parents=True)
    (esp / "3f9e1c0aa1b24b0f8a0c1d2e3f405162-6.1.0-kmg10-amd64.efi").write_bytes(b"MZ")
    (esp / f"3f9e1c0aa1b24b0f8a0c1d2e3f405162-{KVER}-debug.efi").write_bytes(b"MZ")
    (boot_system.root / "etc/kernel").mkdir(parents=True)
    (boot_system.root / "etc/kernel/install.conf").write_text("layout=bls\n")
    assert initramfs.unsupported(boot_system) is None


# --- the dracut drop-in -------------------------------------------------------------------------


def sourced_add_drivers(conf: Path) -> list[str]:
    """What dracut sees: the drop-in sourced by bash the way dracut sources it."""
    out = subprocess.run(["bash", "-c", 'add_drivers=" earlier "; . "$1"; printf %s "$add_drivers"', "-", str(conf)],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_drop_in_written_merged_and_idempotent(tmp_path):
    paths = Paths(kver=KVER, dracut_conf_dir=tmp_path / "etc" / "dracut.conf.d")
    conf = initramfs.persist_drivers(["nvme", "ahci"], paths)
    assert conf == paths.dracut_conf_dir / "90-kmodguard.conf"
    assert sourced_add_drivers(conf) == ["earlier", "ahci", "nvme"]
    assert initramfs.persisted_drivers(paths) == ["ahci", "nvme"]
    st = conf.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644

    # the same drivers again (in another order, one spelt with '-'): the file is not rewritten
    time.sleep(0.01)
    initramfs.persist_drivers(["ahci", "nvme"], paths)
    initramfs.persist_drivers([], paths)
    assert (conf.stat().st_ino, conf.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    # merged with what is there, also lines an admin added, sorted
    conf.write_text(conf.read_text() + "add_drivers+=\" zz_admin megaraid_sas \"\n")
    initramfs.persist_drivers(["e1000e", "mpt3sas"], paths)
    assert initramfs.persisted_drivers(paths) == ["ahci", "e1000e", "megaraid_sas", "mpt3sas", "nvme", "zz_admin"]
    assert sourced_add_drivers(conf) == ["earlier", "ahci", "e1000e", "megaraid_sas", "mpt3sas", "nvme", "zz_admin"]
    assert conf.read_text().count("add_drivers") == 1
    assert sorted(p.name for p in paths.dracut_conf_dir.iterdir()) == ["90-kmodguard.conf"]  # no temp left

    # dracut sources the file with bash: nothing but module names gets in
    before = conf.read_bytes()
    for bad in ('x"; touch /tmp/owned; "', "a b", "$(id)", ""):
        with pytest.raises(InvalidInput):
            initramfs.persist_drivers(["ahci", bad], paths)
    assert conf.read_bytes() == before


def test_snapshot_and_restore(boot_system):
    image = initramfs.image_path(KVER, boot_system)
    original = image.read_bytes()
    snap = initramfs.snapshot(KVER, boot_system)
    assert snap is not None and snap.read_bytes() == original
    image.write_bytes(b"a broken image from someone's scriptlet")
    assert initramfs.restore(KVER, boot_system) is True
    assert image.read_bytes() == original
    assert sorted(p.name for p in boot_system.boot_dir.iterdir()) == [image.name]


# --- rebuild with the real dracut ---------------------------------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def modtree(tmp_path_factory) -> Path:
    """A depmod'ed tree: plain, xz and zstd synthetic modules (one with '-' in its name) and a built-in one."""
    root = tmp_path_factory.mktemp("modtree")
    mdir = root / "lib" / "modules" / KVER
    for m in (synthetic.Module("kmg_core_nic", aliases=("pci:v0000AAAAd00000001sv*sd*bc*sc*i*",)),
              synthetic.Module("kmg_raid", aliases=("pci:v0000AAAAd00000004sv*sd*bc01sc*i*",),
                               subdir="kernel/drivers/scsi"),
              synthetic.Module("kmg_extra_xz", aliases=("pci:v0000CCCCd00000002sv*sd*bc*sc*i*",), compress="xz"),
              synthetic.Module("kmg-storage-zst", aliases=("pci:v0000CCCCd00000003sv*sd*bc*sc*i*",), compress="zst",
                               subdir="kernel/drivers/block")):
        synthetic.build_module(m, mdir, root / "src")
    synthetic.depmod(root, KVER, {"kmg_builtin": ("pci:v0000AAAAd00000003sv*sd*bc*sc*i*",)})
    return mdir


@pytest.fixture
def bootable(tmp_path, modtree):
    """A boot dir with today's image, an empty dracut.conf.d for kmodguard's drop-in, and dracut
    arguments that keep the host's configuration out (the injected part)."""
    boot = tmp_path / "boot"
    boot.mkdir()
    image = boot / f"initramfs-{KVER}.img"
    image.write_bytes(os.urandom(64 * 1024))
    image.chmod(0o600)
    (tmp_path / "dracut-tmp").mkdir()
    (tmp_path / "etc" / "dracut.conf.d").mkdir(parents=True)  # dracut reads this, never the host's
    paths = Paths(kver=KVER, modules_dir=modtree, state_dir=tmp_path / "state", boot_dir=boot,
                  dracut_conf_dir=tmp_path / "etc" / "dracut.conf.d", root=tmp_path / "root")
    args = ("--conf", "/dev/null", "--tmpdir", str(tmp_path / "dracut-tmp"), "--no-hostonly", "-m", "base",
            "--no-early-microcode", "--compress", "cat")
    return paths, args, image


RUNNER = """
import json, sys
from kmodguard import initramfs
from kmodguard.paths import Paths
a = json.loads(sys.argv[1])
initramfs.rebuild(a["kver"], a["modules"], Paths.from_environment(kver=a["kver"]), a["timeout"], a["args"])
"""


def spawn_rebuild(paths: Paths, modules: list[str], args) -> subprocess.Popen:
    """rebuild() in its own process, configured the way the CLI is: through KMODGUARD_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMODGUARD_")}
    env.update({"KMODGUARD_MODULES_DIR": str(paths.modules_dir), "KMODGUARD_STATE_DIR": str(paths.state_dir),
                "KMODGUARD_BOOT_DIR": str(paths.boot_dir), "KMODGUARD_DRACUT_CONF_DIR": str(paths.dracut_conf_dir),
                "KMODGUARD_ROOT": str(paths.root), "PYTHONPATH": str(REPO)})
    doc = json.dumps({"kver": KVER, "modules": modules, "timeout": 120, "args": list(args)})
    return subprocess.Popen([sys.executable, "-c", RUNNER, doc], env=env)


def children(pid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_ = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat_[stat_.index("(") + 1:stat_.rindex(")")]
            if int(stat_[stat_.rindex(")") + 2:].split()[1]) == pid:
                found[int(entry.name)] = comm
    return found


def wait_for_child(proc: subprocess.Popen, comm: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, name in children(proc.pid).items():
            if name == comm:
                return pid
        assert proc.poll() is None, f"the rebuild ended (exit {proc.returncode}) before {comm} ran"
        time.sleep(0.002)
    raise AssertionError(f"{comm} did not start within {timeout} s")


def wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {timeout} s")


def processes_using(directory: Path) -> list[str]:
    """Processes whose command line, working directory or open files lie under directory."""
    text = str(directory)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            refs = [(entry / "cmdline").read_bytes().decode(errors="replace"), os.readlink(entry / "cwd")]
            refs += [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if any(text in ref for ref in refs):
            found.append(f"{entry.name} {comm}")
    return found


def test_killed_rebuilds_keep_the_image_and_the_next_rebuild_succeeds(bootable):
    paths, args, image = bootable
    before = sha(image)
    initramfs.persist_drivers(["kmg_raid"], paths)  # the drop-in dracut must honour (through --confdir)
    modules = ["kmg_core_nic", "kmg_extra_xz", "kmg-storage-zst", "kmg_builtin"]

    # 1. SIGKILL the process running rebuild while dracut works
    proc = spawn_rebuild(paths, modules, args)
    dracut = wait_for_child(proc, "dracut")
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sha(image) == before
    wait_gone(dracut)  # the orphaned dracut ends (it holds the lock meanwhile)
    assert sha(image) == before

    # 2. SIGKILL it while lsinitrd checks the new image: dracut's output is left behind
    proc = spawn_rebuild(paths, modules, args)
    wait_for_child(proc, "lsinitrd")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sha(image) == before
    stale = [p.name for p in paths.boot_dir.iterdir() if p != image]
    assert stale, "the killed run should have left dracut's output behind"

    # 3. the next rebuild cleans up and succeeds
    t = time.monotonic()
    initramfs.rebuild(KVER, modules, paths, timeout=120, dracut_args=args)
    print(f"rebuild: {time.monotonic() - t:.1f} s")
    assert sorted(p.name for p in paths.boot_dir.iterdir()) == [image.name]  # stale temp gone, nothing else
    assert sha(image) != before
    assert stat.S_IMODE(image.stat().st_mode) == 0o600  # the image keeps its mode
    listing = subprocess.run(["lsinitrd", str(image)], capture_output=True, text=True, check=True).stdout
    for name in ("kmg_core_nic.ko", "kmg_extra_xz.ko.xz", "kmg-storage-zst.ko.zst", "kmg_raid.ko"):
        assert f"/lib/modules/{KVER}/" in listing and name in listing, name
    assert initramfs.missing_from_image(KVER, modules + ["kmg_raid", "kmg_storage_zst"], paths) == []
    assert initramfs.missing_from_image(KVER, ["kmg_gpu"], paths) == ["kmg_gpu"]
    assert not initramfs.snapshot_path(KVER, paths).exists()  # the caller owns the snapshot


def test_failing_dracut_leaves_the_image_byte_for_byte(bootable, tmp_path):
    paths, args, image = bootable
    before, mode = sha(image), image.stat().st_mode

    def unchanged():
        assert sha(image) == before and image.stat().st_mode == mode
        assert sorted(p.name for p in paths.boot_dir.iterdir()) == [image.name]

    # dracut exits 1: the module directory does not exist
    gone = paths._replace(modules_dir=tmp_path / "nowhere" / "lib" / "modules" / KVER)
    with pytest.raises(InitramfsFailed) as exc:
        initramfs.rebuild(KVER, ["kmg_core_nic"], gone, timeout=120, dracut_args=args)
    assert "dracut failed" in exc.value.message and "Cannot find module directory" in (exc.value.hint or "")
    unchanged()

    # a module that does not exist: dracut 059 says so and exits 0; lsinitrd shows it is missing
    with pytest.raises(InitramfsFailed) as exc:
        initramfs.rebuild(KVER, ["kmg_core_nic", "kmg_absent"], paths, timeout=120, dracut_args=args)
    assert "kmg_absent" in str(exc.value)
    unchanged()

    # dracut killed at the time limit, with all its children: a compressor that takes too long
    # (dracut runs --compress as given: here one that sleeps, standing in for xz on a big image)
    t = time.monotonic()
    with pytest.raises(InitramfsFailed) as exc:
        initramfs.rebuild(KVER, ["kmg_core_nic"], paths, timeout=4, dracut_args=(*args, "--compress", "sleep 60"))
    assert 4 <= time.monotonic() - t < 10
    assert "did not finish" in exc.value.message
    unchanged()
    time.sleep(0.1)
    assert processes_using(tmp_path) == []  # dracut and every helper it started are gone
