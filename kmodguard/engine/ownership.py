"""Which installed package owns a module file, asked of the root's own package databases.

A root can hold both: a Debian host with rpm installed and kernel packages installed by rpm
(kmodguard's end-to-end guest is one; so is an RPM image built on a Debian host), or an rpm-based
system with a stray dpkg status. rpm is asked first when ROOT has an rpm database (and rpm is
installed), then dpkg (ROOT/var/lib/dpkg/status) about what rpm does not know.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .. import process
from ..backends._rpmdb import rpm_database
from ..errors import InvalidInput


def _inside(root: Path, path: str) -> str:
    """A path as the package database of ROOT knows it (/lib/modules/...)."""
    root_s = str(root).rstrip("/")
    if root_s and path.startswith(root_s + "/"):
        return path[len(root_s):]
    return path


def _rpm(root: Path) -> list[str] | None:
    """The rpm command for ROOT's database, or None when ROOT has none (or rpm is not installed)."""
    dbpath = rpm_database(root)
    if dbpath is None:
        return None
    rpm = shutil.which("rpm") or "rpm"
    return [rpm, *(["--root", str(root)] if Path(root) != Path("/") else []), "--dbpath", dbpath]


def _dpkg(root: Path) -> list[str] | None:
    """dpkg-query for ROOT's dpkg database, or None when ROOT has none."""
    admindir = Path(root) / "var/lib/dpkg"
    if not (admindir / "status").is_file() or not shutil.which("dpkg-query"):
        return None
    return ["dpkg-query", f"--admindir={admindir}"]


def owners(paths: list[str], root: Path = Path("/"), full: bool = False) -> dict[str, str | None]:
    """{path: name of the installed package that owns it (full: name-version-release for rpm's),
    or None}: rpm's answer first, dpkg's for the paths rpm does not own."""
    if not paths:
        return {}
    inside = {p: _inside(root, p) for p in paths}
    out: dict[str, str | None] = {p: None for p in paths}
    rpm = _rpm(root)
    if rpm is not None:
        qf = "%{NAME}-%{VERSION}-%{RELEASE}\\n" if full else "%{NAME}\\n"
        found = _rpm_owners(rpm, sorted(set(inside.values())), qf)
        out.update({p: found.get(inside[p]) for p in paths})
    dpkg = _dpkg(root)
    rest = [p for p in paths if out[p] is None]
    if dpkg is not None and rest:
        res = process.run([*dpkg, "-S", *(inside[p] for p in rest)], 120)
        by_file = {}
        for line in res.stdout.splitlines():
            pkgs, _, file = line.partition(": ")
            by_file[file.strip()] = pkgs.split(",")[0].split(":")[0].strip()
        out.update({p: by_file.get(inside[p]) for p in rest})
    return out


def _rpm_owners(rpm: list[str], files: list[str], qf: str) -> dict[str, str | None]:
    """{file (as ROOT's database knows it): owner or None}, from `rpm -qf`. rpm answers on stdout,
    in order, one line per file it owns ("file X is not owned by any package" when the file exists
    but no package has it), and on stderr "error: file X: ..." for a file it cannot find: rpm looks
    that file up outside --root, so files that only dpkg knows often end up there."""
    res = process.run([*rpm, "-qf", "--qf", qf, *files], 120)
    errors = {m.group(1) for m in re.finditer(r"^error: file (/.*): [^:\n]*$", res.stderr, re.M)}
    answering = [f for f in files if f not in errors]
    lines = res.stdout.splitlines()
    if len(lines) == len(answering):
        return {f: (None if " " in line else line) for f, line in zip(answering, lines)}
    # a file two packages own answers two lines: ask about each file alone (rare)
    out = {}
    for f in answering:
        one = process.run([*rpm, "-qf", "--qf", qf, f], 60)
        first = one.stdout.splitlines()[:1]
        out[f] = first[0] if one.returncode == 0 and first and " " not in first[0] else None
    return out


def _rpm_installed(rpm: list[str] | None, package: str) -> bool:
    return rpm is not None and process.run([*rpm, "-q", "--quiet", package], 60).returncode == 0


def package_files(package: str, root: Path = Path("/")) -> list[str]:
    """The files of an installed package (rpm's, else dpkg's); InvalidInput when neither has it."""
    rpm, dpkg = _rpm(root), _dpkg(root)
    res = None
    if _rpm_installed(rpm, package):
        res = process.run([*rpm, "-ql", package], 120)
    elif dpkg is not None:
        res = process.run([*dpkg, "-L", package], 120)
    if res is None or res.returncode != 0:
        raise InvalidInput(f"{package} is not installed", hint="'rpm -qa' (or 'dpkg -l') lists what is")
    return [line for line in res.stdout.splitlines() if line.startswith("/")]


def sizes(packages: list[str], root: Path = Path("/")) -> dict[str, dict]:
    """{package: {"installed_bytes", "package_bytes"}} from the package databases: what its files
    take installed, and (rpm) its header and compressed payload, i.e. what was downloaded. rpm's
    answer for the packages it has, dpkg's for the others."""
    if not packages:
        return {}
    out = {p: {"installed_bytes": None, "package_bytes": None} for p in packages}
    rpm, dpkg = _rpm(root), _dpkg(root)
    rest = list(packages)
    if rpm is not None:
        rest = []
        for package in packages:  # one query each: a name may match several installed versions
            res = process.run([*rpm, "-q", "--qf", "%{LONGSIZE} %{LONGSIGSIZE}\\n", package], 60)
            fields = res.stdout.split()
            if res.returncode != 0 or len(fields) != 2 or not all(f.isdigit() for f in fields):
                rest.append(package)
                continue
            out[package] = {"installed_bytes": int(fields[0]), "package_bytes": int(fields[1])}
    if dpkg is not None:
        for package in rest:
            res = process.run([*dpkg, "-W", "-f", "${Installed-Size}", package], 60)
            kib = res.stdout.strip()
            if res.returncode == 0 and kib.isdigit():
                out[package] = {"installed_bytes": int(kib) * 1024, "package_bytes": None}
    return out
