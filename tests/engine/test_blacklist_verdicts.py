"""Blacklists judged over installed and indexed modules together, read the way a user reads them
(`kmodguard explain --json`, `status --json`, `fix --dry-run --json`).

A blacklisted module does not count as installed: when every installed match is blacklisted but a
not-installed package holds a match nothing blacklists, the device is `missing` (kmod would load
that module once the package is installed); `ignored` only when nothing anywhere may be loaded.
Each blacklist source (modprobe.d, module_blacklist= and modprobe.blacklist= on the kernel command
line, a package's own modprobe.d) in the installed-only, indexed-only and mixed cases.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from synthetic import KVER, Module, build_module, depmod

PCI = "pci:v0000EEEEd{d:08X}sv00000000sd00000000bc03sc00i00"
MIXED, INSTALLED_ONLY, INDEXED_ONLY = PCI.format(d=1), PCI.format(d=2), PCI.format(d=3)
# Debian's udev ships /lib/modprobe.d/fbdev-blacklist.conf ("blacklist matroxfb_base", ...); a
# Matrox G200 (102b:0521) matches that fbdev driver and mgag200, the DRM driver in kernel-modules.
G200 = "pci:v0000102Bd00000521sv00001028sd00000000bc03sc00i00"
DEBIAN_FBDEV = Path("/lib/modprobe.d/fbdev-blacklist.conf")

INSTALLED = (Module("kmg_fb", aliases=("pci:v0000EEEEd00000001sv*sd*bc*sc*i*",)),
             Module("kmg_inst_only", aliases=("pci:v0000EEEEd00000002sv*sd*bc*sc*i*",)),
             Module("matroxfb_base", aliases=("pci:v0000102Bd00000521sv*sd*bc*sc*i*",)))
INDEXED = (Module("kmg_drm", aliases=("pci:v0000EEEEd00000001sv*sd*bc03sc*i*",)),
           Module("kmg_idx_only", aliases=("pci:v0000EEEEd00000003sv*sd*bc*sc*i*",)),
           Module("mgag200", aliases=("pci:v0000102Bd00000521sv*sd*bc*sc*i*",)))
SOURCES = ("modprobe.d", "module_blacklist", "modprobe.blacklist", "package")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """The installed tree (depmod'ed) and the payload of a not-installed kernel-modules."""
    top = tmp_path_factory.mktemp("blacklist")
    for m in INSTALLED:
        build_module(m, top / "installed" / "lib" / "modules" / KVER, top / "src")
    depmod(top / "installed", KVER)
    for m in INDEXED:
        build_module(m, top / "payload" / "lib" / "modules" / KVER, top / "src")
    return top


@pytest.fixture
def machine(kmodguard, trees, tmp_path):
    """kmodguard on these trees, with a fake /proc/cmdline and two modprobe.d directories: the
    admin's (/etc) and the installed packages' own (/lib). Returns a function that sets the
    blacklists, indexes kernel-modules and runs kmodguard."""
    etc, lib, proc = tmp_path / "etc-modprobe.d", tmp_path / "lib-modprobe.d", tmp_path / "proc"
    for d in (etc, lib, proc):
        d.mkdir()
    payload = tmp_path / "payload"
    shutil.copytree(trees / "payload", payload)
    (proc / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet\n")
    env = {**kmodguard.env, "KMODGUARD_MODULES_DIR": str(trees / "installed" / "lib" / "modules" / KVER),
           "KMODGUARD_MODPROBE_DIRS": f"{etc}:{lib}", "KMODGUARD_PROC": str(proc), "KMODGUARD_CONTAINER": "none"}
    kmg = dataclasses.replace(kmodguard, env=env)

    def setup(blacklist: dict[str, list[str]]):
        """blacklist: source -> module names. 'package' blacklists an installed module in the
        installed package's own modprobe.d (lib) and an indexed one in kernel-modules' own."""
        cmdline = ["BOOT_IMAGE=/vmlinuz", "root=/dev/vda1", "ro"]
        own = payload / "etc" / "modprobe.d"
        for source, names in blacklist.items():
            if source == "modprobe.d":
                (etc / "admin.conf").write_text("".join(f"blacklist {n}\n" for n in names))
            elif source in ("module_blacklist", "modprobe.blacklist"):
                cmdline.append(f"{source}={','.join(n.replace('_', '-') for n in names)}")  # '-' is '_' to the kernel
            elif source == "package":
                inst = [n for n in names if n in {m.name for m in INSTALLED}]
                (lib / "kmg-installed-blacklist.conf").write_text("".join(f"blacklist {n}\n" for n in inst))
                own.mkdir(parents=True, exist_ok=True)
                (own / "kmg-blacklist.conf").write_text("".join(f"blacklist {n}\n" for n in names if n not in inst))
            elif source == "debian":
                shutil.copy(DEBIAN_FBDEV, lib / DEBIAN_FBDEV.name)
        # an init argument after '--' is not the kernel's: it must not blacklist anything
        (proc / "cmdline").write_text(" ".join(cmdline) + " quiet -- module_blacklist=kmg_drm,mgag200\n")
        kmg("index", "build", "--kver", KVER, "--package", "kernel-modules", "--version", "6.1.0-1.kmg",
            "--from-dir", str(payload), check_code=0)
        return kmg

    return setup


def explain(kmg, modalias: str, code: int) -> dict:
    (result,) = kmg("explain", "--json", "--kver", KVER, modalias, check_code=code).json["results"]
    return result


def test_nothing_blacklisted_gives_loadable_and_missing(machine):
    # the baseline every case below departs from
    kmg = machine({})
    assert explain(kmg, MIXED, 3)["verdict"] == "loadable"
    assert explain(kmg, INSTALLED_ONLY, 3)["verdict"] == "loadable"
    assert explain(kmg, INDEXED_ONLY, 3)["verdict"] == "missing"


@pytest.mark.parametrize("source", SOURCES)
def test_installed_only_blacklisted_is_ignored(machine, source):
    res = explain(machine({source: ["kmg_inst_only"]}), INSTALLED_ONLY, 0)
    assert res["verdict"] == "ignored", res
    assert res["installed_modules"] == ["kmg_inst_only"] and res["blacklisted"] == ["kmg_inst_only"]
    assert res["candidates"] == [] and "kmg_inst_only" in res["reason"]


@pytest.mark.parametrize("source", SOURCES)
def test_indexed_only_blacklisted_is_ignored(machine, source):
    res = explain(machine({source: ["kmg_idx_only"]}), INDEXED_ONLY, 0)
    assert res["verdict"] == "ignored", res
    assert res["installed_modules"] == [] and res["candidates"] == []
    assert res["blacklisted"] == ["kmg_idx_only"]
    if source == "package":
        assert "kernel-modules blacklists it in its own modprobe.d" in res["reason"]


@pytest.mark.parametrize("source", SOURCES)
def test_installed_blacklisted_but_a_package_has_a_loadable_one_is_missing(machine, source):
    res = explain(machine({source: ["kmg_fb"]}), MIXED, 3)
    assert res["verdict"] == "missing", res
    assert [(c["module"], c["package"]) for c in res["candidates"]] == [("kmg_drm", "kernel-modules")]
    assert res["installed_modules"] == ["kmg_fb"] and res["blacklisted"] == ["kmg_fb"]
    assert "kmg_fb" in res["reason"] and "blacklisted" in res["reason"] and "kmg_drm in kernel-modules" in res["reason"]


@pytest.mark.parametrize("source", SOURCES)
def test_mixed_with_every_match_blacklisted_is_ignored(machine, source):
    res = explain(machine({source: ["kmg_fb", "kmg_drm"]}), MIXED, 0)
    assert res["verdict"] == "ignored", res
    assert res["candidates"] == [] and sorted(res["blacklisted"]) == ["kmg_drm", "kmg_fb"]
    assert "kmg_fb" in res["reason"] and "kmg_drm" in res["reason"]


def test_sources_combine(machine):
    # the installed one on the command line, the package's one in its own modprobe.d
    res = explain(machine({"modprobe.blacklist": ["kmg_fb"], "package": ["kmg_drm"]}), MIXED, 0)
    assert res["verdict"] == "ignored" and sorted(res["blacklisted"]) == ["kmg_drm", "kmg_fb"]


def test_debians_fbdev_blacklist_makes_a_server_display_missing_not_ignored(machine, tmp_path):
    if not DEBIAN_FBDEV.is_file():
        pytest.skip(f"{DEBIAN_FBDEV} (Debian's udev) is not on this machine")
    kmg = machine({"debian": []})
    res = explain(kmg, G200, 3)
    assert res["verdict"] == "missing", res
    assert res["candidates"][0]["module"] == "mgag200" and res["blacklisted"] == ["matroxfb_base"]
    # status and the plan agree: install kernel-modules, load mgag200, never matroxfb_base
    rec = (f"P: /devices/pci0000:00/0000:00:02.0\nE: SUBSYSTEM=pci\nE: PCI_SLOT_NAME=0000:00:02.0\n"
           f"E: MODALIAS={G200}\nA: modalias={G200}\nA: driver_override=(null)\n\n")
    dev = kmg.with_devices(rec, tmp_path)
    (status,) = dev("status", "--json", "--kver", KVER, check_code=3).json["devices"]
    assert (status["verdict"], status["candidates"][0]["module"]) == ("missing", "mgag200")
    assert "mgag200 in kernel-modules" in dev("status", "--kver", KVER, check_code=3).stdout
    plan = dev("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [p["package"] for p in plan["install"]] == ["kernel-modules"]
    assert plan["load"] == ["mgag200"]
    assert [(d["action"], d["module"]) for d in plan["devices"]] == [("install", "mgag200")]


def test_without_an_index_every_installed_match_blacklisted_stays_ignored_and_says_so(kmodguard, trees, tmp_path):
    etc = tmp_path / "modprobe.d"
    etc.mkdir()
    (etc / "admin.conf").write_text("blacklist kmg_fb\n")
    env = {**kmodguard.env, "KMODGUARD_MODULES_DIR": str(trees / "installed" / "lib" / "modules" / KVER),
           "KMODGUARD_MODPROBE_DIRS": str(etc)}
    res = explain(dataclasses.replace(kmodguard, env=env), MIXED, 0)
    assert res["verdict"] == "ignored" and "no usable index" in res["reason"]
