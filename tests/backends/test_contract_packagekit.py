"""The backend contract (backend_contract.py) for PackageKit: the real packagekitd with its apt
backend and the real polkitd on a private bus with the system bus's policy (packagekitd.py),
installing into the apt harness's root from its signed repository. kmodguard speaks D-Bus to
packagekitd; apt and dpkg run inside packagekitd, on the root.

Beside the contract: ONLY_TRUSTED against apt's only kind of untrusted package, one from a source
marked [allow-insecure=yes], which apt-get itself would install after a warning.
"""

import time

import pytest

import aptroot
import packagekitd
import rpmbuild
from backend_contract import *  # noqa: F401,F403 (the contract's tests)
from backend_harness import PackageKitHarness


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    base = tmp_path_factory.mktemp("contract-packagekit")
    bus = packagekitd.SystemBus()
    polkitd = packagekitd.start_polkitd(bus)
    debs = aptroot.make_debs(base)
    key = rpmbuild.make_test_key(base / "gnupg")
    other = rpmbuild.make_test_key(base / "gnupg-other", uid="an untrusted key <untrusted@example.invalid>")
    yield PackageKitHarness(bus, debs, key, other, aptroot.make_base_root(base / "root", debs))
    polkitd.terminate()
    polkitd.wait(10)
    bus.stop()
    rpmbuild.stop_agent(key)
    rpmbuild.stop_agent(other)


@pytest.fixture
def machine(harness, tmp_path, kmodguard):
    m = harness.machine(tmp_path, kmodguard)
    yield m
    m.packagekitd.stop()


def test_only_trusted_refuses_a_package_from_an_allow_insecure_source(machine, harness):
    unsigned = aptroot.make_repo(machine.tmp / "unsigned", harness.key).publish(
        [harness.debs.modules, harness.debs.extra], signed=False)  # no InRelease, no Release.gpg
    (machine.root / "etc/apt/sources.list").write_text(f"deb [allow-insecure=yes] {unsigned.uri} ./\n")
    for f in (machine.root / "var/lib/apt/lists").glob("*_*"):
        f.unlink()
    before = machine.installed()
    res = machine.fix()
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.json["error"]
    assert err["name"] == "SignatureRefused" and "never" in err["hint"], err
    assert "refreshing the repository metadata" in res.stderr  # the package became known, untrusted
    assert machine.installed() == before
    assert aptroot.dpkg_status(machine.root, aptroot.EXTRA) == "unknown"


def test_a_transaction_cancelled_at_the_lock_never_installs_afterwards(machine):
    """Busy is the truth: once the lock is free, packagekitd has ended the cancelled transaction
    (its transaction list empty) and the package is still not installed."""
    with machine.harness.lock(machine):
        res = machine.fix()
    assert res.returncode == 1 and res.json["error"]["name"] == "Busy", res.stdout + res.stderr
    deadline = time.monotonic() + 30
    while machine.packagekitd.transactions():
        assert time.monotonic() < deadline, "packagekitd still runs the cancelled transaction"
        time.sleep(0.2)
    assert not machine.has_target()
    assert aptroot.dpkg_status(machine.root, aptroot.EXTRA) == "unknown"
