"""The machine's future: would a new kernel, or a package removal, take a driver from a device?

A device depends on the installed modules that match its modalias (libkmod's answer, the same one
udev acts on) when a driver is bound to it (not a passthrough holder such as vfio-pci) or when an
installed module could drive it. Built-in modules are the kernel's own: nothing removes them.
"""

from __future__ import annotations

from typing import NamedTuple

from ..devices import Device
from ..errors import InvalidInput
from . import ownership
from .api import Engine, device_json
from .diagnosis import Verdict


class Dependent(NamedTuple):
    device: Device
    now: Verdict
    modules: tuple[tuple[str, str | None], ...]  # (name, path), path None: built into the kernel

    @property
    def builtin(self) -> bool:
        return any(path is None for _, path in self.modules)


def dependents(engine: Engine, devices: list[Device]) -> list[Dependent]:
    """The devices that are served, or could be served, by installed modules, with those modules."""
    installed = engine.diagnoser.installed
    out = []
    for device in devices:
        now = engine.diagnoser.diagnose(device)
        if now.verdict == "bound" and now.intentional:
            continue  # held for a guest: its own driver (vfio-pci) is not the device's
        if now.verdict not in ("bound", "loadable") or installed is None:
            continue
        try:
            modules = tuple(installed.lookup_paths(device.modalias))
        except InvalidInput:
            continue
        if modules:
            out.append(Dependent(device, now, modules))
    return out


def removal(engine: Engine, devices: list[Device], packages: list[str]) -> dict:
    """Which devices removing `packages` would leave without a driver (every module that matches
    them lives in those packages)."""
    root = engine.paths.root
    removed: set[str] = set()
    for package in packages:
        removed.update(ownership.package_files(package, root))
    report = []
    for dep in dependents(engine, devices):
        kept = [name for name, path in dep.modules
                if path is None or ownership._inside(root, path) not in removed]
        lost = [name for name, path in dep.modules if path is not None and name not in kept]
        if not lost:
            continue
        report.append({**device_json(dep.device, dep.now), "modules_lost": lost, "modules_kept": kept,
                       "loses_driver": not kept})
    return {"kernel": engine.paths.kver, "removal": list(packages), "devices": report,
            "loses_driver": [d["id"] for d in report if d["loses_driver"]]}


def kernel_change(now: Engine, new: Engine, devices: list[Device]) -> dict:
    """Each device that has (or could have) a driver now, judged under the new kernel's installed
    modules and index: does it keep a driver, and if not, which package would give it one?"""
    report, install = [], {}
    for dep in dependents(now, devices):
        try:
            after = new.diagnoser.explain(dep.device.modalias)
        except InvalidInput:
            continue
        keeps = after.verdict == "loadable"  # an installed (or built-in) module of the new kernel matches
        entry = {**device_json(dep.device, dep.now), "verdict_after": after.verdict, "reason_after": after.reason,
                 "candidates_after": [c.as_json() for c in after.candidates], "loses_driver": not keeps}
        report.append(entry)
        if not keeps and after.candidates:
            c = after.candidates[0]
            install.setdefault(c.request, {"package": c.package, "version": c.version, "request": c.request})
    return {"kernel": new.paths.kver, "running": now.paths.kver, "devices": report,
            "loses_driver": [d["id"] for d in report if d["loses_driver"]], "install": list(install.values()),
            "environment": {"modules_dir": str(new.paths.installed_modules),
                            "modules_dir_present": new.env.modules_dir_present,
                            "index": new.index_json()}}


def driver_packages(engine: Engine, devices: list[Device]) -> dict[str, list[str]]:
    """{installed package: [device ids]} of the packages whose modules drive this machine's devices
    (a device served by a built-in module needs none). A new kernel needs the same packages."""
    deps = [d for d in dependents(engine, devices) if not d.builtin]
    paths = [path for d in deps for _, path in d.modules[:1]]
    owner = ownership.owners(paths, engine.paths.root)
    out: dict[str, list[str]] = {}
    for d in deps:
        package = owner.get(d.modules[0][1])
        if package:
            out.setdefault(package, []).append(d.device.id)
    return out
