"""`daemon`, `config check` and `footprint`."""

from __future__ import annotations

from ...errors import ExitCode
from ..output import emit_json, table
from ._common import _size, make_paths


def daemon(args) -> int:
    from ...daemon import run

    return run(make_paths(args), use_bus=not args.no_bus)


def config_check(args) -> int:
    from ... import config as config_mod

    paths = make_paths(args)
    policy = config_mod.load(paths.config_dir)
    doc = {"config_dir": str(paths.config_dir), "files": list(policy.sources), "policy": {
        "mode": policy.mode, "auto_buses": list(policy.auto_buses), "packages": list(policy.packages),
        "firmware_packages": list(policy.firmware_packages), "initramfs": policy.initramfs, "backend": policy.backend, "timeouts": policy.timeouts._asdict(),
        "ignore": {k: list(v) for k, v in policy.ignore._asdict().items()}}}
    if args.json:
        emit_json(doc)
        return ExitCode.OK
    files = ", ".join(policy.sources) or f"none (defaults; {paths.config_dir}/kmodguard.toml is absent)"
    print(f"policy files read: {files}")
    p = doc["policy"]
    print(f"mode = {p['mode']!r}; auto_buses = {p['auto_buses']}; initramfs = {p['initramfs']!r}; "
          f"backend = {p['backend']!r}")
    print(f"packages = {p['packages']}")
    print(f"firmware_packages = {p['firmware_packages']}")
    print(f"timeouts = {p['timeouts']}; ignore = {p['ignore']}")
    return ExitCode.OK


def footprint(args) -> int:
    from ...devices import enumerate_devices
    from ...engine.api import Engine
    from ...engine.footprint import footprint as measure

    paths = make_paths(args)
    doc = measure(Engine(paths), enumerate_devices())
    if args.json:
        emit_json(doc)
        return ExitCode.OK
    if not doc["packages"]:
        print(f"no installed package holds modules of kernel {paths.kver} ({doc['modules_dir']})")
        return ExitCode.OK
    print(f"kmodguard footprint: kernel {paths.kver}, {doc['modules_dir']}")
    rows = [("package", "modules", "in use", "installed", "download", "")]
    for p in doc["packages"]:
        note = (f"needed by {', '.join(p['devices'][:3])}{' ...' if len(p['devices']) > 3 else ''}" if p["devices"]
                else f"removing it would save {_size(p['removal_saves_bytes'])}")
        rows.append((p["package"], str(p["modules"]), str(len(p["modules_in_use"])), _size(p["installed_bytes"]),
                     _size(p["package_bytes"]), note))
    print(table(rows, indent=""))
    if doc["unowned_modules"]:
        print(f"{doc['unowned_modules']} module file(s) belong to no package (built locally: DKMS, akmods?)")
    return ExitCode.OK
