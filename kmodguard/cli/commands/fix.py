"""`fix`: the plan, asked for or carried out, here as root, through the daemon, or for a daemon's request."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ...errors import ExitCode, InvalidInput
from ..output import emit_json, progress, safe
from ._common import _backing_off, _judged_and_backing_off, _print_backing_off, _size, make_paths


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
    from ...engine.api import Engine
    from ...engine.state import read_snapshot

    paths = make_paths(args)
    if args.request:
        return _fix_request(args, paths)
    if not args.dry_run and not args.local:
        daemon = read_snapshot(paths.snapshot)
        if daemon and daemon.get("bus"):
            return _fix_through_daemon(args, paths)
    if not args.dry_run and os.geteuid() != 0:
        from ...errors import NotAuthorized

        raise NotAuthorized("fixing devices installs packages and loads modules: run it as root",
                            hint="'kmodguard fix --dry-run' shows the plan without root")
    engine = Engine(paths, online=True)
    judged, backing = _judged_and_backing_off(engine, args.devices)
    plan = engine.plan(judged)
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
    from ...engine import fixing

    if args.devices or args.dry_run:
        raise InvalidInput("--request names the devices itself; it does not go with DEVICE or --dry-run")
    if os.geteuid() != 0:
        from ...errors import NotAuthorized

        raise NotAuthorized("'kmodguard fix --request' runs a fix the daemon asked for: only root may run it",
                            hint="'sudo kmodguard fix' asks the daemon for a fix")
    from ..output import outlive_the_reader

    outlive_the_reader()  # a daemon restarted meanwhile no longer reads our output: go on regardless
    code, report = fixing.run_request(paths, Path(args.request), args.backend, progress, kver_asked=bool(args.kver))
    if report is not None:
        _print_fix(report, args.json)
    return code


def _fix_through_daemon(args, paths) -> int:
    """A daemon runs: it does the fix (and authorizes the caller, root or polkit) so that two
    remediations never race and the transaction survives this command being interrupted."""
    from ...engine.api import Engine
    from .. import client

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
