"""Hostile and malformed input on the command line: a clear message and a documented exit code, never a
traceback. The engine's side (modaliases refused or judged): tests/engine/test_modalias_input.py."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=5))
def test_cli_explain_on_arbitrary_stdin(indexed, world, lines):
    res = indexed("explain", "--json", "--kver", world.kver, "-", input=b"\n".join(lines))
    assert res.returncode in (0, 2, 3)
    doc = res.json
    if res.returncode == 2:
        assert doc["error"]["name"] == "InvalidInput" and "stdin line" in doc["error"]["message"]
    else:
        assert all(r["verdict"] for r in doc["results"])


def test_usage_errors_exit_2_with_a_json_document(kmodguard):
    res = kmodguard("status", "--json", "--no-such-option")
    assert res.returncode == 2
    assert res.json["error"]["name"] == "InvalidInput"
    assert "unrecognized arguments" in res.json["error"]["message"]
    assert kmodguard("explain").returncode == 2
    assert kmodguard().returncode == 2


def test_help_documents_exit_codes_and_environment(kmodguard):
    out = kmodguard("--help", check_code=0).stdout
    for code in ("0  success", "3  success, and some device needs", "5  the package for this kernel"):
        assert code in out
    assert "KMODGUARD_INDEX_DIR" in out
    assert "exit status" in kmodguard("status", "--help", check_code=0).stdout


def test_missing_modules_dir_is_stated_plainly(kmodguard, world, tmp_path):
    kmodguard.env["KMODGUARD_MODULES_DIR"] = str(tmp_path / "gone")
    out = kmodguard("explain", "--json", "--kver", world.kver, "pci:v0000AAAAd00000001sv0sd0bc02sc00i00").json
    assert out["results"][0]["verdict"] in ("unindexed", "unknown")
    assert str(tmp_path / "gone") in out["results"][0]["reason"]
