"""Package requests (issue 13): built by kmodguard from an allow-listed name and the kernel, parsed
strictly again in every backend, '--' before package arguments where the tool takes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmodguard import requests
from kmodguard.backends.apt import AptBackend, install_argv as apt_install_argv
from kmodguard.backends.dnf import DnfBackend
from kmodguard.backends.zypper import ZypperBackend
from kmodguard.config import Config
from kmodguard.devices import Device
from kmodguard.engine.diagnosis import Candidate, Verdict
from kmodguard.engine.plan import make_plan
from kmodguard.index import store
from kmodguard.errors import InvalidInput

KVER = "6.11.4-301.fc41.x86_64"
GOOD = f"kernel-modules-uname-r = {KVER}"
HOSTILE = ["--nogpgcheck", "bash", "@development-tools", "/tmp/x.rpm", "-oAPT::Get::AllowUnauthenticated=true",
           "kernel-modules-uname-r = 6.11.4 --nogpgcheck", "kernel-modules-uname-r =  6.11.4", "kernel-modules\n",
           "kernel-modules-uname-r = -1", "kernel-modules-9evil", "kernel-modules-²", "Kernel-modules-uname-r = 6.1",
           f"kernel-modules-uname-r = {KVER}/../x", "", "x" * 200]


def test_built_forms_per_distribution():
    assert requests.build(requests.UNAME_R, "kernel-modules", KVER) == GOOD
    assert requests.build(requests.UNAME_R, "kernel-modules", "6.1.0-56-amd64") == \
        "kernel-modules-uname-r = 6.1.0-56.amd64"  # an RPM version holds one '-'
    assert requests.build(requests.NAME_KVER, "linux-modules-extra-6.8.0-45-generic", "6.8.0-45-generic") == \
        "linux-modules-extra-6.8.0-45-generic"
    assert requests.build(requests.NAME_VERSION, "kernel-default", "6.4.0-150600.23.25-default",
                          "6.4.0-150600.23.25.1") == "kernel-default = 6.4.0-150600.23.25.1"
    with pytest.raises(InvalidInput):
        requests.build(requests.NAME_KVER, "linux-modules-extra-6.8.0-44-generic", "6.8.0-45-generic")


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_requests_do_not_parse(text):
    with pytest.raises(InvalidInput):
        requests.parse(text)


def test_stored_request_must_be_the_built_one():
    assert requests.for_package("kernel-modules", KVER, "6.11.4-301.fc41", GOOD) == GOOD
    for stored in ["kernel-modules-extra-uname-r = " + KVER, "kernel-modules-uname-r = 6.11.5-1.fc41.x86_64",
                   "kernel-modules = 6.11.4-302.fc41", *HOSTILE]:
        with pytest.raises(InvalidInput):
            requests.for_package("kernel-modules", KVER, "6.11.4-301.fc41", stored)


def test_allow_list_kver_rule():
    c = Config()
    assert c.allowed_name("linux-modules-extra-6.8.0-45-generic") == "linux-modules-extra"
    assert c.allowed_name("linux-modules-extra-6.8.0-45-generic", "6.8.0-45-generic") == "linux-modules-extra"
    assert c.allowed_name("linux-modules-extra-6.8.0-45-generic", "6.8.0-46-generic") is None
    for name in ["kernel-modules-9evil", "kernel-modules-²", "kernel-modules-٣.1", "linux-modules-extra-6.8\u200b",
                 "linux-modules-extra-6", "kernel-modules-6.1 x"]:
        assert c.allowed_name(name) is None, name


def _device() -> Device:
    return Device(syspath="/sys/devices/pci0000:00/0000:00:05.0", subsystem="pci", sysname="0000:00:05.0",
                  modalias="pci:v00008086d0000154Csv00008086sd00000000bc02sc00i00")


@pytest.mark.parametrize("stored", HOSTILE + [f"kernel-modules-uname-r = 6.11.5-1.fc41.x86_64"])
def test_plan_refuses_a_hostile_index_request(stored):
    verdict = Verdict("missing", "no installed module matches",
                      candidates=(Candidate("iavf", "kernel-modules", "6.11.4-301.fc41", stored),))
    plan = make_plan(KVER, [(_device(), verdict)], Config())
    assert plan.install == ()
    assert plan.devices[0].action == "refused"
    assert "request kmodguard does not make" in plan.devices[0].reason


def test_plan_builds_the_request():
    verdict = Verdict("missing", "no installed module matches",
                      candidates=(Candidate("iavf", "kernel-modules", "6.11.4-301.fc41", GOOD),))
    plan = make_plan(KVER, [(_device(), verdict)], Config())
    assert [p.request for p in plan.install] == [GOOD]


@pytest.mark.parametrize("text", HOSTILE)
def test_backends_refuse_before_building_argv(text):
    with pytest.raises(InvalidInput):
        DnfBackend("dnf", Path("/nonexistent")).install_argv([GOOD, text], "kmodguard")
    with pytest.raises(InvalidInput):
        DnfBackend("dnf5", Path("/nonexistent")).repoquery_argv(text)
    with pytest.raises(InvalidInput):
        ZypperBackend(Path("/nonexistent")).install_argv([text])
    with pytest.raises(InvalidInput):
        apt_install_argv([text], [], 10)
    with pytest.raises(InvalidInput):
        DnfBackend("dnf", Path("/nonexistent")).install(
            [text], comment="kmodguard", timeout=5, lock_wait=0, progress=lambda m: None)
    with pytest.raises(InvalidInput):
        AptBackend(Path("/nonexistent")).install([text], comment="x", timeout=5, lock_wait=0, progress=lambda m: None)


def test_double_dash_before_package_arguments():
    argv = DnfBackend("dnf", Path("/r")).install_argv([GOOD], "kmodguard")
    assert argv[argv.index("install") + 1:] == ["--", GOOD]
    argv = ZypperBackend(Path("/r")).install_argv([GOOD])
    assert argv[argv.index("install") + 1:] == ["--no-recommends", "--", GOOD]
    argv = apt_install_argv(["linux-modules-extra-6.8.0-45-generic"], [], 10)
    assert argv[argv.index("install") + 1:] == ["--", "linux-modules-extra-6.8.0-45-generic"]
    # dnf5 before 5.4.3 refuses '--': none, and no request can start with '-'
    argv = DnfBackend("dnf5", Path("/r")).install_argv([GOOD], "kmodguard")
    assert "--" not in argv and argv[argv.index("install") + 1:] == [GOOD]
    assert all(not a.startswith("-") for a in argv[argv.index("install") + 1:])
    assert DnfBackend("dnf", Path("/r")).repoquery_argv(GOOD)[-1] == f"--whatprovides={GOOD}"


def test_apt_takes_only_name_kver():
    with pytest.raises(InvalidInput):
        apt_install_argv([GOOD], [], 10)


HOSTILE = ["--nogpgcheck", "bash", "@development-tools", "/tmp/x.rpm", "-oAPT::Get::AllowUnauthenticated=true"]


@pytest.mark.parametrize("request_", HOSTILE)
def test_index_build_refuses_a_foreign_request(kmodguard, world, request_):
    payload = str(world.packages["kernel-modules"])
    res = kmodguard("index", "build", "--kver", world.kver, "--package", "kernel-modules", "--version", "6.1.0-1.kmg",
                    f"--request={request_}", "--from-dir", payload, check_code=2)
    assert "not a package request kmodguard makes" in res.stderr
    assert not (Path(kmodguard.env["KMODGUARD_INDEX_DIR"]) / world.kver / "kernel-modules").exists()


def test_index_build_from_dir_needs_the_exact_version(kmodguard, world):
    res = kmodguard("index", "build", "--kver", world.kver, "--package", "kernel-modules",
                    "--from-dir", str(world.packages["kernel-modules"]), check_code=2)
    assert "--version" in res.stderr


@pytest.mark.parametrize("request_", HOSTILE)
def test_an_index_holding_a_foreign_request_is_refused_and_named(kmodguard, world, request_):
    """An index.json edited to hold a hostile request: explain names the index and offers nothing from it."""
    from synthetic import ALIAS

    kmodguard("index", "build", "--kver", world.kver, "--package", "kernel-modules", "--version", "6.1.0-1.kmg",
              "--request", f"kernel-modules-uname-r = {world.kver}", "--from-dir", str(world.packages["kernel-modules"]),
              check_code=0)
    meta_file = (Path(kmodguard.env["KMODGUARD_INDEX_DIR"]) / world.kver / "kernel-modules" / "index.json").resolve()
    meta = json.loads(meta_file.read_text())
    meta["package"]["request"] = request_
    meta[store.DIGEST_KEY] = store.meta_digest(meta)  # resealed: the request itself must be what is refused
    meta_file.write_text(json.dumps(meta))
    doc = kmodguard("explain", "--json", "--kver", world.kver, ALIAS["gpu"], check_code=0).json
    assert doc["results"][0]["candidates"] == []
    errors = kmodguard("status", "--json", "--kver", world.kver).json["environment"]["index"]["errors"]
    assert [e["package"] for e in errors] == ["kernel-modules"]
    assert f"{world.kver}/kernel-modules" in errors[0]["message"]
    assert "is refused" in errors[0]["message"] and "not a package request kmodguard makes" in errors[0]["message"]
