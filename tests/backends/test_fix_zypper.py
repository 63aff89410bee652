"""zypper beyond the contract (test_contract_zypper.py): what kmodguard does when zypper's solver
wants a decision only root may take (a kernel-default that conflicts with kernel-default-base
without replacing it): it takes none, changes nothing, and says which command decides."""

import pytest

import rpmbuild
import zypperroot
from backend_harness import ZypperHarness


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    base = tmp_path_factory.mktemp("zypper")
    key = rpmbuild.make_test_key(base / "gnupg")
    packages = zypperroot.build_packages(base / "rpms", key)
    zypperroot.publish(base / "repo", [packages.base, packages.default], key)
    yield ZypperHarness(packages, key, key, zypperroot.make_base_root(base / "root", base / "repo", key))
    rpmbuild.stop_agent(key)


def test_a_solver_problem_is_left_to_root_and_named(harness, tmp_path, kmodguard):
    m = harness.machine(tmp_path, kmodguard)
    zypperroot.publish(m.repo, [harness.pkgs.base, harness.pkgs.conflicting_default], harness.key)
    harness.refresh_metadata(m)
    before = m.installed()
    res = m.fix()
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.json["error"]
    assert "without a decision" in err["message"] and "kernel-default-base" in err["message"] and "conflicts with" in err["message"]
    assert f"zypper install '{zypperroot.REQUEST}'" in err["hint"]
    assert m.installed() == before and any(p.startswith("kernel-default-base=") for p in before)
