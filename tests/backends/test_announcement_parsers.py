"""What zypper's cached primary.xml, zypper's search output and apt's Modaliases field may hold is
data: every name, version and pattern is checked before it becomes an announcement or a provider
(no real package manager needed here; the real ones run in test_firmware_zypper/test_firmware_apt)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

from kmodguard.backends import zypper as zyp
from kmodguard.backends.apt import modaliases_field

PRIMARY = """<?xml version="1.0" encoding="UTF-8"?>
<metadata xmlns="http://linux.duke.edu/metadata/common" xmlns:rpm="http://linux.duke.edu/metadata/rpm" packages="3">
<package type="rpm"><name>kernel-firmware-ok</name><version epoch="0" ver="20261201" rel="1.1"/>
 <format><rpm:supplements>
  <rpm:entry name="modalias(kernel-default:of:N*T*Cacme%2Cchip)"/>
  <rpm:entry name="modalias(pci:v0000AAAAd*sv*sd*bc*sc*i*)"/>
  <rpm:entry name="modalias(pci:v0000BBBB d*)"/>
  <rpm:entry name="modalias(pci:v#0000)"/>
  <rpm:entry name="modalias(pci:v%0Ainstall x)"/>
  <rpm:entry name="packageand(kernel-default:foo)"/>
 </rpm:supplements>
 <rpm:provides><rpm:entry name="modalias(usb:v1234p*d*dc*dsc*dp*ic*isc*ip*in*)"/></rpm:provides></format></package>
<package type="rpm"><name>--evil</name><version epoch="0" ver="1" rel="1"/>
 <format><rpm:provides><rpm:entry name="modalias(pci:v0000CCCCd*sv*sd*bc*sc*i*)"/></rpm:provides></format></package>
<package type="rpm"><name>epoch-pkg</name><version epoch="2" ver="1.0" rel="3"/>
 <format><rpm:provides><rpm:entry name="modalias(pci:v0000DDDDd*sv*sd*bc*sc*i*)"/></rpm:provides></format></package>
</metadata>
"""


def test_primary_announcements_are_checked_flavour_split_and_decoded():
    items = zyp._announcements(io.BytesIO(PRIMARY.encode()))
    assert sorted((a.package, a.version, a.pattern, a.how, a.flavour) for a in items) == sorted([
        ("kernel-firmware-ok", "20261201-1.1", "pci:v0000AAAAd*sv*sd*bc*sc*i*", "supplements", ""),
        ("kernel-firmware-ok", "20261201-1.1", "of:N*T*Cacme,chip", "supplements", "kernel-default"),
        ("kernel-firmware-ok", "20261201-1.1", "usb:v1234p*d*dc*dsc*dp*ic*isc*ip*in*", "provides", ""),
        ("epoch-pkg", "2:1.0-3", "pci:v0000DDDDd*sv*sd*bc*sc*i*", "provides", ""),
    ])  # '--evil' is no package name; blanks, '#', a decoded newline and packageand() are no patterns


def test_modalias_dependency_refuses_what_is_not_one_pattern():
    assert zyp.modalias_dependency("modalias(kernel-default:pci:v*d*)") == ("kernel-default", "pci:v*d*")
    assert zyp.modalias_dependency("modalias(pci:v*d*)") == ("", "pci:v*d*")
    for bad in ("modalias(pci:v d*)", "modalias(pci:v#1)", "modalias(pci:v%0A)", "modalias(pci:v%23)",
                "modalias(nobus)", "modalias(pci:" + "x" * 700 + ")", "namespace:modalias(pci:v*)",
                "modalias(pci:v%ZZ%28)", "modalias(pci:v%28x%29)"):
        assert zyp.modalias_dependency(bad) is None, bad


def test_the_primary_is_found_through_the_cached_repomd_only(tmp_path):
    raw = tmp_path / zyp.RAW_CACHE / "kmg/repodata"
    raw.mkdir(parents=True)
    (raw / "repomd.xml").write_text('<repomd xmlns="http://linux.duke.edu/metadata/repo"><data type="primary">'
                                    '<location href="../../../../etc/shadow"/></data></repomd>')
    (tmp_path / "etc/zypp/repos.d").mkdir(parents=True)
    (tmp_path / "etc/zypp/repos.d/kmg.repo").write_text("[kmg]\nenabled=1\n[off]\nenabled=0\n")
    b = zyp.ZypperBackend(tmp_path)
    assert b._enabled_repos() == ["kmg"]
    assert b._primary("kmg") is None  # a location outside repodata/ is not followed
    found = b.driver_announcements(cache_only=True)
    assert found.items == () and "zypper refresh" in found.note


def test_zypper_search_output_names_are_checked(monkeypatch):
    out = ("S | Name | Type | Version | Arch | Repository\n--+--\n"
           "  | kernel-firmware-kmg | package | 20261201-1 | noarch | kmg\n"
           "    provides: /lib/firmware/kmg/a.bin.xz\n"
           "  | -oEvil | package | 1-1 | noarch | kmg\n"
           "    provides: /lib/firmware/kmg/a.bin\n"
           "i+ | kernel-firmware-old | package | 1-1 | noarch | kmg\n"
           "    provides: /usr/lib/firmware/kmg/a.bin\n")
    monkeypatch.setattr(zyp, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, out, ""))
    b = zyp.ZypperBackend(Path("/nonexistent"))
    found = b.firmware_providers(["kmg/a.bin"], cache_only=True)
    assert found.providers == {"kmg/a.bin": ("kernel-firmware-kmg",)}  # installed and hostile rows left out
    assert found.versions == {"kernel-firmware-kmg": "20261201-1"} and found.note is None


def test_modaliases_field_of_debian():
    value = ("kmg_a(pci:v0000EEEEd00000009sv*sd*bc*sc*i*, usb:v1234p5678d*dc*dsc*dp*ic*isc*ip*in*), "
             "kmg_of(of:N*T*Cacme,chip), bad(pci:v# x, pci:v0000FFFFd*)")
    assert modaliases_field(value) == ["pci:v0000EEEEd00000009sv*sd*bc*sc*i*", "usb:v1234p5678d*dc*dsc*dp*ic*isc*ip*in*",
                                       "of:N*T*Cacme,chip", "pci:v0000FFFFd*"]
    assert modaliases_field("not a field") == [] and modaliases_field("m()") == []


def test_apt_reads_every_modaliases_field_of_a_package_list_far_over_the_output_cap(tmp_path):
    """Debian's main list is 50 MB uncompressed, over process.OUTPUT_CAP (16 MiB): the fields
    needed are kept while the real apt-helper streams it, so the last package still counts."""
    from kmodguard.backends.apt import AptBackend
    from kmodguard.process import OUTPUT_CAP

    filler = "".join(f"Package: filler{i}\nVersion: 1.{i}\nDescription: {'x' * 300}\n a long description\n\n"
                     for i in range(OUTPUT_CAP // 300 + 1000))
    tail = ("Package: kmg-dkms\nArchitecture: amd64\nVersion: 2.0-1\n"
            "Modaliases: kmg(pci:v0000EEEEd00000009sv*sd*bc*sc*i*, usb:v1234p5678d*dc*dsc*dp*ic*isc*ip*in*)\n\n"
            "Package: --evil\nVersion: 1\nModaliases: evil(pci:v0000CCCCd*sv*sd*bc*sc*i*)\n\n")
    lst = tmp_path / "example_dists_stable_main_binary-amd64_Packages"
    lst.write_text(filler + tail)
    assert lst.stat().st_size > OUTPUT_CAP
    backend = AptBackend()
    backend._targets_cache = [("Packages", "main", str(lst))]  # what apt-get indextargets would name
    found = backend.driver_announcements(cache_only=True)
    assert [(a.package, a.version, a.pattern) for a in found.items] == [
        ("kmg-dkms", "2.0-1", "pci:v0000EEEEd00000009sv*sd*bc*sc*i*"),
        ("kmg-dkms", "2.0-1", "usb:v1234p5678d*dc*dsc*dp*ic*isc*ip*in*")]
    assert found.note is None
