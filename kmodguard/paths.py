"""Every path kmodguard reads or writes, in one injectable object.

Defaults are the real system's. Each can be moved by an environment variable and then by a
command-line option (options win). Tests and image builders use these; shipped code has no
"testing" branches.
"""

from __future__ import annotations

import os
from typing import NamedTuple
from pathlib import Path

ENVIRONMENT = {
    "modules_dir": "KMODGUARD_MODULES_DIR",
    "index_dir": "KMODGUARD_INDEX_DIR",
    "state_dir": "KMODGUARD_STATE_DIR",
    "runtime_dir": "KMODGUARD_RUNTIME_DIR",
    "config_dir": "KMODGUARD_CONFIG_DIR",
    "sysfs": "KMODGUARD_SYSFS",
    "firmware_dirs": "KMODGUARD_FIRMWARE_DIRS",
    "modprobe_dirs": "KMODGUARD_MODPROBE_DIRS",
    "proc": "KMODGUARD_PROC",
    "root": "KMODGUARD_ROOT",
    "boot_dir": "KMODGUARD_BOOT_DIR",
    "dracut_conf_dir": "KMODGUARD_DRACUT_CONF_DIR",
    "kmsg": "KMODGUARD_KMSG",
    "motd_dir": "KMODGUARD_MOTD_DIR",
}


def running_kernel() -> str:
    """uname -r, unless KMODGUARD_KVER names the kernel to treat as running (an image being built
    in a chroot runs the builder's kernel, not its own)."""
    return os.environ.get("KMODGUARD_KVER") or os.uname().release


class _Fields(NamedTuple):
    kver: str = ""  # "": the running kernel (see from_environment)
    modules_dir: Path | None = None  # None: /lib/modules/KVER
    state_dir: Path = Path("/var/lib/kmodguard")
    index_dir: Path | None = None  # None: STATE_DIR/index
    runtime_dir: Path = Path("/run/kmodguard")
    config_dir: Path = Path("/etc/kmodguard")
    sysfs: Path = Path("/sys")
    proc: Path = Path("/proc")
    # where the kernel's firmware loader looks (drivers/base/firmware_loader/main.c)
    firmware_dirs: tuple[Path, ...] = (
        Path("/lib/firmware/updates/{kver}"),
        Path("/lib/firmware/updates"),
        Path("/lib/firmware/{kver}"),
        Path("/lib/firmware"),
    )
    # None: libkmod's own defaults (/etc, /run, /usr/local/lib, /lib /modprobe.d)
    modprobe_dirs: tuple[str, ...] | None = None
    root: Path = Path("/")  # where packages are installed (a package manager's --installroot)
    boot_dir: Path = Path("/boot")  # initramfs images
    dracut_conf_dir: Path = Path("/etc/dracut.conf.d")
    kmsg: Path = Path("/dev/kmsg")  # the kernel log, for why a driver refused a device
    motd_dir: Path = Path("/run/motd.d")  # the daemon's message of the day fragment (offer mode)


# The fields that are one path, and the one that is several; modprobe_dirs stays strings (libkmod's).
PATH_FIELDS = ("modules_dir", "state_dir", "index_dir", "runtime_dir", "config_dir", "sysfs", "proc", "root",
               "boot_dir", "dracut_conf_dir", "kmsg", "motd_dir")
PATH_TUPLE_FIELDS = ("firmware_dirs",)


def _coerce(field: str, value):
    """A path field as a Path whatever a caller handed (dnf gives plugins str paths)."""
    if value is None:
        return None
    if field in PATH_FIELDS:
        return Path(value)
    if field in PATH_TUPLE_FIELDS:
        return tuple(Path(v) for v in value)
    if field == "modprobe_dirs":
        return tuple(str(v) for v in value)
    return value


class Paths(_Fields):
    """Every construction (Paths(...), _replace, from_environment) makes the path fields Paths:
    code uses the `/` operator on them."""

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        raw = _Fields.__new__(cls, *args, **kwargs)
        return tuple.__new__(cls, [_coerce(f, v) for f, v in zip(cls._fields, raw)])

    @classmethod
    def _make(cls, iterable):
        return cls(*iterable)

    def _replace(self, **changes):
        return type(self)(**{**self._asdict(), **changes})

    @classmethod
    def from_environment(cls, env=os.environ, **overrides) -> "Paths":
        """Defaults, then KMODGUARD_* variables, then explicit overrides (options) that are not None."""
        values = {}
        for key, var in ENVIRONMENT.items():
            if env.get(var):
                raw = env[var]
                values[key] = tuple(p for p in raw.split(":") if p) if key in ("firmware_dirs", "modprobe_dirs") \
                    else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.setdefault("kver", running_kernel())
        return cls(**values)  # the path fields become Paths there (str from dnf, from options)

    def as_environment(self) -> dict[str, str]:
        """The KMODGUARD_* variables that make another kmodguard process see these same paths."""
        env = {}
        for key, var in ENVIRONMENT.items():
            value = getattr(self, key)
            if value is None:
                continue
            if key in ("firmware_dirs", "modprobe_dirs"):
                value = ":".join(str(v) for v in value)
            env[var] = str(value)
        return env

    def with_kver(self, kver: str) -> "Paths":
        return self._replace(kver=kver)

    @property
    def installed_modules(self) -> Path:
        """KMODGUARD_MODULES_DIR, else ROOT/lib/modules/KVER."""
        return self.modules_dir if self.modules_dir is not None else self.root / "lib/modules" / self.kver

    @property
    def index_root(self) -> Path:
        return self.index_dir if self.index_dir is not None else self.state_dir / "index"

    @property
    def kernel_firmware_dirs(self) -> tuple[Path, ...]:
        return tuple(Path(str(d).replace("{kver}", self.kver)) for d in self.firmware_dirs)

    @property
    def snapshot(self) -> Path:
        """The daemon's world-readable state snapshot."""
        return self.runtime_dir / "state.json"

    @property
    def motd(self) -> Path:
        return self.motd_dir / "kmodguard"
