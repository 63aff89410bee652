"""`status` and `explain`: judge devices or modaliases and print the verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

from ...engine.diagnosis import MAX_MODALIAS, check_modalias  # both commands judge: the engine loads anyway
from ...errors import ExitCode, InvalidInput
from ..output import HEADINGS, ORDER, emit_json, emit_json_results, install_command, safe, table
from ._common import _exit_for, _print_backing_off, make_paths


def status(args) -> int:
    from ...devices import enumerate_devices
    from ...engine.api import Engine
    from ...engine.state import read_snapshot

    paths = make_paths(args)
    engine = Engine(paths, meanwhile=enumerate_devices)
    judged = engine.judge(engine.meanwhile_result)
    if args.output and not args.prometheus:
        raise InvalidInput("--output goes with --prometheus")
    if args.prometheus:
        from ..metrics import exposition

        text = exposition(engine, judged, read_snapshot(paths.snapshot))
        if args.output:
            from ...fsutil import write_atomic

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
    try:
        return check_modalias(value)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}") from None


def explain(args) -> int:
    from ...engine.api import Engine

    modaliases = _read_modaliases(args.modaliases)
    paths = make_paths(args)
    engine = Engine(paths)
    env, diagnoser = engine.env, engine.diagnoser
    bodies, verdicts = engine.explain_results(modaliases)
    results = list(zip(modaliases, verdicts))
    if args.json:  # the document of engine.explain_document, written without encoding a shared verdict twice
        emit_json_results({"kernel": paths.kver}, "results", "modalias", bodies)
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
