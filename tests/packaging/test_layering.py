"""The import layering, read from the source: the binding at the bottom, then the index and the
backends, then the engine, and the fronts (CLI, daemon, dnf plugin) on top, which only parse,
authorize, relay and print. An import against these rules fails here, naming the file.

    .venv/bin/python -m pytest -q tests/packaging/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kmodguard"
FRONTS = {"cli", "daemon", "integrations"}
# part -> the parts of kmodguard it must never import
FORBIDDEN = {
    "kmod": {"index", "backends", "engine", "initramfs", "devices", "dbus", "config"} | FRONTS,
    "index": {"engine", "initramfs", "dbus"} | FRONTS,
    "backends": {"engine", "index", "initramfs", "devices"} | FRONTS,
    "initramfs": {"engine", "backends", "index", "dbus"} | FRONTS,
    "engine": {"dbus"} | FRONTS,
    "journal": {"engine", "backends", "index", "initramfs", "dbus"} | FRONTS,
    "daemon": {"cli", "integrations"},
    "integrations": {"cli", "daemon"},
}
# the one front that starts another: `kmodguard daemon` runs it (kmodguard.daemon.run)
ALLOWED = {("cli", "daemon")}


def imports(path: Path) -> set[str]:
    """The kmodguard modules a file imports (absolute names), whether at the top or in a function."""
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])  # a module's package; __init__'s own
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{name}.{a.name}" for a in node.names)
            found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n == "kmodguard" or n.startswith("kmodguard.")}


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def test_every_import_keeps_the_layering():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for target in imports(path):
            theirs = part(target)
            if theirs in FORBIDDEN.get(mine, set()) and (mine, theirs) not in ALLOWED:
                broken.append(f"{path.relative_to(PACKAGE.parent)} imports {target}")
    assert not broken, "\n".join(broken)


def test_the_cli_reaches_the_daemon_only_to_run_it():
    commands = PACKAGE / "cli"
    used = {t for f in commands.rglob("*.py") for t in imports(f) if part(t) == "daemon"}
    assert used <= {"kmodguard.daemon", "kmodguard.daemon.run"}, used


def test_the_rules_see_real_imports():
    """The scan itself: it finds the engine's imports of the backends and of the binding."""
    found = imports(PACKAGE / "engine" / "remediate.py")
    assert "kmodguard.backends" in found and "kmodguard.kmod" in found


def test_only_kmodguard_dbus_imports_the_library():
    pkg = PACKAGE
    offenders = []
    for path in pkg.rglob("*.py"):
        if path == pkg / "dbus.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(n.split(".")[0] in ("dbus_next", "dbus_fast", "dbus") for n in names):
                offenders.append(str(path))
    assert offenders == []
