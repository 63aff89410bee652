"""What every command family shares: the paths asked for, exit codes from verdicts, back-off lines."""

from __future__ import annotations

from ...errors import ExitCode
from ...paths import Paths
from ..output import safe


def make_paths(args) -> Paths:
    return Paths.from_environment(
        kver=args.kver, modules_dir=args.modules_dir, index_dir=args.index_dir, config_dir=args.config_dir,
    )


def _exit_for(verdicts) -> int:
    from ...engine.api import needs_action

    return ExitCode.ACTION_NEEDED if needs_action(verdicts) else ExitCode.OK


def _print_backing_off(backing: list[dict]) -> None:
    """A line per device that waits out a back-off after a failed fix (`fix` leaves it out until then)."""
    for b in backing:
        print(f"{safe(b['id'], 60)}: backing off after {b.get('failures', 1)} failed fix(es) until {b['until']}"
              f" ('kmodguard fix {safe(b['id'], 60)}' tries now): {safe(b.get('reason'), 200)}")


def _judged_and_backing_off(engine, refs: list[str]) -> tuple[list, list[dict]]:
    """The devices to plan for, judged (the named ones, else every device not backing off), and
    the back-off lines (see _backing_off): every device is enumerated and judged once for both."""
    if refs:
        return engine.judge(engine.select(refs)), []
    every = engine.judge(engine.select([], honour_backoff=False))
    return engine.without_backing_off(every), engine.backing_off(every)


def _backing_off(engine, refs: list[str]) -> list[dict]:
    """Devices left out (no device named) because they back off after a failed fix."""
    if refs:
        return []  # named devices are tried even while they back off
    return engine.backing_off(engine.judge(engine.select([], honour_backoff=False)))


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n / 1024:.0f} KiB"
