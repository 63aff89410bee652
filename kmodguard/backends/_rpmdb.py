"""The rpm database, asked directly: is a request ('NAME = VERSION') provided by an installed package?"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import process


def split_request(request: str, names: bool = False) -> tuple[str, str | None]:
    """'kernel-modules-uname-r = 6.1.0-56.fc42.x86_64' -> (provide name, version), after
    requests.parse (a request kmodguard makes, nothing else); a NAME-KVER or NAME request -> (name, None)."""
    from .. import requests

    forms = (*requests.FORMS, requests.NAME) if names else requests.FORMS  # names: firmware packages
    text = requests.parse_any(request, forms).text
    name, sep, version = text.partition(" = ")
    return name, (version if sep else None)


def rpm_provides(root: Path, request: str) -> bool:
    # rpm -q --whatprovides takes a bare name: compare the exact version ourselves.
    name, version = split_request(request, names=True)
    args = [shutil.which("rpm") or "rpm", "-q", "--qf", "[%{PROVIDENAME}\\t%{PROVIDEVERSION}\\n]", "--whatprovides",
            "--", name]
    if Path(root) != Path("/"):
        args[1:1] = ["--root", str(root)]
    out = process.run(args, 60, "rpm")
    if out.returncode != 0:
        return False
    provides = {tuple(line.split("\t", 1)) for line in out.stdout.splitlines() if "\t" in line}
    return (name, version) in provides if version else any(p[0] == name for p in provides)


def _dbpaths() -> list[str]:
    """Where rpm keeps its database (%_dbpath: /var/lib/rpm, /usr/lib/sysimage/rpm, or ~/.rpmdb on
    Debian's rpm), as rpm itself says first, then the usual places."""
    rpm = shutil.which("rpm")
    found = []
    if rpm:
        res = process.run([rpm, "--eval", "%{_dbpath}"], 30, "rpm")
        if res.returncode == 0 and res.stdout.startswith("/"):
            found.append(res.stdout.strip())
    return list(dict.fromkeys(found + ["/var/lib/rpm", "/usr/lib/sysimage/rpm"]))


def rpm_lock_files(root: Path) -> list[Path]:
    """Where rpm takes its transaction lock: .rpm.lock in rpm's database directory."""
    return [Path(root) / d.lstrip("/") / ".rpm.lock" for d in sorted(_dbpaths())]


DB_FILES = ("rpmdb.sqlite", "Packages.db", "Packages")  # sqlite, ndb, bdb


def rpm_database(root: Path) -> str | None:
    """The directory (as seen inside ROOT, for --dbpath) of ROOT's rpm database when rpm is
    installed and ROOT has one; None otherwise (rpm is then not asked: asked about a root without
    a database, it creates an empty one there)."""
    if not shutil.which("rpm"):
        return None
    for d in _dbpaths():
        if any((Path(root) / d.lstrip("/") / f).is_file() for f in DB_FILES):
            return d
    return None
