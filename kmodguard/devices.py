"""Devices that carry a modalias, read from sysfs with pyudev (no udevd needed).

Everything read here is untrusted text from the kernel or a hypervisor: it is decoded with
surrogateescape, never handed to a shell, and validated before it reaches libkmod.
"""

from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple

from .errors import InvalidInput

# pyudev is imported where a device is read, not here: commands that judge modalias strings or
# build an index (an image builder's chroot) need no udev at all.

# Drivers whose only job is to hold a device for a guest or keep it quiet.
INTENTIONAL_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pciback", "xen-pciback", "vfio-platform", "uio_pci_generic"})


@functools.lru_cache(maxsize=None)
def udev_context() -> pyudev.Context:
    """One libudev context per process: making one loads libudev through ctypes.util.find_library,
    which runs `ldconfig -p` (milliseconds, per call). Use it from one thread."""
    import pyudev

    return pyudev.Context()


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    value = value.strip()
    return value or None


def _hex(value: str | None) -> int | None:
    """A sysfs id such as 0x8086 (at most 8 hex digits: a longer one is no id)."""
    if not value or not re.fullmatch(r"(0x)?[0-9a-fA-F]{1,8}", value):
        return None
    return int(value, 16)


def _count(value: str | None) -> int | None:
    """A sysfs count such as sriov_numvfs: ASCII digits only ('²'.isdigit() is true), at most 6."""
    return int(value) if value and re.fullmatch(r"[0-9]{1,6}", value) else None


class PciFacts(NamedTuple):
    vendor: int | None = None
    device: int | None = None
    subsystem_vendor: int | None = None
    subsystem_device: int | None = None
    pci_class: int | None = None  # 0xCCSSPP
    physfn: str | None = None  # syspath of the PF when this is an SR-IOV virtual function
    virtfns: tuple[str, ...] = ()  # syspaths of this PF's VFs
    sriov_numvfs: int | None = None
    sriov_drivers_autoprobe: bool | None = None  # of this PF, or of the PF of this VF

    def as_json(self) -> dict:
        return {
            "vendor": f"{self.vendor:04x}" if self.vendor is not None else None,
            "device": f"{self.device:04x}" if self.device is not None else None,
            "subsystem_vendor": f"{self.subsystem_vendor:04x}" if self.subsystem_vendor is not None else None,
            "subsystem_device": f"{self.subsystem_device:04x}" if self.subsystem_device is not None else None,
            "class": f"{self.pci_class:06x}" if self.pci_class is not None else None,
            "physfn": self.physfn,
            "virtfns": list(self.virtfns),
            "sriov_numvfs": self.sriov_numvfs,
            "sriov_drivers_autoprobe": self.sriov_drivers_autoprobe,
        }


class Device(NamedTuple):
    syspath: str
    subsystem: str
    sysname: str
    modalias: str
    driver: str | None = None
    driver_override: str | None = None
    companion_of: str | None = None  # for ACPI nodes: the physical device judged instead
    pci: PciFacts | None = None

    @property
    def id(self) -> str:
        """The PCI address for PCI devices, the syspath otherwise (the Contract's device id, docs/contract.md)."""
        return self.sysname if self.subsystem == "pci" else self.syspath


def _attr(device: pyudev.Device, name: str) -> str | None:
    try:
        return _text(device.attributes.get(name))
    except (OSError, KeyError):
        return None


def _link(syspath: str, name: str) -> str | None:
    path = os.path.join(syspath, name)
    return os.path.realpath(path) if os.path.islink(path) else None


def _uevent_value(syspath: str, key: bytes) -> bytes | None:
    """KEY's raw value in the device's uevent file, as the kernel wrote it (lines end with \\n only)."""
    try:
        with open(os.path.join(syspath, "uevent"), "rb") as f:
            data = f.read(65536)
    except OSError:
        return None
    prefix = key + b"="
    return next((line[len(prefix):] for line in data.split(b"\n") if line.startswith(prefix)), None)


def _has_modalias(syspath: str) -> bool:
    """The device's uevent file has a MODALIAS line (a bare read: this runs for every bus device)."""
    try:
        fd = os.open(os.path.join(syspath, "uevent"), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        data = os.read(fd, 65536)
    except OSError:
        return False
    finally:
        os.close(fd)
    return data.startswith(b"MODALIAS=") or b"\nMODALIAS=" in data


def _modalias(device: pyudev.Device) -> str | None:
    # The raw bytes first: libudev also ends a line at '\r' (a hostile value would be cut to a
    # harmless-looking prefix) and pyudev decodes strictly (non-UTF-8 raises); keep both visible.
    value = _uevent_value(device.sys_path, b"MODALIAS")
    if value is None:
        try:
            value = device.properties.get("MODALIAS")
        except UnicodeDecodeError:
            value = device.attributes.get("modalias")
    # Only the newline sysfs ends an attribute with goes: strip() would also remove leading or
    # trailing control bytes (\x0b, \x1c, \r, ...), which the modalias check must see and refuse.
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if value is None:
        return None
    return value.removesuffix("\n") or None


def _autoprobe(device: pyudev.Device) -> bool | None:
    value = _attr(device, "sriov_drivers_autoprobe")
    return None if value is None else value != "0"


def _pci_facts(device: pyudev.Device) -> PciFacts:
    import pyudev

    syspath = device.sys_path
    physfn = _link(syspath, "physfn")
    autoprobe = _autoprobe(device)
    if physfn is not None:
        try:
            autoprobe = _autoprobe(pyudev.Devices.from_sys_path(device.context, physfn))
        except pyudev.DeviceNotFoundError:
            autoprobe = None
    try:
        virtfns = tuple(sorted(
            os.path.realpath(os.path.join(syspath, n)) for n in os.listdir(syspath) if n.startswith("virtfn")))
    except OSError:
        virtfns = ()
    return PciFacts(
        vendor=_hex(_attr(device, "vendor")),
        device=_hex(_attr(device, "device")),
        subsystem_vendor=_hex(_attr(device, "subsystem_vendor")),
        subsystem_device=_hex(_attr(device, "subsystem_device")),
        pci_class=_hex(_attr(device, "class")),
        physfn=physfn,
        virtfns=virtfns,
        sriov_numvfs=_count(_attr(device, "sriov_numvfs")),
        sriov_drivers_autoprobe=autoprobe,
    )


def from_udev(device: pyudev.Device) -> Device | None:
    """A Device from a pyudev device, or None when it carries no modalias."""
    modalias = _modalias(device)
    if modalias is None:
        return None
    override = _attr(device, "driver_override")
    companion = None
    driver = device.driver
    if device.subsystem == "acpi":
        # An ACPI namespace node is served through its physical node (a platform or PCI
        # device with the same modalias), which is judged on its own.
        companion = _link(device.sys_path, "physical_node")
    return Device(
        syspath=device.sys_path,
        subsystem=device.subsystem or "",
        sysname=device.sys_name,
        modalias=modalias,
        driver=driver,
        driver_override=None if override == "(null)" else override,
        companion_of=companion,
        pci=_pci_facts(device) if device.subsystem == "pci" else None,
    )


def enumerate_devices(context: pyudev.Context | None = None) -> list[Device]:
    """Every device with a MODALIAS on every bus, sorted by syspath.

    Only bus devices bind drivers; class devices (input, ...) carry modaliases for handler
    modules but never a driver link, so they are left out. The devices are the ones libudev's
    enumerator lists for every bus's name with match_property("MODALIAS", "*"): the entries of
    /sys/bus/BUS/devices and /sys/class/BUS whose uevent names a MODALIAS (the kernel writes it
    there). Found by reading those uevent files here: libudev makes a device object of each of
    the hundreds of bus devices to test it (about 4 times the time); only the matches become
    pyudev devices.
    """
    import pyudev

    context = context or udev_context()
    top = context.sys_path
    try:
        buses = sorted(os.listdir(os.path.join(top, "bus")))
    except OSError:
        return []
    syspaths = set()
    for bus in buses:
        for where in (os.path.join(top, "bus", bus, "devices"), os.path.join(top, "class", bus)):
            try:
                names = os.listdir(where)
            except OSError:
                continue
            for name in names:
                entry = os.path.join(where, name)
                try:  # a link into /sys/devices, resolved as libudev does (one readlink, not realpath's lstat per part)
                    syspath = os.path.normpath(os.path.join(where, os.readlink(entry)))
                except OSError:
                    syspath = entry
                if syspath not in syspaths and _has_modalias(syspath):
                    syspaths.add(syspath)
    found = []
    for syspath in syspaths:
        try:
            device = from_udev(pyudev.Devices.from_sys_path(context, syspath))
        except (pyudev.DeviceNotFoundError, OSError):
            continue  # gone since
        if device is not None:
            found.append(device)
    return sorted(found, key=lambda d: d.syspath)


_PCI_ADDRESS = r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"  # compiled at first use: status needs none


def check_ref(ref: str) -> str:
    """A device reference from a user or a D-Bus caller: a PCI address (0000:00:05.0) or a syspath
    under /sys/devices (with or without /sys); nothing that walks out of sysfs."""
    ok = isinstance(ref, str) and 0 < len(ref) <= 4096 and ref.isprintable()
    if ok and not re.fullmatch(_PCI_ADDRESS, ref):
        parts = ref.split("/")
        ok = ref.startswith(("/sys/devices/", "/devices/", "/sys/bus/")) and ".." not in parts
    if not ok:
        raise InvalidInput(f"{ref[:80]!r} is not a device: give a PCI address (0000:00:05.0) or a syspath "
                           "under /sys/devices", hint="'kmodguard status' lists device ids")
    return ref


def find_device(ref: str, context: pyudev.Context | None = None) -> Device | None:
    """A device by its id (PCI address) or syspath (with or without the /sys prefix)."""
    import pyudev

    check_ref(ref)
    context = context or udev_context()
    candidates = []
    if ref.startswith("/"):
        candidates.append(ref if ref.startswith(context.sys_path) else context.sys_path + ref)
    else:
        candidates.append(os.path.join(context.sys_path, "bus/pci/devices", ref))
    for path in candidates:
        try:
            return from_udev(pyudev.Devices.from_sys_path(context, os.path.realpath(path)))
        except pyudev.DeviceNotFoundError:
            continue
    return None
