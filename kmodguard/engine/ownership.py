"""Which installed package owns a module file: asked of the root's own package database (dpkg when
ROOT/var/lib/dpkg/status exists, rpm otherwise: an RPM image built on a Debian host is rpm's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import InvalidInput, KmodguardError


def _inside(root: Path, path: str) -> str:
    """A path as the package database of ROOT knows it (/lib/modules/...)."""
    root_s = str(root).rstrip("/")
    if root_s and path.startswith(root_s + "/"):
        return path[len(root_s):]
    return path


def _rpm(root: Path) -> list[str]:
    rpm = shutil.which("rpm") or "rpm"
    return [rpm, "--root", str(root)] if Path(root) != Path("/") else [rpm]


def _dpkg(root: Path) -> bool:
    return (Path(root) / "var/lib/dpkg/status").is_file()


def owners(paths: list[str], root: Path = Path("/"), full: bool = False) -> dict[str, str | None]:
    """{path: name of the installed package that owns it (full: name-version-release), or None}."""
    if not paths:
        return {}
    inside = {p: _inside(root, p) for p in paths}
    env = {**os.environ, "LC_ALL": "C"}
    if _dpkg(root):
        out = {p: None for p in paths}
        res = subprocess.run(["dpkg-query", f"--admindir={Path(root) / 'var/lib/dpkg'}", "-S", *inside.values()],
                             capture_output=True, text=True, env=env, timeout=120)
        by_file = {}
        for line in res.stdout.splitlines():
            pkgs, _, file = line.partition(": ")
            by_file[file.strip()] = pkgs.split(",")[0].split(":")[0].strip()
        return {p: by_file.get(inside[p]) for p in out}
    qf = "%{NAME}-%{VERSION}-%{RELEASE}\\n" if full else "%{NAME}\\n"
    res = subprocess.run([*_rpm(root), "-qf", "--qf", qf, *inside.values()], capture_output=True, text=True,
                         env=env, timeout=120)
    # rpm answers one line per path, in order ("file X is not owned by any package" for strays)
    lines = res.stdout.splitlines()
    if len(lines) != len(paths):
        raise KmodguardError(f"rpm -qf gave {len(lines)} answers for {len(paths)} files: {res.stderr.strip()}")
    return {p: (None if " " in line else line) for p, line in zip(paths, lines)}


def package_files(package: str, root: Path = Path("/")) -> list[str]:
    """The files of an installed package; InvalidInput when it is not installed."""
    env = {**os.environ, "LC_ALL": "C"}
    if _dpkg(root):
        res = subprocess.run(["dpkg-query", f"--admindir={Path(root) / 'var/lib/dpkg'}", "-L", package],
                             capture_output=True, text=True, env=env, timeout=120)
    else:
        res = subprocess.run([*_rpm(root), "-ql", package], capture_output=True, text=True, env=env, timeout=120)
    if res.returncode != 0:
        raise InvalidInput(f"{package} is not installed", hint="'rpm -qa' (or 'dpkg -l') lists what is")
    return [line for line in res.stdout.splitlines() if line.startswith("/")]


def sizes(packages: list[str], root: Path = Path("/")) -> dict[str, dict]:
    """{package: {"installed_bytes", "package_bytes"}} from the package database: what its files
    take installed, and (rpm) its header and compressed payload, i.e. what was downloaded."""
    if not packages:
        return {}
    env = {**os.environ, "LC_ALL": "C"}
    out = {}
    if _dpkg(root):
        for package in packages:
            res = subprocess.run(["dpkg-query", f"--admindir={Path(root) / 'var/lib/dpkg'}", "-W", "-f",
                                  "${Installed-Size}", package], capture_output=True, text=True, env=env, timeout=60)
            kib = res.stdout.strip()
            out[package] = {"installed_bytes": int(kib) * 1024 if kib.isdigit() else None, "package_bytes": None}
        return out
    res = subprocess.run([*_rpm(root), "-q", "--qf", "%{LONGSIZE} %{LONGSIGSIZE}\\n", *packages], capture_output=True,
                         text=True, env=env, timeout=120)
    for package, line in zip(packages, res.stdout.splitlines()):
        fields = line.split()
        nums = [int(f) if f.isdigit() else None for f in fields] if len(fields) == 2 else [None, None]
        out[package] = {"installed_bytes": nums[0], "package_bytes": nums[1]}
    return out
