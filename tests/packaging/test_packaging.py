"""The RPM, as packaging/build-rpm builds it (natively on Fedora; on Debian with rpmbuild --nodeps
and packaging/debian-macros), checked with rpm, an empty root and rpmlint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kmodguard

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"

# Where each file of units/ is installed (units/README.md's table, plus the files added since).
# A new file in units/ fails test_every_units_file_has_its_place until it is packaged.
UNIT_PLACES = {
    "kmodguard.service": "/usr/lib/systemd/system/kmodguard.service",
    "kmodguard-fix.service": "/usr/lib/systemd/system/kmodguard-fix.service",
    "kmodguard-check.service": "/usr/lib/systemd/system/kmodguard-check.service",
    "org.kmodguard.Daemon1.conf": "/usr/share/dbus-1/system.d/org.kmodguard.Daemon1.conf",
    "org.kmodguard.Daemon1.service": "/usr/share/dbus-1/system-services/org.kmodguard.Daemon1.service",
    "org.kmodguard.Daemon1.xml": "/usr/share/dbus-1/interfaces/org.kmodguard.Daemon1.xml",
    "org.kmodguard.policy": "/usr/share/polkit-1/actions/org.kmodguard.policy",
    "tmpfiles-kmodguard.conf": "/usr/lib/tmpfiles.d/kmodguard.conf",
    "90-kmodguard.install": "/usr/lib/kernel/install.d/90-kmodguard.install",
    "kmodguard.fact": "/etc/ansible/facts.d/kmodguard.fact",
}
UNITS_NOT_INSTALLED = {"README.md"}  # documentation of the directory itself
EXECUTABLES = {"/usr/bin/kmodguard", "/usr/lib/kernel/install.d/90-kmodguard.install",
               "/etc/ansible/facts.d/kmodguard.fact"}
CONFIG_NOREPLACE = {"/etc/ansible/facts.d/kmodguard.fact", "/etc/dnf/plugins/kmodguard.conf"}
OWNED_DIRS = {"/etc/kmodguard", "/etc/kmodguard/conf.d", "/var/lib/kmodguard", "/var/lib/kmodguard/index"}
DOC = "/usr/share/doc/kmodguard"
SITELIB = re.compile(r"^/usr/lib/python3\.\d+/site-packages$")
SERVICES = ("kmodguard.service", "kmodguard-fix.service", "kmodguard-check.service")


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed: run tools/setup --test"
    return path


def fedora_macros() -> bool:
    """Whether rpm knows Fedora's macros (then build-rpm built natively, without debian-macros)."""
    out = subprocess.run([need("rpm"), "--eval", "%{?pyproject_wheel:yes}"], capture_output=True, text=True).stdout
    return out.strip() == "yes"


# What a package build leaves behind when it builds in the checkout: tarballs, RPMs, wheels,
# setuptools' and rpmbuild's trees. (Other ignored files, .hypothesis/ or __pycache__/, come from
# test runs, maybe concurrent ones, and are not looked at.)
BUILD_LEFTOVERS = re.compile(r"(^|/)(build|dist|BUILD|BUILDROOT|RPMS|SRPMS|SOURCES|pyproject-[a-z-]+)/"
                             r"|\.(rpm|tar\.gz|whl)$|\.egg-info/")


def build_leftovers_in_repo() -> set[str]:
    res = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored", "--untracked-files=all"],
                         capture_output=True, text=True, check=True)
    return {line[3:] for line in res.stdout.splitlines()
            if line[:2] in ("!!", "??") and BUILD_LEFTOVERS.search(line[3:]) and not line[3:].startswith(".venv/")}


@pytest.fixture(scope="session")
def rpm_path(tmp_path_factory) -> Path:
    for tool in ("git", "rpmbuild", "rpm"):
        need(tool)
    out = tmp_path_factory.mktemp("rpm-out")
    before = build_leftovers_in_repo()
    res = subprocess.run([str(PACKAGING / "build-rpm"), str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    # nothing generated inside the checkout (build trees, wheels, egg-info, tarballs)
    assert build_leftovers_in_repo() - before == set()
    path = Path(res.stdout.strip())  # build-rpm prints only the RPM's path on stdout
    assert path.parent == out and path.is_file(), res.stdout
    assert [p.name for p in out.iterdir()] == [path.name]  # only the binary RPM lands in OUTDIR
    return path


def rpmq(rpm_path: Path, *args: str) -> str:
    res = subprocess.run(["rpm", "-qp", *args, str(rpm_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture(scope="session")
def files(rpm_path) -> dict[str, tuple[int, str]]:
    """{path: (mode, rpm file flags: c config, n noreplace, d doc)} of every file in the RPM."""
    out = rpmq(rpm_path, "--qf", "[%{FILEMODES:octal}\t%{FILEFLAGS:fflags}\t%{FILENAMES}\n]")
    table = {}
    for line in out.splitlines():
        mode, flags, name = line.split("\t")
        table[name] = (int(mode, 8), flags)
    return table


@pytest.fixture(scope="session")
def sitelib(files) -> str:
    dirs = {str(Path(name).parent) for name in files if name.endswith("/kmodguard/__init__.py")}
    assert len(dirs) == 1, dirs
    lib = str(Path(dirs.pop()).parent)
    assert SITELIB.match(lib), lib  # Fedora's python3_sitelib, also when built on Debian
    return lib


def test_the_spec_version_is_the_package_version(rpm_path):
    assert rpmq(rpm_path, "--qf", "%{NAME} %{VERSION} %{ARCH}") == f"kmodguard {kmodguard.__version__} noarch"
    spec = (PACKAGING / "kmodguard.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(kmodguard.__version__)}$", spec, re.M)
    assert re.search(rf"^\* .+ - {re.escape(kmodguard.__version__)}-\d+$", spec, re.M), "a %changelog entry"


def test_every_units_file_has_its_place(files):
    present = {p.name for p in (REPO / "units").iterdir() if p.is_file()} - UNITS_NOT_INSTALLED
    unknown = present - set(UNIT_PLACES)
    assert not unknown, f"new files in units/: install them in packaging/kmodguard.spec and add them here: {unknown}"
    missing = {name: UNIT_PLACES[name] for name in present if UNIT_PLACES[name] not in files}
    assert not missing, missing
    assert set(UNIT_PLACES) <= present, set(UNIT_PLACES) - present  # nothing listed here has gone


def test_python_package_command_plugins_and_docs(files, sitelib):
    for module in ("kmodguard/__init__.py", "kmodguard/daemon/service.py", "kmodguard/daemon/bus.py",
                   "kmodguard/cli/__init__.py", "kmodguard/integrations/dnf_plugin.py",
                   "kmodguard/kmod/_libkmod.py"):  # _libkmod.py: generated by cffi's build hook
        assert f"{sitelib}/{module}" in files, module
    # every module of the checkout is in the package
    source = {str(p.relative_to(REPO)) for p in (REPO / "kmodguard").rglob("*.py")}
    packaged = {name[len(sitelib) + 1:] for name in files if name.startswith(f"{sitelib}/kmodguard/")}
    assert source <= packaged, source - packaged
    dist_info = f"{sitelib}/kmodguard-{kmodguard.__version__}.dist-info"
    assert f"{dist_info}/entry_points.txt" in files and f"{dist_info}/METADATA" in files
    assert f"{dist_info}/RECORD" not in files  # as Fedora's %pyproject_install leaves it
    assert "/usr/bin/kmodguard" in files
    # dnf 4 plugin: the shim in dnf's plugin directory, byte-compiled, and its configuration
    assert f"{sitelib}/dnf-plugins/kmodguard.py" in files
    assert any(re.fullmatch(rf"{sitelib}/dnf-plugins/__pycache__/kmodguard\.cpython-\d+\.pyc", n) for n in files)
    assert "/etc/dnf/plugins/kmodguard.conf" in files
    for name in EXECUTABLES:
        assert files[name][0] & 0o777 == 0o755, (name, oct(files[name][0]))
    for name in CONFIG_NOREPLACE:
        assert set(files[name][1]) >= {"c", "n"}, (name, files[name])
    for name in OWNED_DIRS:
        assert name in files and files[name][0] & 0o170000 == 0o040000, name
    for doc in ("README.md", "cloud-init.md", "remediation.md"):
        assert "d" in files[f"{DOC}/{doc}"][1], doc
    examples = sorted(p.name for p in (REPO / "docs" / "cloud-init").glob("*.yaml"))
    assert examples and all(f"{DOC}/cloud-init/{name}" in files for name in examples), examples


def test_requires_and_recommends(rpm_path):
    requires = {line.split()[0] for line in rpmq(rpm_path, "--requires").splitlines()}
    assert {"kmod", "kmod-libs", "python3-cffi", "python3-pyudev", "python3-dbus-next", "python3-systemd",
            "python3-rpm"} <= requires, requires
    assert "python(abi)" in requires  # the Python dependency generator ran
    assert set(rpmq(rpm_path, "--recommends").split()) >= {"dracut", "polkit"}


def test_scriptlets_enable_by_preset_and_restart_only_the_daemon(rpm_path):
    scripts = rpmq(rpm_path, "--scripts")
    sections = dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts,
                               re.MULTILINE | re.DOTALL))
    assert set(sections) >= {"postinstall", "preuninstall", "postuninstall"}, scripts
    post, preun, postun = sections["postinstall"], sections["preuninstall"], sections["postuninstall"]
    # Fedora's systemd-rpm-macros go through systemd-update-helper; the Debian stand-ins call
    # systemctl as those macros did before the helper existed.
    install = re.search(r"(?:install-system-units|systemctl --no-reload preset) (.+?)(?: \|\||\s*>)", post)
    assert install and set(install.group(1).split()) == set(SERVICES), post
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/kmodguard.conf" in post
    remove = re.search(r"(?:remove-system-units|systemctl --no-reload disable --now) (.+?)(?: \|\||\s*>)", preun)
    assert remove and set(remove.group(1).split()) == set(SERVICES), preun
    restart = re.findall(r"(?:mark-restart-system-units|systemctl try-restart) (.+?)(?: \|\||\s*>)", postun)
    # only the daemon: a restart of kmodguard-fix.service would re-run a package transaction
    assert [set(r.split()) for r in restart] == [{"kmodguard.service"}], postun


def test_installs_into_an_empty_root_and_runs_from_there(rpm_path, files, sitelib, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    res = subprocess.run(["rpm", "--root", str(root), "--nodeps", "--noscripts", "-i", str(rpm_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    query = subprocess.run(["rpm", "--root", str(root), "-q", "kmodguard"], capture_output=True, text=True)
    assert query.stdout.strip().startswith(f"kmodguard-{kmodguard.__version__}-"), query
    for unit, place in UNIT_PLACES.items():
        assert (root / place.lstrip("/")).read_bytes() == (REPO / "units" / unit).read_bytes(), place
    shim = root / sitelib.lstrip("/") / "dnf-plugins" / "kmodguard.py"
    assert shim.read_bytes() == (PACKAGING / "dnf-plugin" / "kmodguard.py").read_bytes()
    conf = (root / "etc/dnf/plugins/kmodguard.conf").read_text()
    assert conf.split() == ["[main]", "enabled=1"]
    for name in EXECUTABLES:
        assert os.access(root / name.lstrip("/"), os.X_OK), name
    for name in OWNED_DIRS:
        assert (root / name.lstrip("/")).is_dir(), name

    # The installed package, not this checkout, imports completely (every module, the dnf plugin
    # through its shim) and its command runs.
    env = {**os.environ, "PYTHONPATH": str(root / sitelib.lstrip("/"))}
    env.pop("PYTHONHOME", None)
    # The dnf plugin is loaded as dnf 4 loads it: its plugin directory's modules are imported
    # into dnf.plugin.dynamic, then the dnf.Plugin subclasses are collected; the class's name must
    # be the configuration file's (/etc/dnf/plugins/NAME.conf).
    probe = """
import importlib, pkgutil, sys, types
import dnf.plugin
import kmodguard
assert kmodguard.__file__.startswith(sys.argv[1]), kmodguard.__file__
for info in pkgutil.walk_packages(kmodguard.__path__, "kmodguard."):
    if not info.name.endswith(".__main__"):  # that one runs the command
        importlib.import_module(info.name)
package = sys.modules[dnf.plugin.DYNAMIC_PACKAGE] = types.ModuleType(dnf.plugin.DYNAMIC_PACKAGE)
package.__path__ = []
dnf.plugin._import_modules(package, [sys.argv[1] + "/dnf-plugins/kmodguard.py"])
found = [(c.__module__, c.name) for c in dnf.plugin._plugin_classes()]
assert ("kmodguard.integrations.dnf_plugin", "kmodguard") in found, found
print("ok")
"""
    # cwd: not the checkout, which `python -c` would put first on sys.path
    res = subprocess.run([sys.executable, "-c", probe, str(root / sitelib.lstrip("/"))], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    res = subprocess.run([sys.executable, str(root / "usr/bin/kmodguard"), "--help"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "status" in res.stdout and "check" in res.stdout, res.stderr


def test_rpmlint_is_clean_but_for_the_explained(rpm_path):
    rpmlint = need("rpmlint")
    cmd = [rpmlint, "-r", str(PACKAGING / "kmodguard.rpmlintrc")]
    if fedora_macros():
        # Fedora's rpmlint configuration already drops some messages that the filters are for
        # (they are there for Debian's generic configuration): unused filters are no error there.
        cmd.append("--ignore-unused-rpmlintrc")
    res = subprocess.run([*cmd, str(PACKAGING / "kmodguard.spec"), str(rpm_path)],
                         capture_output=True, text=True, timeout=120)
    messages = [line for line in res.stdout.splitlines() if re.match(r"^\S+?(:\d+)?: [EW]: ", line)]
    assert messages == [], "\n".join(messages)  # unexplained, or a filter that matches nothing
    assert re.search(r"\b0 errors, 0 warnings\b", res.stdout), res.stdout + res.stderr
    assert res.returncode == 0, res.stdout + res.stderr
    # every filter comes with its reason on the line above
    lines = (PACKAGING / "kmodguard.rpmlintrc").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("addFilter"):
            assert i > 0 and lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, line
