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
            modules = installed.lookup_paths(device.modalias)
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


def kernel_change(now: Engine, new: Engine, devices: list[Device], initramfs_image=None) -> dict:
    """Each device that has (or could have) a driver now, judged under the new kernel's installed
    modules and index: does it keep a driver, and if not, which package would give it one? And
    is the driver of each device needed before the real root is mounted inside the new kernel's
    initramfs (initramfs_image, else where that kernel's image lives)? See initramfs_check."""
    report, install = [], {}
    deps = dependents(now, devices)
    afters = {}
    for dep in deps:
        try:
            after = new.diagnoser.explain(dep.device.modalias)
        except InvalidInput:
            continue
        afters[dep.device.id] = after
        # an installed (or built-in) module of the new kernel matches; or the policy leaves the
        # device alone there (ignore.*): nothing to warn about then
        keeps = after.verdict in ("loadable", "ignored")
        entry = {**device_json(dep.device, dep.now), "verdict_after": after.verdict, "reason_after": after.reason,
                 "candidates_after": [c.as_json() for c in after.candidates], "loses_driver": not keeps}
        report.append(entry)
        if not keeps and after.candidates:
            c = after.candidates[0]
            install.setdefault(c.request, {"package": c.package, "version": c.version, "request": c.request})
    return {"kernel": new.paths.kver, "running": now.paths.kver, "devices": report,
            "loses_driver": [d["id"] for d in report if d["loses_driver"]], "install": list(install.values()),
            "initramfs": initramfs_check(now, new, deps, afters, initramfs_image),
            "environment": {"modules_dir": str(new.paths.installed_modules),
                            "modules_dir_present": new.env.modules_dir_present,
                            "index": new.index_json()}}


def initramfs_check(now: Engine, new: Engine, deps: list[Dependent], afters: dict[str, Verdict],
                    image=None) -> dict:
    """For each device needed before the real root is mounted (initramfs.boot_critical, judged on
    this machine now): is a module that drives it inside the new kernel's initramfs?

    dracut only prints "Failed to find module X" and exits 0 when a driver it was told to add
    (add_drivers+=, kmodguard's drop-in included) is not in the new kernel's tree, and a host-only
    image built elsewhere may simply lack it: the new kernel then cannot mount its root. So the
    image is read (lsinitrd) and every such device is named in "lacks_driver". "checked" is False,
    with the reason, when there is nothing to read (no image yet, a unified kernel image)."""
    from pathlib import Path

    from .. import initramfs
    from ..errors import KmodguardError

    kver = new.paths.kver
    image = Path(image) if image else initramfs.image_path(kver, new.paths)
    doc = {"kernel": kver, "image": str(image), "checked": False, "reason": None, "needed_at_boot": [],
           "devices": [], "lacks_driver": []}
    builtin = initramfs._builtin(new.paths)
    # the drivers kmodguard's dracut drop-in adds (initramfs = "always", or a device that mattered
    # at boot when it was fixed): the image is meant to hold them whatever the topology says now
    persisted = {initramfs._norm(m) for m in initramfs.persisted_drivers(now.paths)}
    critical = []
    for dep in deps:
        why = initramfs.boot_critical(dep.device.syspath, now.paths)
        if not why and initramfs._norm(dep.device.driver or "") in persisted:
            why = f"its driver {dep.device.driver} is in kmodguard's dracut drop-in ({initramfs.DROP_IN})"
        if not why:
            continue
        after = afters.get(dep.device.id)
        # a 'missing' verdict may list installed modules, but only blacklisted ones: they drive nothing
        usable = list(after.installed_modules) if after is not None and after.verdict != "missing" else []
        names = usable if usable else \
            [name for name, _ in dep.modules]
        if (after is not None and after.builtin) or any(initramfs._norm(n) in builtin for n in names):
            continue  # built into the new kernel: no initramfs needed for it
        driver = initramfs._norm(dep.device.driver or "")
        names.sort(key=lambda n: initramfs._norm(n) != driver)  # the module bound now first
        critical.append((dep, why, names))
    doc["needed_at_boot"] = [dep.device.id for dep, _, _ in critical]
    if not critical:
        doc["reason"] = "no device with a loadable driver is needed before the real root is mounted"
        return doc
    why_not = initramfs.unsupported(new.paths)
    if why_not and not image.is_file():
        doc["reason"] = why_not
        return doc
    if not image.is_file():
        doc["reason"] = f"there is no initramfs at {image} (yet)"
        return doc
    try:
        inside = initramfs.image_modules(image)
    except KmodguardError as exc:
        doc["reason"] = f"cannot read {image}: {exc.message}"
        return doc
    doc["checked"] = True
    for dep, why, names in critical:
        present = [n for n in names if initramfs._norm(n) in inside]
        doc["devices"].append({"id": dep.device.id, "syspath": dep.device.syspath, "needed_because": why,
                               "modules": names, "in_image": present, "module": (present or names or [None])[0]})
        if names and not present:
            doc["lacks_driver"].append(dep.device.id)
    return doc


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
