"""Policy: /etc/kmodguard/kmodguard.toml plus conf.d/*.toml drop-ins, one typed schema.

Later files override earlier ones key by key (tables are merged). The same validator checks
options that arrive over D-Bus, so every bad value gets the same clear message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from .errors import InvalidInput
from .fsutil import read_capped

MODES = ("off", "offer", "auto")
BACKENDS = ("auto", "dnf", "dnf5", "packagekit", "apt", "zypper")
INITRAMFS = ("auto", "always", "never")
DEFAULT_PACKAGES = (
    # Fedora / RHEL / Amazon Linux and their variants (+debug, +rt, aarch64 +16k/+64k)
    "kernel-modules", "kernel-modules-extra", "kernel-modules-core",
    "kernel-debug-modules", "kernel-debug-modules-extra", "kernel-debug-modules-core",
    "kernel-rt-modules", "kernel-rt-modules-extra", "kernel-rt-modules-core",
    "kernel-16k-modules", "kernel-16k-modules-extra", "kernel-64k-modules", "kernel-64k-modules-extra",
    # SUSE: kernel-default on kernel-default-base systems
    "kernel-default", "kernel-default-extra",
    # Debian / Ubuntu
    "linux-modules-extra",
)

# Packages that may be installed for a module's firmware, each asked for by its exact name and
# only when the repository metadata says it has one of the module's firmware files. An entry is a
# name or a pattern with one '*' (any non-empty run of name characters). RHEL and Amazon Linux:
# linux-firmware and the iwl*-firmware family; Fedora splits linux-firmware into the names below;
# SUSE: kernel-firmware-*; Debian and Ubuntu: firmware-* (non-free-firmware) and linux-firmware.
DEFAULT_FIRMWARE_PACKAGES = (
    "linux-firmware",
    "amd-gpu-firmware", "amd-ucode-firmware", "intel-gpu-firmware", "nvidia-gpu-firmware",
    "atheros-firmware", "brcmfmac-firmware", "cirrus-audio-firmware", "intel-audio-firmware",
    "intel-vsc-firmware", "iwlegacy-firmware", "iwlwifi-dvm-firmware", "iwlwifi-mvm-firmware",
    "libertas-firmware", "liquidio-firmware", "mlxsw_spectrum-firmware", "mrvlprestera-firmware",
    "mt7xxx-firmware", "netronome-firmware", "nxpwireless-firmware", "qcom-firmware",
    "qcom-wwan-firmware", "qed-firmware", "realtek-firmware", "tiwilink-firmware", "dvb-firmware",
    "alsa-sof-firmware", "iwl*-firmware",
    "kernel-firmware-*",
    "firmware-*",
)


def name_matches(name: str, entry: str) -> bool:
    """An allow-list entry: an exact name, or a pattern with one '*' standing for one or more characters."""
    head, star, tail = entry.partition("*")
    if not star:
        return name == entry
    return len(name) > len(head) + len(tail) and name.startswith(head) and name.endswith(tail)


def _patterns(where: str, value) -> tuple[str, ...]:
    from .requests import NAME_RE

    entries = _strings(where, value)
    for e in entries:
        if e.count("*") > 1 or not NAME_RE.fullmatch(e.replace("*", "x")) or not e.isascii():
            raise InvalidInput(f"{where}: {e[:64]!r} is not a package name or a pattern with one '*' "
                               "(names are [a-z0-9][a-z0-9+._-]*)")
        if "*" in e and len(e) - 1 < 3:  # '*' alone would admit any package from any repository
            raise InvalidInput(f"{where}: {e!r} admits nearly every package name; a pattern needs at least "
                               "3 other characters (e.g. 'kernel-firmware-*')")
    return entries


class Timeouts(NamedTuple):
    package_manager: float = 900.0  # one whole transaction
    lock_wait: float = 300.0  # waiting for another package manager to finish
    # how long a device an installed module matches may take to bind before it is called unbound
    # (its bind ends the wait; missing/unknown devices never wait), the quiet time before auto mode
    # fixes a burst as one, and how long a re-probed device may take to bind during a fix
    settle: float = 2.0
    dracut: float = 600.0


class Ignore(NamedTuple):
    # CPU modaliases select optional feature modules; a CPU device is never bound to a driver.
    subsystems: tuple[str, ...] = ("cpu",)
    devices: tuple[str, ...] = ()  # device ids (PCI address) or syspaths
    # Modules never to install or load. By default the two drivers every q35 virtual machine
    # would otherwise "miss" (Fedora puts both outside kernel-modules-core): the PC speaker and
    # the ICH9 LPC bridge's chipset helper (watchdog, GPIO). Neither serves a guest's workload,
    # and offering, or in auto mode installing, kernel-modules for them on every boot is noise.
    modules: tuple[str, ...] = ("pcspkr", "lpc_ich")


class Config(NamedTuple):
    mode: str = "offer"
    auto_buses: tuple[str, ...] = ("pci", "virtio", "vmbus")
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    firmware_packages: tuple[str, ...] = DEFAULT_FIRMWARE_PACKAGES
    initramfs: str = "auto"
    backend: str = "auto"  # which package manager; auto: the distribution's own
    timeouts: Timeouts = Timeouts()
    ignore: Ignore = Ignore()
    sources: tuple[str, ...] = ()  # the files read, for status and error messages

    def package_allowed(self, name: str, kernel: str | None = None) -> bool:
        """Allow-listed: an exact name, or a listed name followed by -KVER (Ubuntu's linux-modules-extra-KVER)."""
        return self.allowed_name(name, kernel) is not None

    def firmware_allowed(self, name: str) -> bool:
        """May this package be installed for firmware (firmware_packages)?"""
        from .requests import NAME_RE

        if not isinstance(name, str) or not name.isascii() or not NAME_RE.fullmatch(name) or len(name) > 128:
            return False
        return any(name_matches(name, e) for e in self.firmware_packages)

    def allowed_name(self, name: str, kernel: str | None = None) -> str | None:
        """The allow-list entry that admits `name` (the name itself, or NAME of NAME-KVER), or None.
        KVER must have a kernel release's shape (ASCII), and be `kernel` when that is given."""
        from .requests import KVER_RE, NAME_RE

        if not isinstance(name, str) or not name.isascii() or not NAME_RE.fullmatch(name):
            return None
        if name in self.packages:
            return name
        for p in self.packages:
            kver = name[len(p) + 1:]
            if name.startswith(p + "-") and KVER_RE.fullmatch(kver) and (kernel is None or kver == kernel):
                return p
        return None


def _strings(where: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInput(f"{where} must be a list of non-empty strings, not {value!r}")
    return tuple(value)


# Buses (/sys/bus/*, the subsystem of a device) whose devices carry modaliases. auto_buses names
# these exactly as sysfs spells them (lower case): "PCI" would silently match no device.
KNOWN_BUSES = (
    "acpi", "amba", "ap", "auxiliary", "bcma", "ccw", "cdx", "css", "dfl", "eisa", "fsl-mc", "gameport",
    "hdaudio", "hid", "i2c", "i3c", "ieee1394", "ipack", "ishtp", "isa", "mdio_bus", "mei", "mhi", "mmc",
    "nvmem", "of", "parisc", "pci", "pci_express", "pcmcia", "platform", "pnp", "rapidio", "rpmsg", "scsi",
    "sdio", "serial", "serio", "soundwire", "spi", "ssb", "tee", "thunderbolt", "typec", "ulpi", "usb",
    "vdpa", "vio", "virtio", "vmbus", "wmi", "xen", "xen-backend", "zorro",
)


def _known_buses() -> set[str]:
    """The list above, and every bus this machine's kernel has (a bus is known where it exists)."""
    try:
        return set(KNOWN_BUSES) | set(os.listdir("/sys/bus"))
    except OSError:
        return set(KNOWN_BUSES)


def _buses(where: str, value) -> tuple[str, ...]:
    buses = _strings(where, value)
    known = _known_buses()
    for bus in buses:
        if bus not in known:
            hint = f" (did you mean {bus.lower()!r}?)" if bus.lower() in known else ""
            raise InvalidInput(f"{where}: {bus[:64]!r} is not a bus kmodguard knows{hint}; "
                               f"known buses: {', '.join(sorted(known))}")
    return buses


def _choice(where: str, value, choices) -> str:
    if value not in choices:
        raise InvalidInput(f"{where} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _seconds(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise InvalidInput(f"{where} must be a number of seconds between 0 and 86400, not {value!r}")
    return float(value)


def _table(where: str, value) -> dict:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a table, not {value!r}")
    return value


def validate(raw: dict, where: str = "configuration") -> Config:
    """A Config from a merged mapping; every unknown key or bad value is an InvalidInput."""
    known = {"mode", "auto_buses", "packages", "firmware_packages", "initramfs", "backend", "timeouts", "ignore"}
    for key in raw:
        if key not in known:
            raise InvalidInput(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    kw = {}
    if "mode" in raw:
        kw["mode"] = _choice(f"{where}: mode", raw["mode"], MODES)
    if "auto_buses" in raw:
        kw["auto_buses"] = _buses(f"{where}: auto_buses", raw["auto_buses"])
    if "packages" in raw:
        kw["packages"] = _strings(f"{where}: packages", raw["packages"])
    if "firmware_packages" in raw:
        kw["firmware_packages"] = _patterns(f"{where}: firmware_packages", raw["firmware_packages"])
    if "initramfs" in raw:
        kw["initramfs"] = _choice(f"{where}: initramfs", raw["initramfs"], INITRAMFS)
    if "backend" in raw:
        kw["backend"] = _choice(f"{where}: backend", raw["backend"], BACKENDS)
    if "timeouts" in raw:
        t = _table(f"{where}: timeouts", raw["timeouts"])
        names = Timeouts._fields
        for key in t:
            if key not in names:
                raise InvalidInput(f"{where}: unknown key timeouts.{key} (known: {', '.join(names)})")
        kw["timeouts"] = Timeouts(**{k: _seconds(f"{where}: timeouts.{k}", v) for k, v in t.items()})
    if "ignore" in raw:
        t = _table(f"{where}: ignore", raw["ignore"])
        names = Ignore._fields
        for key in t:
            if key not in names:
                raise InvalidInput(f"{where}: unknown key ignore.{key} (known: {', '.join(names)})")
        kw["ignore"] = Ignore(**{k: _strings(f"{where}: ignore.{k}", v) for k, v in t.items()})
    return Config(**kw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


CONFIG_CAP = 1 << 20  # one configuration file


def load(config_dir: Path) -> Config:
    """The policy from CONFIG_DIR/kmodguard.toml and CONFIG_DIR/conf.d/*.toml (in name order)."""
    config_dir = Path(config_dir)
    try:
        drop_ins = sorted(p for p in (config_dir / "conf.d").iterdir() if p.suffix == ".toml")
    except FileNotFoundError:
        drop_ins = []
    except OSError as exc:
        raise InvalidInput(f"cannot read {config_dir / 'conf.d'}: {exc.strerror}") from None
    files = [config_dir / "kmodguard.toml", *drop_ins]
    merged: dict = {}
    read = []
    for path in files:
        if not os.path.lexists(path):
            continue
        # Drop-ins are the administrator's plain files (cloud-init writes them): never followed
        # through a link (O_NOFOLLOW), refused when not a regular file (a FIFO would block), capped.
        try:
            text = read_capped(path, CONFIG_CAP, follow=False, error_class=InvalidInput,
                               hint=f"make {path} a plain TOML file, or remove it").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"cannot read {path}: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        import tomllib  # only when there is a file to read

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"{path} is not valid TOML: {exc}") from None
        except RecursionError:
            raise InvalidInput(f"{path} is not valid TOML: its arrays or tables are nested too deeply") from None
        validate(data, str(path))  # name the file that holds a bad value
        merged = _merge(merged, data)
        read.append(str(path))
    config = validate(merged)
    return config._replace(sources=tuple(read))


# What a caller may choose for one fix (D-Bus Fix options, the daemon's fix requests). The
# allow-list and the mode are the administrator's: no caller widens them.
FIX_OPTIONS = ("backend", "initramfs")


def with_overrides(config: Config, overrides: dict, where: str = "options") -> Config:
    """The policy with a caller's per-fix choices applied, validated by the same schema."""
    unknown = sorted(set(overrides) - set(FIX_OPTIONS))
    if unknown:
        raise InvalidInput(f"{where}: {', '.join(map(repr, unknown))} cannot be chosen for one fix "
                           f"(allowed: {', '.join(FIX_OPTIONS)})")
    checked = validate(overrides, where)
    return config._replace(**{key: getattr(checked, key) for key in overrides})
