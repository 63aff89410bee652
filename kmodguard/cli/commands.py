"""The commands behind the parser. Each returns an exit code."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ..engine.api import Engine, needs_action
from ..engine.diagnosis import check_modalias
from ..errors import ExitCode, InvalidInput
from ..paths import Paths
from .output import HEADINGS, ORDER, emit_json, install_command, progress, safe, table


def make_paths(args) -> Paths:
    return Paths.from_environment(
        kver=args.kver, modules_dir=args.modules_dir, index_dir=args.index_dir, config_dir=args.config_dir,
    )


def _exit_for(verdicts) -> int:
    return ExitCode.ACTION_NEEDED if needs_action(verdicts) else ExitCode.OK


# --- status -------------------------------------------------------------------------------

def status(args) -> int:
    from ..devices import enumerate_devices
    from ..engine.state import read_snapshot

    paths = make_paths(args)
    engine = Engine(paths, meanwhile=enumerate_devices)
    judged = engine.judge(engine.meanwhile_result)
    if args.json:
        emit_json(engine.status_document(judged, read_snapshot(paths.snapshot)))
    else:
        _print_status(paths, engine.env, engine.diagnoser, judged, show_all=args.all)
    return _exit_for(v for _, v in judged)


def _notes(paths, env, diagnoser) -> list[str]:
    notes = []
    if env.why_not:
        notes.append(f"Note: {env.why_not}.")
    if diagnoser.installed_problem:
        notes.append(f"Note: {diagnoser.installed_problem}.")
    for name, exc in diagnoser.index.errors.items():
        notes.append(f"Warning: {safe(exc.message)}")
    if not diagnoser.index.exists and not diagnoser.no_module_support:
        notes.append(f"Note: no package index for {paths.kver} in {paths.index_root}: "
                     "'kmodguard index build' makes one.")
    return notes


def _print_status(paths, env, diagnoser, judged, show_all: bool) -> None:
    print(f"kmodguard: kernel {paths.kver}, {len(judged)} devices with a modalias")
    for note in _notes(paths, env, diagnoser):
        print(note)
    groups = {v: [(d, x) for d, x in judged if x.verdict == v] for v in ORDER}
    for verdict in ORDER:
        members = groups[verdict]
        if not members:
            continue
        print(f"\n{HEADINGS[verdict]} ({len(members)})")
        if verdict in ("bound", "ignored") and not show_all:
            print("  (--all lists them)")
            continue
        reasons = {v.reason for _, v in members}
        shared = reasons.pop() if len(reasons) == 1 else None
        if shared:
            print(f"  why: {safe(shared)}")
        rows = []
        for d, v in members:
            what = (f"{v.candidates[0].module} in {v.candidates[0].package} {v.candidates[0].version}" if v.candidates
                    else ", ".join(v.installed_modules) or d.driver or "-")
            rows.append((safe(d.id, 60), safe(d.modalias, 56), safe(what)) + (() if shared else (safe(v.reason),)))
        print(table(rows))
        print(_next_step(verdict, [v for _, v in members], env))


def _next_step(verdict, verdicts, env) -> str:
    if verdict == "missing":
        requests = list(dict.fromkeys(v.candidates[0].request for v in verdicts))
        if not env.can_install:
            return "  next: nothing can be installed here; see the note above."
        return f"  next: {install_command(env.package_manager, requests)}"
    if verdict == "loadable":
        mods = list(dict.fromkeys(next(m for m in v.installed_modules if m not in v.blacklisted)
                                  for v in verdicts if v.installed_modules and not v.builtin))
        return f"  next: sudo modprobe -a {' '.join(mods)}  (then check 'dmesg' if it stays unbound)" if mods else \
            "  next: check 'dmesg': a built-in driver refused the device"
    if verdict == "unindexed":
        return "  next: index the kernel's module packages: kmodguard index build --help"
    return ""


# --- explain ------------------------------------------------------------------------------

def _read_modaliases(items: list[str]) -> list[str]:
    out = []
    for item in items:
        if item == "-":
            data = sys.stdin.buffer.read()
            for n, raw in enumerate(data.split(b"\n"), 1):
                line = raw.decode("utf-8", "surrogateescape").strip()
                if line and not line.startswith("#"):
                    out.append(_checked(line, f"stdin line {n}"))
        else:
            out.append(_checked(item, f"argument {item[:40]!r}"))
    return out


def _checked(value: str, where: str) -> str:
    try:
        return check_modalias(value)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}") from None


def explain(args) -> int:
    modaliases = _read_modaliases(args.modaliases)
    paths = make_paths(args)
    engine = Engine(paths)
    env, diagnoser = engine.env, engine.diagnoser
    doc, verdicts = engine.explain_document(modaliases)
    results = list(zip(modaliases, verdicts))
    if args.json:
        emit_json(doc)
    else:
        for note in _notes(paths, env, diagnoser):
            print(note, file=sys.stderr)
        for m, v in results:
            print(f"{safe(m)}\n  {v.verdict}: {safe(v.reason)}")
            for c in v.candidates:
                extra = f"; firmware absent: {len(c.firmware_missing)}" if c.firmware_missing else ""
                print(f"  candidate: {c.module} in {c.package} {c.version} (install: {c.request}){extra}")
        missing = [v for _, v in results if v.verdict == "missing"]
        if missing:
            print(_next_step("missing", missing, env))
    return _exit_for(v for _, v in results)


# --- index --------------------------------------------------------------------------------

def index_build(args) -> int:
    from ..index import build as builder

    paths = make_paths(args)
    kver = args.kver
    built = []
    if args.from_dir:
        if not args.package:
            raise InvalidInput("--from-dir needs --package NAME (and usually --version and --request)")
        kver = kver or paths.kver
        version = args.pkg_version or ""
        request = args.request or (f"{args.package} = {version}" if version else args.package)
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

        from ..index import rpmfile

        # Read every file first: one bad RPM in the list leaves every index as it was.
        with contextlib.ExitStack() as stack:
            sources = []
            for f in args.from_rpm:
                progress(f"reading {f}")
                sources.append(stack.enter_context(rpmfile.extracted(Path(f), kver)))
            for source, pkg_kver in sources:
                progress(f"indexing {source.name} {source.version} for kernel {pkg_kver}")
                built.append(builder.build_package(paths.index_root, pkg_kver, source, progress))
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
    from ..index.store import KernelIndex

    idx = KernelIndex(root, kver)
    return {
        "kernel": kver,
        "packages": [p.summary() for p in idx.packages if not only or p.name in only],
        "errors": [{"package": n, "message": e.message} for n, e in idx.errors.items() if not only or n in only],
    }


def index_list(args) -> int:
    from ..index.store import kernels

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
        from ..index.store import KernelIndex

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


def index_remove(args) -> int:
    from ..index.store import remove

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


# --- fix ----------------------------------------------------------------------------------

def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n / 1024:.0f} KiB"


def _print_plan(plan, env) -> None:
    if not plan.devices:
        print("nothing to fix: no device needs a package or a module")
        return
    for d in plan.devices:
        extra = f" (needed at boot: {d.boot_critical})" if d.boot_critical else ""
        print(f"  {safe(d.id, 60)}: {d.action}: {safe(d.reason)}{extra}")
    if plan.install:
        print("install (one transaction):")
        for p in plan.install:
            sizes = f"  download {_size(p.download_size)}, installed {_size(p.installed_size)}" \
                if p.download_size or p.installed_size else ""
            print(f"  {p.request}  ({p.package} {p.version}){sizes}")
    if plan.load:
        print(f"load: {' '.join(plan.load)}")
    i = plan.initramfs
    print(f"initramfs: {'rebuild by ' + i.by if i.rebuild else 'unchanged'}: {i.reason}")
    if plan.blocked:
        print(f"Note: {plan.blocked}: nothing will be installed or loaded.")
        if env.image_mode and plan.install:
            layer = " ".join(shlex.quote(p.request) for p in plan.install)
            print(f"To add the drivers to this image: sudo rpm-ostree install {layer} && sudo systemctl reboot")


def fix(args) -> int:
    from ..engine.state import read_snapshot

    paths = make_paths(args)
    if args.request:
        return _fix_request(args, paths)
    if not args.dry_run and not args.local:
        daemon = read_snapshot(paths.snapshot)
        if daemon and daemon.get("bus"):
            return _fix_through_daemon(args, paths)
    if not args.dry_run and os.geteuid() != 0:
        from ..errors import NotAuthorized

        raise NotAuthorized("fixing devices installs packages and loads modules: run it as root",
                            hint="'kmodguard fix --dry-run' shows the plan without root")
    engine = Engine(paths)
    plan = engine.plan(engine.judge(engine.select(args.devices)))
    backend = None
    asks = not args.yes and not args.json
    if plan.install and (args.dry_run or asks or plan.blocked):  # sizes for a person to decide on
        backend = engine.backend(args.backend)
        plan = engine.with_sizes(plan, backend, progress)
    if args.dry_run or not plan.needs_action or plan.blocked:
        if args.json:
            emit_json(plan.as_json())
        else:
            _print_plan(plan, engine.env)
        return ExitCode.ACTION_NEEDED if plan.needs_action else ExitCode.OK
    if not args.yes and not _confirmed(plan, engine.env):
        return ExitCode.ACTION_NEEDED
    code, doc = engine.run_fix(plan, backend or engine.backend(args.backend), progress)
    _print_fix(doc, args.json)
    return code


def _confirmed(plan, env) -> bool:
    if not sys.stdin.isatty():
        raise InvalidInput("refusing to change the system without --yes when not asked on a terminal")
    _print_plan(plan, env)
    if input("Proceed? [y/N] ").strip().lower() in ("y", "yes"):
        return True
    print("nothing done")
    return False


def _print_fix(doc: dict, as_json: bool) -> None:
    if as_json:
        emit_json(doc)
        return
    for o in doc["outcomes"]:
        print(f"{safe(o['id'], 60)}: {o['outcome']}: {safe(o['reason'])}")


def _fix_request(args, paths) -> int:
    """The fix the daemon asked for (kmodguard-fix.service, or the daemon's child process):
    devices and per-fix options from the request file, which is removed once the fix has run to
    its end, whatever the outcome; a request left behind by a kill is resumed by the daemon."""
    from .. import config as config_mod
    from ..engine import state

    if args.devices or args.dry_run:
        raise InvalidInput("--request names the devices itself; it does not go with DEVICE or --dry-run")
    request = state.read_request(Path(args.request))
    if request["kernel"] != paths.kver:
        if args.kver:
            raise InvalidInput(f"{args.request} is a fix for kernel {request['kernel']}, not {args.kver}")
        paths = paths.with_kver(request["kernel"])  # the daemon judged that kernel's devices
    policy = config_mod.with_overrides(config_mod.load(paths.config_dir), request["overrides"],
                                       where=f"{args.request}: overrides")
    engine = Engine(paths, policy)
    devices = engine.select(request["devices"], missing_ok=True) if request["devices"] else []
    plan = engine.plan(engine.judge(devices))
    try:
        if plan.blocked or not plan.needs_action:
            report = {**plan.as_json(), "steps": [], "outcomes": []}
            state.record_fix(paths.state_dir, {"id": request["id"], "requested_by": request.get("requested_by"),
                                               "devices": request["devices"], "exit_code": int(ExitCode.OK),
                                               "report": report, "nothing_to_do": True})
            _print_fix(report, args.json)
            return ExitCode.OK
        code, doc = engine.run_fix(plan, engine.backend(args.backend), progress, request=request)
        _print_fix(doc, args.json)
        return code
    finally:
        state.finish_request(paths.state_dir, request["id"])


def _fix_through_daemon(args, paths) -> int:
    """A daemon runs: it does the fix (and authorizes the caller, root or polkit) so that two
    remediations never race and the transaction survives this command being interrupted."""
    from . import client

    if args.json and not args.yes:
        raise InvalidInput("--json needs --yes: a fix that asks first prints no JSON")
    if not args.yes:
        engine = Engine(paths)
        plan = engine.plan(engine.judge(engine.select(args.devices)))
        if not plan.needs_action or plan.blocked:
            _print_plan(plan, engine.env)
            return ExitCode.ACTION_NEEDED if plan.needs_action else ExitCode.OK
        if not _confirmed(plan, engine.env):
            return ExitCode.ACTION_NEEDED
    options = {"backend": args.backend} if args.backend else {}
    code, doc = client.fix(args.devices, options, progress)
    _print_fix(doc, args.json)
    return code


# --- daemon -------------------------------------------------------------------------------

def daemon(args) -> int:
    from ..daemon import run

    return run(make_paths(args), use_bus=not args.no_bus)
