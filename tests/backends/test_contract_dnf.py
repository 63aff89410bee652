"""The backend contract (backend_contract.py) for dnf 4: Debian's dnf with --installroot, signed
Fedora-like kernel RPMs in a createrepo_c repository (the session's `repo` and `base_root`)."""

import pytest

import rpmbuild
from backend_contract import *  # noqa: F401,F403 (the contract's tests)
from backend_harness import DnfHarness


@pytest.fixture(scope="module")
def harness(repo, base_root, rpm_base):
    return DnfHarness(repo, base_root, rpmbuild.kernel_rpms(rpm_base, rpmbuild.KVER, scripts=rpmbuild.LOGGED,
                                                            signed=False))


@pytest.fixture
def machine(harness, tmp_path, kmodguard):
    return harness.machine(tmp_path, kmodguard)
