"""`kmodguard index fetch` with the real dnf 4 on the Fedora-like machine (fedora_machine.py): an
index carried over from the repository's provides, or built from a real download that is removed
afterwards; exit 5 for a kernel no repository has.
"""

from __future__ import annotations

from pathlib import Path

from dnfimage import installed
from fedora_machine import GPU, REQ_NEXT, config_dir
from rpmbuild import KVER_NEXT


def index_of(kmg, kver: str) -> dict:
    return {p["package"]: p for p in kmg("index", "show", "--kver", kver, "--json", check_code=0).json["packages"]}


def test_fetch_carries_an_index_over_when_the_repository_names_the_modules(machine):
    kmg, root = machine
    kmg.env["KMODGUARD_CONFIG_DIR"] = config_dir(kmg, 'backend = "dnf"\n')
    doc = kmg("index", "fetch", "--kver", KVER_NEXT, "--json", check_code=0).json
    how = {p["package"]: (p["how"], p["version"], p["request"]) for p in doc["packages"]}
    assert how == {"kernel-modules": ("repository provides", "6.1.0-57.fc42", REQ_NEXT),
                   "kernel-modules-extra": ("repository provides", "6.1.0-57.fc42",
                                            f"kernel-modules-extra-uname-r = {KVER_NEXT}")}
    assert not list(Path(kmg.env["KMODGUARD_STATE_DIR"]).glob("fetch-*"))  # nothing downloaded, nothing left
    # it answers like a real index of NEXT: the GPU's module is in NEXT's kernel-modules
    res = kmg("explain", "--kver", KVER_NEXT, "--json", GPU).json["results"][0]
    assert res["verdict"] == "missing" and res["candidates"][0]["request"] == REQ_NEXT


def test_fetch_downloads_indexes_and_removes_the_download_when_nothing_is_known(machine):
    kmg, root = machine
    kmg.env["KMODGUARD_CONFIG_DIR"] = config_dir(kmg, 'backend = "dnf"\n')
    before = installed(root)
    doc = kmg("index", "fetch", "--kver", KVER_NEXT, "--download", "--json", check_code=0).json
    assert {p["package"]: p["how"] for p in doc["packages"]} == {"kernel-modules": "downloaded",
                                                                  "kernel-modules-extra": "downloaded"}
    real = index_of(kmg, KVER_NEXT)
    assert real["kernel-modules"]["derived_from"] is None and real["kernel-modules"]["request"] == REQ_NEXT
    assert real["kernel-modules"]["modules"] == 7  # every module of the package, read from the RPM
    assert installed(root) == before  # downloaded, never installed
    assert not list(Path(kmg.env["KMODGUARD_STATE_DIR"]).glob("fetch-*"))  # and the download is gone


def test_fetch_for_a_kernel_no_repository_has_exits_5(machine):
    kmg, root = machine
    kmg.env["KMODGUARD_CONFIG_DIR"] = config_dir(kmg, 'backend = "dnf"\n')
    res = kmg("index", "fetch", "--kver", "6.1.0-99.fc42.x86_64", "--json", check_code=5)
    assert res.json["error"]["name"] == "PackageUnavailable"
    assert "no repository has a modules package for kernel 6.1.0-99.fc42.x86_64" in res.json["error"]["message"]
