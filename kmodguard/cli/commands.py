"""The commands behind the parser. Each returns an exit code."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ..errors import ExitCode, InvalidInput
from ..paths import Paths
from .output import HEADINGS, ORDER, emit_json, install_command, progress, safe, table

# The engine (config, devices, diagnosis, libkmod, the environment probe) is imported by the
# commands that judge or plan, not here: `index build` starts depmod as early as it can, and
# the engine was 7 ms of its start.


def make_paths(args) -> Paths:
    return Paths.from_environment(
        kver=args.kver, modules_dir=args.modules_dir, index_dir=args.index_dir, config_dir=args.config_dir,
    )


def _exit_for(verdicts) -> int:
    from ..engine.api import needs_action

    return ExitCode.ACTION_NEEDED if needs_action(verdicts) else ExitCode.OK


# --- status -------------------------------------------------------------------------------

def status(args) -> int:
    from ..devices import enumerate_devices
    from ..engine.api import Engine
    from ..engine.state import read_snapshot

    paths = make_paths(args)
    engine = Engine(paths, meanwhile=enumerate_devices)
    judged = engine.judge(engine.meanwhile_result)
    if args.output and not args.prometheus:
        raise InvalidInput("--output goes with --prometheus")
    if args.prometheus:
        from .metrics import exposition

        text = exposition(engine, judged, read_snapshot(paths.snapshot))
        if args.output:
            from ..fsutil import write_atomic

            write_atomic(Path(args.output), text.encode(), 0o644)
        else:
            sys.stdout.write(text)
    elif args.json:
        emit_json(engine.status_document(judged, read_snapshot(paths.snapshot)))
    else:
        _print_status(paths, engine.env, engine.diagnoser, judged, show_all=args.all,
                      daemon=read_snapshot(paths.snapshot))
        _print_backing_off(engine.backing_off(judged))
    code = _exit_for(v for _, v in judged)
    return code if code != ExitCode.OK or not engine.backing_off(judged) else ExitCode.ACTION_NEEDED


def _print_backing_off(backing: list[dict]) -> None:
    """A line per device that waits out a back-off after a failed fix (`fix` leaves it out until then)."""
    for b in backing:
        print(f"{safe(b['id'], 60)}: backing off after {b.get('failures', 1)} failed fix(es) until {b['until']}"
              f" ('kmodguard fix {safe(b['id'], 60)}' tries now): {safe(b.get('reason'), 200)}")


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


def _print_status(paths, env, diagnoser, judged, show_all: bool, daemon: dict | None = None) -> None:
    print(f"kmodguard: kernel {paths.kver}, {len(judged)} devices with a modalias")
    if daemon:
        last = daemon.get("last_fix") or {}
        fix = (f"; last fix {last.get('id')} ended with exit {last.get('exit_code')}" if last else "")
        print(f"daemon: running since {daemon.get('since')}, mode {daemon.get('mode')}"
              + ("; a fix is running" if daemon.get("fix_running") else "") + fix)
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
            what = (_candidate_text(v.candidates[0]) if v.candidates
                    else ", ".join(v.installed_modules) or d.driver or "-")
            rows.append((safe(d.id, 60), safe(d.modalias, 56), safe(what)) + (() if shared else (safe(v.reason),)))
        print(table(rows))
        print(_next_step(verdict, [v for _, v in members], env))


def _candidate_text(c) -> str:
    if c.module is None:  # a repository's metadata names the package, not its module
        return f"{c.package} {c.version} (its repository announces it)"
    return f"{c.module} in {c.package} {c.version}"


def _next_step(verdict, verdicts, env) -> str:
    if verdict == "missing":
        # the module package, and the firmware packages its module needs (asked for by name)
        requests = list(dict.fromkeys(r for v in verdicts for r in (
            v.candidates[0].request, *(v.candidates[0].firmware.names if v.candidates[0].firmware else ()))))
        if not env.can_install:
            return "  next: nothing can be installed here; see the note above."
        return f"  next: {install_command(env.package_manager, requests)}"
    if verdict == "loadable":
        firmware = list(dict.fromkeys(n for v in verdicts if v.firmware for n in v.firmware.names))
        if firmware:
            return (f"  next: {install_command(env.package_manager, firmware)} (firmware), then "
                    "'sudo kmodguard fix' loads the modules and re-probes the devices; or just 'sudo kmodguard fix'")
        mods = list(dict.fromkeys(next(m for m in v.installed_modules if m not in v.blacklisted)
                                  for v in verdicts if v.installed_modules and not v.builtin))
        return f"  next: sudo modprobe -a {' '.join(mods)}  (then check 'dmesg' if it stays unbound)" if mods else \
            "  next: check 'dmesg': a built-in driver refused the device"
    if verdict == "unindexed":
        return "  next: index the kernel's module packages: kmodguard index build --help"
    return ""


# --- explain ------------------------------------------------------------------------------

MAX_STDIN_LINES = 1_000_000  # explain reads a list, not a stream: /dev/zero or `yes` must end


def _read_modaliases(items: list[str]) -> list[str]:
    out = []
    for item in items:
        if item == "-":
            out += _stdin_modaliases()
        else:
            out.append(_checked(item, f"argument {item[:40]!r}"))
    return out


def _stdin_modaliases() -> list[str]:
    """One modalias a line ('#' comments); a line is refused as soon as it is too long, before
    the rest of it is read."""
    from ..engine.diagnosis import MAX_MODALIAS

    out = []
    stdin = sys.stdin.buffer
    for n in range(1, MAX_STDIN_LINES + 2):
        raw = stdin.readline(MAX_MODALIAS + 2)
        if not raw:
            return out
        if n > MAX_STDIN_LINES:
            raise InvalidInput(f"stdin has more than {MAX_STDIN_LINES} lines", hint="split the list")
        if len(raw) > MAX_MODALIAS + 1 or (len(raw) == MAX_MODALIAS + 1 and not raw.endswith(b"\n")):
            raise InvalidInput(f"stdin line {n}: longer than {MAX_MODALIAS} bytes; the kernel never writes "
                               "a longer modalias")
        line = raw.decode("utf-8", "surrogateescape").strip(" \t\r\n")  # other control bytes: refused
        if line and not line.startswith("#"):
            out.append(_checked(line, f"stdin line {n}"))
    return out


def _checked(value: str, where: str) -> str:
    from ..engine.diagnosis import check_modalias

    try:
        return check_modalias(value)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}") from None


def explain(args) -> int:
    from ..engine.api import Engine

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
                extra = f"; {safe(c.firmware.sentence())}" if c.firmware else ""
                print(f"  candidate: {_candidate_text(c)} (install: {c.request}){extra}")
        missing = [v for _, v in results if v.verdict == "missing"]
        if missing:
            print(_next_step("missing", missing, env))
    return _exit_for(v for _, v in results)


# --- index --------------------------------------------------------------------------------

def index_build(args) -> int:
    from .. import requests
    from ..index import build as builder

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

        from ..index import rpmfile

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


def index_fetch(args) -> int:
    from ..engine.api import Engine
    from ..index.fetch import fetch

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
    from ..index.build import derive
    from ..paths import running_kernel

    paths = make_paths(args)
    old = args.from_kver or running_kernel()
    if old == paths.kver:
        raise InvalidInput(f"--kver {paths.kver} is the kernel to derive from: name the new kernel with --kver")
    from .. import config as config_mod

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


def _backing_off(engine, refs: list[str]) -> list[dict]:
    """Devices left out (no device named) because they back off after a failed fix."""
    if refs:
        return []  # named devices are tried even while they back off
    return engine.backing_off(engine.judge(engine.select([], honour_backoff=False)))


def _print_plan(plan, env, backing: list[dict] = ()) -> None:
    _print_backing_off(list(backing))
    if not plan.devices:
        if not backing:
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
            what = f"; firmware for {', '.join(p.for_modules)}" if p.kind == "firmware" else ""
            print(f"  {p.request}  ({p.package} {p.version}{what}){sizes}")
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
    from ..engine.api import Engine
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
    engine = Engine(paths, online=True)
    plan = engine.plan(engine.judge(engine.select(args.devices)))
    backing = _backing_off(engine, args.devices)
    backend = None
    asks = not args.yes and not args.json
    if plan.install and (args.dry_run or asks or plan.blocked):  # sizes for a person to decide on
        backend = engine.backend(args.backend)
        plan = engine.with_sizes(plan, backend, progress)
    if args.dry_run or not plan.needs_action or plan.blocked:
        if args.json:
            emit_json({**plan.as_json(), "backing_off": backing})
        else:
            _print_plan(plan, engine.env, backing)
        return ExitCode.ACTION_NEEDED if plan.needs_action or backing else ExitCode.OK
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
    """The fix the daemon asked for (kmodguard-fix.service, or the daemon's child process): root
    only; the workflow (lock, take, judge again, run, record) is engine.fixing.run_request's."""
    from ..engine import fixing

    if args.devices or args.dry_run:
        raise InvalidInput("--request names the devices itself; it does not go with DEVICE or --dry-run")
    if os.geteuid() != 0:
        from ..errors import NotAuthorized

        raise NotAuthorized("'kmodguard fix --request' runs a fix the daemon asked for: only root may run it",
                            hint="'sudo kmodguard fix' asks the daemon for a fix")
    from .output import outlive_the_reader

    outlive_the_reader()  # a daemon restarted meanwhile no longer reads our output: go on regardless
    code, report = fixing.run_request(paths, Path(args.request), args.backend, progress, kver_asked=bool(args.kver))
    if report is not None:
        _print_fix(report, args.json)
    return code


def _fix_through_daemon(args, paths) -> int:
    """A daemon runs: it does the fix (and authorizes the caller, root or polkit) so that two
    remediations never race and the transaction survives this command being interrupted."""
    from ..engine.api import Engine
    from . import client

    if args.json and not args.yes:
        raise InvalidInput("--json needs --yes: a fix that asks first prints no JSON")
    if not args.yes:
        engine = Engine(paths, online=True)
        plan = engine.plan(engine.judge(engine.select(args.devices)))
        if not plan.needs_action or plan.blocked:
            backing = _backing_off(engine, args.devices)
            _print_plan(plan, engine.env, backing)
            return ExitCode.ACTION_NEEDED if plan.needs_action or backing else ExitCode.OK
        if not _confirmed(plan, engine.env):
            return ExitCode.ACTION_NEEDED
    options = {"backend": args.backend} if args.backend else {}
    code, doc = client.fix(args.devices, options, progress)
    backing = [] if args.devices else _backing_off(Engine(paths), [])
    if backing:
        doc = {**doc, "backing_off": backing}
        if not args.json:
            _print_backing_off(backing)
        if code == ExitCode.OK:
            code = ExitCode.ACTION_NEEDED  # not "nothing to do": these wait out a back-off
    _print_fix(doc, args.json)
    return code


# --- daemon -------------------------------------------------------------------------------

def daemon(args) -> int:
    from ..daemon import run

    return run(make_paths(args), use_bus=not args.no_bus)


# --- check --------------------------------------------------------------------------------

def check(args) -> int:
    from ..devices import enumerate_devices
    from ..paths import running_kernel

    paths = make_paths(args)
    if args.removal and args.kver and args.kver != running_kernel():
        raise InvalidInput("--removal judges the running kernel's devices; it does not go with --kver")
    if args.apply_policy and (args.removal or (args.kver and args.kver != running_kernel())):
        raise InvalidInput("--apply-policy acts on the machine as it is now: not with --removal or another --kver")
    if args.initramfs and not (args.kver and args.kver != running_kernel()):
        raise InvalidInput("--initramfs names a new kernel's image: it goes with --kver NEW")
    if args.removal:
        return _check_removal(args, paths, enumerate_devices())
    if args.kver and args.kver != running_kernel():
        return _check_kernel(args, paths, enumerate_devices())
    return _check_now(args, paths, enumerate_devices())


def _check_now(args, paths, devices) -> int:
    from ..engine.api import Engine, device_json

    engine = Engine(paths)
    judged = engine.judge(devices)
    plan = engine.plan(judged, boot_critical=False)
    need = [(d, v) for d, v in judged if v.verdict in ("missing", "loadable")]
    applied = _apply_policy(engine, plan, need) if args.apply_policy else None
    if args.json:
        emit_json({"kernel": paths.kver, "mode": engine.policy.mode,
                   "devices": [device_json(d, v) for d, v in need], "applied": applied})
    elif need:
        print(f"kmodguard check: {len(need)} device(s) need a driver on kernel {paths.kver}:")
        print(table([(safe(d.id, 60), v.verdict, safe(v.reason)) for d, v in need]))
        if applied:
            print(f"done: {applied['action']}: {safe(applied['detail'])}")
        else:
            print("next: 'kmodguard fix --dry-run' shows the plan; 'sudo kmodguard fix' carries it out")
    else:
        print(f"kmodguard check: every device with a modalias is served or left alone on purpose ({paths.kver})")
    if applied and applied.get("exit_code") not in (None, 0):
        return applied["exit_code"]
    return _exit_for(v for _, v in need)


def _apply_policy(engine, plan, need) -> dict:
    from ..engine.fixing import apply_mode
    from . import client

    return apply_mode(engine, plan, need, progress, client.fix)


def _check_kernel(args, paths, devices) -> int:
    from ..engine.api import Engine
    from ..engine.lifecycle import kernel_change

    from ..paths import running_kernel

    now = Engine(paths.with_kver(running_kernel()))
    paths = paths._replace(modules_dir=None)  # KMODGUARD_MODULES_DIR is the running kernel's tree
    new = Engine(paths, now.policy, now.env._replace(
        modules_dir=paths.installed_modules,
        modules_dir_present=(paths.installed_modules / "modules.dep.bin").exists()))
    doc = kernel_change(now, new, devices, args.initramfs)
    _warn_initramfs(doc, args.notify)
    if args.notify:
        _notify_kernel_change(paths, doc)
    if args.json:
        emit_json(doc)
    else:
        _print_kernel_change(doc)
    return ExitCode.ACTION_NEEDED if doc["loses_driver"] or doc["initramfs"]["lacks_driver"] else ExitCode.OK


def _warn_initramfs(doc, notify: bool) -> None:
    """A warning in the journal for each device needed at boot whose driver the new kernel's
    initramfs lacks, naming the device, the module and the kernel (MESSAGE_ID initramfs-lacks-driver).
    Under systemd (JOURNAL_STREAM) through the log; otherwise, with --notify (the kernel-install
    plugin, whose output is the package manager's, not the journal's), sent to the journal
    directly; and always on stderr when there is no journal to take it."""
    import logging

    from ..journal import fields

    init = doc["initramfs"]
    log = logging.getLogger("kmodguard.check")
    for d in init["devices"]:
        if d["id"] not in init["lacks_driver"]:
            continue
        message = (f"the initramfs of kernel {init['kernel']} ({init['image']}) lacks {d['module']}, the driver of "
                   f"{d['id']} ({d['needed_because']}): kernel {init['kernel']} may not mount its root")
        extra = fields("initramfs-lacks-driver", device=d["syspath"], module=d["module"],
                       kmodguard_kernel=init["kernel"], kmodguard_initramfs=init["image"])
        if os.environ.get("JOURNAL_STREAM") or not notify:
            log.warning(message, extra=extra)
            continue
        try:
            from systemd import journal

            journal.send(message, PRIORITY="4", SYSLOG_IDENTIFIER="kmodguard", **extra)
        except (ImportError, OSError):
            log.warning(message, extra=extra)


def _notify_kernel_change(paths, doc) -> None:
    """The journal, and a MOTD fragment of its own (the daemon's is about the running kernel)."""
    import logging

    from ..engine.offer import write_motd

    lost = [d for d in doc["devices"] if d["loses_driver"]]
    path = paths.motd_dir / "kmodguard-kernel"
    init = doc["initramfs"]
    boot = (f"kmodguard: WARNING: the initramfs of kernel {doc['kernel']} ({init['image']}) lacks the driver of "
            f"{', '.join(init['lacks_driver'])}, needed to mount the root: rebuild it before rebooting "
            f"(dracut -f --kver {doc['kernel']}) once the driver is installed for that kernel.\n"
            if init["lacks_driver"] else "")
    if not lost:
        write_motd(path, boot or None)
        return
    log = logging.getLogger("kmodguard.check")
    for d in lost:
        log.warning("under kernel %s, %s would have no driver (%s)", doc["kernel"], d["id"], d["reason_after"],
                    extra={"DEVICE": d["syspath"], "MODALIAS": d["modalias"], "KMODGUARD_KERNEL": doc["kernel"]})
    requests = " ".join(f"'{i['request']}'" for i in doc["install"])
    text = (f"kmodguard: under kernel {doc['kernel']}, {len(lost)} device(s) would have no driver: "
            f"{', '.join(d['id'] for d in lost[:6])}{' ...' if len(lost) > 6 else ''}.\n"
            + (f"Install before rebooting into it: {requests}\n" if requests else
               f"Run 'kmodguard check --kver {doc['kernel']}' for details.\n"))
    write_motd(path, text + boot)


def _print_kernel_change(doc) -> None:
    kver, lost = doc["kernel"], [d for d in doc["devices"] if d["loses_driver"]]
    if not doc["environment"]["modules_dir_present"]:
        print(f"Note: kernel {kver} has no module tree at {doc['environment']['modules_dir']} (not installed yet?): "
              "only built-in drivers and the index can be asked.")
    init = doc["initramfs"]
    for d in init["devices"]:
        if d["id"] in init["lacks_driver"]:
            print(f"WARNING: the initramfs of kernel {kver} ({init['image']}) lacks {safe(d['module'])}, the driver "
                  f"of {safe(d['id'], 60)} ({safe(d['needed_because'])}): kernel {kver} may not mount its root. "
                  f"Install the driver for {kver}, then: dracut -f --kver {kver}")
    if not init["checked"] and init["needed_at_boot"]:
        print(f"Note: the initramfs of kernel {kver} was not checked: {safe(init['reason'])}")
    if not lost:
        print(f"kmodguard check: under kernel {kver}, every device that has a driver now keeps one "
              f"({len(doc['devices'])} checked)")
        return
    print(f"kmodguard check: under kernel {kver}, {len(lost)} device(s) would have no driver:")
    rows = []
    for d in lost:
        now = d["driver"] or (d["installed_modules"][0] if d["installed_modules"] else "-")
        after = (f"{d['candidates_after'][0]['module']} in {d['candidates_after'][0]['package']} "
                 f"{d['candidates_after'][0]['version']} (not installed for it)" if d["candidates_after"]
                 else safe(d["reason_after"]))
        rows.append((safe(d["id"], 60), f"now {safe(now)}", after))
    print(table(rows))
    if doc["install"]:
        print("next: install before rebooting into it: "
              + " ".join(shlex.quote(i["request"]) for i in doc["install"]))


def _check_removal(args, paths, devices) -> int:
    from ..engine.api import Engine
    from ..engine.lifecycle import removal

    engine = Engine(paths)
    doc = removal(engine, devices, args.removal)
    if args.json:
        emit_json(doc)
    elif not doc["loses_driver"]:
        extra = f" ({len(doc['devices'])} would keep another matching module)" if doc["devices"] else ""
        print(f"kmodguard check: removing {' '.join(args.removal)} takes no device's driver{extra}")
    else:
        print(f"kmodguard check: removing {' '.join(args.removal)} would leave {len(doc['loses_driver'])} "
              "device(s) without a driver:")
        print(table([(safe(d["id"], 60), d["verdict"], ", ".join(d["modules_lost"]))
                     for d in doc["devices"] if d["loses_driver"]]))
        print("next: keep the package, or accept that these devices stop working after a reboot or a re-probe")
    return ExitCode.ACTION_NEEDED if doc["loses_driver"] else ExitCode.OK


# --- config -------------------------------------------------------------------------------

def config_check(args) -> int:
    from .. import config as config_mod

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


# --- footprint ----------------------------------------------------------------------------

def footprint(args) -> int:
    from ..devices import enumerate_devices
    from ..engine.api import Engine
    from ..engine.footprint import footprint as measure

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
