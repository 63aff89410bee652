"""tools/setup and tools/packages: the README's first step, on the distributions it names.

CI runs the Debian branch for real on every run (.ci/run). No Fedora package can be reached from
these machines, so the Fedora branch is checked as far as that allows: the table is linted, and
tools/setup runs whole, for real, with a stand-in dnf that records what it was asked (the name
says it: stand-in) in place of the distribution's installer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "tools" / "packages"
# what tools/setup runs besides the package manager; the stand-in PATH holds only these
SHELL_TOOLS = ("sh", "awk", "id", "sed", "mkdir", "touch", "dirname", "env", "cat")


def rows() -> list[tuple[str, str, str, str]]:
    out = []
    for line in TABLE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        need, debian, fedora, why = line.split(None, 3)
        out.append((need, debian, fedora, why))
    return out


def test_the_package_table_is_complete_and_names_real_debian_packages():
    table = rows()
    assert table and all(need in ("run", "test") for need, *_ in table)
    assert all(why.strip() for *_, why in table), "every row says why"
    assert not [r for r in table if r[1] == "-" and r[2] == "-"]
    debian = [d for _, d, _, _ in table if d != "-"]
    assert len(debian) == len(set(debian))
    # every Debian name is a package apt knows (a typo would only show on a fresh machine)
    res = subprocess.run(["apt-cache", "show", "--no-all-versions", *debian], capture_output=True, text=True,
                         timeout=120)
    known = {line.split(": ", 1)[1] for line in res.stdout.splitlines() if line.startswith("Package: ")}
    assert set(debian) <= known, sorted(set(debian) - known)


def test_the_fedora_branch_asks_dnf_for_the_fedora_packages_and_builds_the_venv(tmp_path):
    """tools/setup --test on a machine with dnf and no apt-get (a stand-in dnf records its
    arguments): it asks for exactly the table's Fedora packages, then makes a working .venv."""
    checkout = tmp_path / "checkout with space"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, checkout / name)
    stub = tmp_path / "bin"
    stub.mkdir()
    record = tmp_path / "dnf-args"
    (stub / "dnf").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{record}'\n")
    (stub / "dnf").chmod(0o755)
    for tool in SHELL_TOOLS:
        os.symlink(shutil.which(tool), stub / tool)
    env = {"PATH": str(stub), "HOME": str(tmp_path), "LC_ALL": "C"}
    res = subprocess.run(["sh", str(checkout / "tools" / "setup"), "--test"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == "" and res.stderr == ""  # a quiet set-up
    fedora = [f for _, _, f, _ in rows() if f != "-"]
    assert record.read_text().split() == ["install", "-y", "-q", *fedora]
    version = subprocess.run([str(checkout / ".venv" / "bin" / "kmodguard"), "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("kmodguard "), version.stderr
    # only the run-time packages without --test
    res = subprocess.run(["sh", str(checkout / "tools" / "setup")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert record.read_text().split() == ["install", "-y", "-q", *(f for n, _, f, _ in rows() if n == "run" and f != "-")]


def test_build_rpm_names_a_missing_build_dependency_before_building(tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    for tool in ("rpm", "rpmbuild", "python3"):  # no git
        os.symlink(shutil.which(tool), stub / tool)
    res = subprocess.run([str(REPO / "packaging" / "build-rpm"), str(tmp_path / "out")],
                         env={"PATH": str(stub), "LC_ALL": "C"}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "missing build dependencies: git (Debian: git; Fedora: git-core)" in res.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
