"""Where kmodguard runs: a container, an image-mode system, a kernel with or without modules."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

from .. import process
from ..errors import KmodguardError
from ..paths import Paths


class Environment(NamedTuple):
    container: str | None  # systemd-detect-virt's name for it, or None
    image_mode: str | None  # "ostree" (rpm-ostree, bootc) or None
    module_support: bool  # the running kernel loads modules (/proc/modules exists)
    modules_dir: Path
    modules_dir_present: bool
    package_manager: str | None  # dnf5, dnf, zypper, apt-get: what a user would run

    @property
    def can_install(self) -> bool:
        return self.container is None and self.image_mode is None

    @property
    def why_not(self) -> str | None:
        if self.container:
            return f"running in a container ({self.container}): the kernel belongs to the host, so nothing is installed or loaded here"
        if self.image_mode:
            return "an image-mode system (ostree/bootc): packages are layered, not installed at run time (rpm-ostree install, then reboot)"
        return None

    def as_json(self) -> dict:
        return {
            "container": self.container,
            "image_mode": self.image_mode,
            "module_support": self.module_support,
            "modules_dir": str(self.modules_dir),
            "modules_dir_present": self.modules_dir_present,
            "package_manager": self.package_manager,
            "can_install": self.can_install,
            "why_not": self.why_not,
        }


def _container(env):
    """Start finding out whether this is a container; returns a function that gives the answer.

    systemd-detect-virt runs while the caller does other work (it costs a few milliseconds).
    """
    forced = env.get("KMODGUARD_CONTAINER")  # image builders: judge a chroot as the target machine
    if forced:
        return lambda: None if forced == "none" else forced
    tool = shutil.which("systemd-detect-virt")
    if not tool:
        return _container_markers
    try:
        started = process.start([tool, "--container"], timeout=5)
    except KmodguardError:
        return _container_markers

    def answer():
        try:
            res = started.result()
        except KmodguardError:  # stopped at the deadline
            return _container_markers()
        name = res.stdout.strip()
        return None if res.returncode != 0 or name in ("", "none") else name

    return answer


def _container_markers() -> str | None:
    """Without systemd: the files container managers leave behind."""
    for marker, name in (("/run/.containerenv", "podman"), ("/.dockerenv", "docker")):
        if os.path.exists(marker):
            return name
    try:
        value = Path("/run/systemd/container").read_text().strip()
        return value or None
    except OSError:
        return None


def _os_family(os_release: Path) -> set[str]:
    ids: set[str] = set()
    try:
        for line in os_release.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key in ("ID", "ID_LIKE"):
                ids.update(value.strip().strip('"').split())
    except OSError:
        pass
    return ids


def _package_manager(os_release: Path = Path("/etc/os-release")) -> str | None:
    """The system's own package manager, by distribution family (a dnf installed on Debian is not it)."""
    family = _os_family(os_release)
    if family & {"fedora", "rhel", "centos", "amzn"}:
        return "dnf5" if shutil.which("dnf5") else "dnf"
    if family & {"suse", "opensuse"}:
        return "zypper"
    if family & {"debian", "ubuntu"}:
        return "apt-get"
    return next((t for t in ("dnf5", "dnf", "zypper", "apt-get") if shutil.which(t)), None)


def detect(paths: Paths, env=os.environ) -> Environment:
    return start_detect(paths, env)()


def start_detect(paths: Paths, env=os.environ):
    """Begin detecting the environment; call the result to get it (lets slow probes overlap other work)."""
    container = _container(env)
    return lambda: _environment(paths, container())


def _environment(paths: Paths, container: str | None) -> Environment:
    image_mode = "ostree" if (paths.root / "run/ostree-booted").exists() else None
    return Environment(
        container=container,
        image_mode=image_mode,
        module_support=(paths.proc / "modules").exists(),
        modules_dir=paths.installed_modules,
        modules_dir_present=(paths.installed_modules / "modules.dep.bin").exists()
        or (paths.installed_modules / "modules.dep").exists(),
        package_manager=_package_manager(),
    )
