"""The rpm database, asked directly: is a request ('NAME = VERSION') provided by an installed package?"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import KmodguardError


def split_request(request: str) -> tuple[str, str | None]:
    """'kernel-modules-uname-r = 6.1.0-56.fc42.x86_64' -> (name, version); a bare name -> (name, None)."""
    name, sep, version = request.partition(" = ")
    if not name or " " in name or (sep and (not version or " " in version)):
        raise KmodguardError(f"{request!r} is not a package request kmodguard makes (NAME or 'NAME = VERSION')")
    return name, (version if sep else None)


def rpm_provides(root: Path, request: str) -> bool:
    # rpm -q --whatprovides takes a bare name: compare the exact version ourselves.
    name, version = split_request(request)
    args = [shutil.which("rpm") or "rpm", "-q", "--whatprovides", name, "--qf", "[%{PROVIDENAME}\\t%{PROVIDEVERSION}\\n]"]
    if Path(root) != Path("/"):
        args[1:1] = ["--root", str(root)]
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, timeout=60)
    if out.returncode != 0:
        return False
    provides = {tuple(line.split("\t", 1)) for line in out.stdout.splitlines() if "\t" in line}
    return (name, version) in provides if version else any(p[0] == name for p in provides)


def rpm_lock_files(root: Path) -> list[Path]:
    """Where rpm takes its transaction lock: .rpm.lock in rpm's database directory, as rpm itself
    says (%_dbpath: /var/lib/rpm, /usr/lib/sysimage/rpm, or ~/.rpmdb on Debian's rpm)."""
    res = subprocess.run([shutil.which("rpm") or "rpm", "--eval", "%{_dbpath}"], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C"}, timeout=30)
    dbpaths = {res.stdout.strip()} if res.returncode == 0 and res.stdout.startswith("/") else set()
    dbpaths |= {"/var/lib/rpm", "/usr/lib/sysimage/rpm"}
    return [Path(root) / d.lstrip("/") / ".rpm.lock" for d in sorted(dbpaths)]
