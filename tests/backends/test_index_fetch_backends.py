"""`kmodguard index fetch` with a package manager that cannot download without installing says
so plainly, and which ones can (apt's real download: test_fix_apt.py; dnf's: test_index_fetch_dnf.py)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("backend", ["zypper", "packagekit"])
def test_a_backend_without_download_is_named_with_what_to_use_instead(kmodguard, world, backend):
    res = kmodguard("index", "fetch", "--backend", backend, "--kver", world.kver, "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.json["error"]
    assert err["name"] == "Failed"
    assert f"cannot use {backend}" in err["message"] and "without installing them only with" in err["message"]
    assert "dnf, dnf5 or apt" in err["hint"] and "index build --from-rpm" in err["hint"]
    assert "Traceback" not in res.stderr
