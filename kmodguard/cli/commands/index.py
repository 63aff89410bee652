"""`index build|list|show|fetch|derive|remove`."""

from __future__ import annotations

from pathlib import Path

from ...errors import ExitCode, InvalidInput
from ..output import emit_json, progress, safe
from ._common import make_paths


def index_build(args) -> int:
    from ... import requests
    from ...index import build as builder

    paths = make_paths(args)
    kver = args.kver
    built = []
    if args.from_dir:
        if not args.package or not args.pkg_version:
            raise InvalidInput("--from-dir needs --package NAME and --version V (the package's exact version)",
                               hint="and --request 'NAME-uname-r = KVER' for a Fedora-style package")
        kver = kver or paths.kver
        version = args.pkg_version
        default = args.package if args.package.endswith(f"-{kver}") else f"{args.package} = {version}"
        request = requests.for_package(args.package, kver, version, args.request or default)
        root = Path(args.from_dir)
        if not root.is_dir():
            raise InvalidInput(f"--from-dir {root}: no such directory")
        source = builder.PackageSource(args.package, version, request, root, {"from-dir": str(root.resolve())},
                                       args.rebuilds_initramfs)
        progress(f"indexing {args.package} for kernel {kver}")
        built.append(builder.build_package(paths.index_root, kver, source, progress))
    else:
        if args.package or args.pkg_version or args.request or args.rebuilds_initramfs:
            raise InvalidInput("--package, --version and --request go with --from-dir; an RPM names itself")
        import contextlib

        from ...index import rpmfile

        # Read every file first: one bad RPM in the list leaves every index as it was.
        with contextlib.ExitStack() as stack:
            sources = []
            for f in args.from_rpm:
                progress(f"reading {f}")
                sources.append(stack.enter_context(rpmfile.extracted(Path(f), kver)))
            # ...and publish only when every one is built: all or nothing
            built.extend(builder.build_packages(paths.index_root, [(k, s) for s, k in sources], progress))
    if args.json:
        emit_json({"built": [p.summary() for p in built]})
    else:
        for p in built:
            s = p.summary()
            print(f"indexed {s['package']} {s['version']} for kernel {s['kernel']}: {s['modules']} modules, "
                  f"{s['size_bytes'] // 1024} KiB, install request {s['request']!r}"
                  + (f", blacklists {len(s['blacklisted'])} of its modules" if s["blacklisted"] else ""))
    return ExitCode.OK


def _kernel_doc(root: Path, kver: str, only=()) -> dict:
    from ...index.store import KernelIndex

    idx = KernelIndex(root, kver)
    return {
        "kernel": kver,
        "packages": [p.summary() for p in idx.packages if not only or p.name in only],
        "errors": [{"package": n, "message": e.message} for n, e in idx.errors.items() if not only or n in only],
    }


def index_list(args) -> int:
    from ...index.store import kernels

    paths = make_paths(args)
    docs = [_kernel_doc(paths.index_root, k) for k in kernels(paths.index_root)]
    if args.json:
        emit_json({"index_dir": str(paths.index_root), "kernels": docs})
        return ExitCode.OK
    if not docs:
        print(f"nothing is indexed in {paths.index_root}; 'kmodguard index build --help' tells how")
    for d in docs:
        pkgs = ", ".join(f"{p['package']} {p['version']}" for p in d["packages"]) or "-"
        broken = f"  ({len(d['errors'])} unusable)" if d["errors"] else ""
        print(f"{d['kernel']}: {pkgs}{broken}")
    return ExitCode.OK


def index_show(args) -> int:
    paths = make_paths(args)
    doc = _kernel_doc(paths.index_root, paths.kver, set(args.packages))
    if args.packages:
        known = {p["package"] for p in doc["packages"]} | {e["package"] for e in doc["errors"]}
        unknown = [p for p in args.packages if p not in known]
        if unknown:
            raise InvalidInput(f"not indexed for {paths.kver}: {', '.join(unknown)}",
                               hint="'kmodguard index list' shows what is")
    if args.modules:
        from ...index.store import KernelIndex

        idx = KernelIndex(paths.index_root, paths.kver)
        mods = {p.name: p.modules for p in idx.packages}
        for p in doc["packages"]:
            p["module_list"] = [{"module": r.name, "path": r.path, "size": r.size, "aliases": list(r.aliases),
                                 "firmware": list(r.firmware), "depends": list(r.depends)}
                                for r in mods[p["package"]].values()]
    if args.json:
        emit_json(doc)
    else:
        if not doc["packages"] and not doc["errors"]:
            print(f"nothing is indexed for kernel {paths.kver} in {paths.index_root}")
        for p in doc["packages"]:
            age_h = p["age_seconds"] / 3600
            print(f"{p['package']} {p['version']}: {p['modules']} modules, {p['size_bytes'] // 1024} KiB on disk, "
                  f"built {p['built']} ({age_h:.1f} h ago)\n  install request: {p['request']}\n  path: {p['path']}")
            if p["blacklisted"]:
                print(f"  blacklists its own: {', '.join(p['blacklisted'])}")
            for m in p.get("module_list", ()):
                print(f"    {m['module']}  {m['path']}  {m['size']} bytes, {len(m['aliases'])} aliases")
        for e in doc["errors"]:
            print(f"{e['package']}: UNUSABLE: {safe(e['message'])}")
    return ExitCode.ERROR if doc["errors"] else ExitCode.OK


def index_fetch(args) -> int:
    from ...engine.api import Engine
    from ...index.fetch import fetch

    paths = make_paths(args)
    engine = Engine(paths)
    done = fetch(engine, paths.kver, progress, download=args.download, backend=args.backend)
    if args.json:
        emit_json({"kernel": paths.kver, "packages": done})
    else:
        for p in done:
            print(f"{p['package']} {p['version']} for kernel {paths.kver}: {p['modules']} modules ({p['how']}), "
                  f"install request {p['request']!r}")
    return ExitCode.OK


def index_derive(args) -> int:
    from ...index.derive import derive
    from ...paths import running_kernel

    paths = make_paths(args)
    old = args.from_kver or running_kernel()
    if old == paths.kver:
        raise InvalidInput(f"--kver {paths.kver} is the kernel to derive from: name the new kernel with --kver")
    from ... import config as config_mod

    made = derive(paths.index_root, old, paths.kver, policy=config_mod.load(paths.config_dir))
    if args.json:
        emit_json({"kernel": paths.kver, "derived_from": old, "built": [p.summary() for p in made]})
    elif made:
        for p in made:
            print(f"derived {p.name} for kernel {paths.kver} from {old}'s index (install request {p.request!r})")
    else:
        print(f"nothing to derive: kernel {old} has no index with a per-kernel request, "
              f"or {paths.kver} has every package already")
    return ExitCode.OK


def index_remove(args) -> int:
    from ...index.store import remove

    paths = make_paths(args)
    gone = [p for p in args.packages if remove(paths.index_root, paths.kver, p)]
    missing = [p for p in args.packages if p not in gone]
    if args.json:
        emit_json({"kernel": paths.kver, "removed": gone, "not_indexed": missing})
    else:
        for p in gone:
            print(f"removed the index of {p} for {paths.kver}")
    if missing:
        raise InvalidInput(f"not indexed for {paths.kver}: {', '.join(missing)}")
    return ExitCode.OK
