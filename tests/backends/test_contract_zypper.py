"""The backend contract (backend_contract.py) for zypper: Debian's zypper 1.14 with --root, a
gpg-checked rpm-md repository in SUSE's layout (zypperroot.py)."""

import pytest

import rpmbuild
import zypperroot
from backend_contract import *  # noqa: F401,F403 (the contract's tests)
from backend_harness import ZypperHarness


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    base = tmp_path_factory.mktemp("contract-zypper")
    key = rpmbuild.make_test_key(base / "gnupg")
    other = rpmbuild.make_test_key(base / "gnupg-other", uid="an untrusted key <untrusted@example.invalid>")
    packages = zypperroot.build_packages(base / "rpms", key)
    zypperroot.publish(base / "repo", [packages.base, packages.default, packages.extra], key)
    yield ZypperHarness(packages, key, other, zypperroot.make_base_root(base / "root", base / "repo", key))
    rpmbuild.stop_agent(key)
    rpmbuild.stop_agent(other)


@pytest.fixture
def machine(harness, tmp_path, kmodguard):
    return harness.machine(tmp_path, kmodguard)
