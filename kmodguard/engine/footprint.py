"""Where the space of a kernel's modules goes: each package that holds modules of the kernel, its
size, how many of its modules this machine's devices need, and what removing it would save."""

from __future__ import annotations

import os

from ..devices import Device
from . import ownership
from .api import Engine
from .lifecycle import dependents

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _module_files(mdir) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(mdir):
        found += [os.path.join(dirpath, f) for f in files if f.endswith(MODULE_SUFFIXES)]
    return sorted(found)


def _name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


def footprint(engine: Engine, devices: list[Device]) -> dict:
    mdir = engine.paths.installed_modules
    files = _module_files(mdir)
    owner = ownership.owners(files, engine.paths.root, full=True) if files else {}
    by_package: dict[str | None, list[str]] = {}
    for f in files:
        by_package.setdefault(owner.get(f), []).append(f)
    used: dict[str, dict[str, set[str]]] = {}  # package -> module -> device ids
    for dep in dependents(engine, devices):
        for name, path in dep.modules:
            if path is not None and owner.get(path):
                used.setdefault(owner[path], {}).setdefault(name, set()).add(dep.device.id)
    packages = sorted(p for p in by_package if p)
    size = ownership.sizes(packages, engine.paths.root)
    rows = []
    for package in packages:
        on_disk = 0
        for f in by_package[package]:
            try:
                on_disk += os.stat(f).st_blocks * 512
            except OSError:
                pass
        in_use = used.get(package, {})
        device_ids = sorted({d for ids in in_use.values() for d in ids})
        rows.append({"package": package, "modules": len(by_package[package]), "modules_in_use": sorted(in_use),
                     "devices": device_ids, **size.get(package, {"installed_bytes": None, "package_bytes": None}),
                     "modules_on_disk_bytes": on_disk, "removable": not device_ids,
                     "removal_saves_bytes": 0 if device_ids else size.get(package, {}).get("installed_bytes")})
    return {"kernel": engine.paths.kver, "modules_dir": str(mdir), "packages": rows,
            "unowned_modules": len(by_package.get(None, [])),
            "total_installed_bytes": sum(r["installed_bytes"] or 0 for r in rows)}
