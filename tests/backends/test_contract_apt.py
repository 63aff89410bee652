"""The backend contract (backend_contract.py) for apt: this machine's apt-get and dpkg on a real
minimal Debian root (mmdebstrap), a signed local repository of Ubuntu-style packages."""

import pytest

import aptroot
import rpmbuild
from backend_contract import *  # noqa: F401,F403 (the contract's tests)
from backend_harness import AptHarness


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    base = tmp_path_factory.mktemp("contract-apt")
    debs = aptroot.make_debs(base)
    key = rpmbuild.make_test_key(base / "gnupg")
    other = rpmbuild.make_test_key(base / "gnupg-other", uid="an untrusted key <untrusted@example.invalid>")
    yield AptHarness(debs, key, other, aptroot.make_base_root(base / "root", debs))
    rpmbuild.stop_agent(key)
    rpmbuild.stop_agent(other)


@pytest.fixture
def machine(harness, tmp_path, kmodguard):
    return harness.machine(tmp_path, kmodguard)
