"""Hostile and malformed modaliases, judged by the engine: refused with a clear message (InvalidInput)
or judged, never an exception of another kind; libkmod never sees a string kmodguard did not check.
The command line's side of bad input: tests/cli/test_bad_input.py."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmodguard.config import Config
from kmodguard.engine.diagnosis import Diagnoser, check_modalias, check_modaliases
from kmodguard.engine.environment import detect
from kmodguard.errors import InvalidInput
from kmodguard.paths import Paths


@pytest.mark.parametrize("value, message", [
    ("", "empty"),
    ("x" * 5000, "characters long"),
    ("pci:v0000\x01", "contains"),
    ("pci:v0000 d0000", "contains"),
    ("pci:v\u00e9", "contains"),
    ("pci:v\udcff", "contains"),  # a non-UTF-8 byte read with surrogateescape
    ("nocolon", "must start with a bus name"),
    ("PCI:v0000", "must start with a bus name"),
    (":v0000", "must start with a bus name"),
])
def test_malformed_modaliases_are_refused(value, message):
    with pytest.raises(InvalidInput) as exc:
        check_modalias(value)
    assert message in exc.value.message


@pytest.mark.parametrize("value", ["pci:$(reboot);rm -rf /", "usb:`id`|&&", "of:N(null)T(null)Cvendor,x"])
def test_shell_metacharacters_are_just_characters(indexed, world, value):
    value = value.replace(" ", "")
    out = indexed("explain", "--json", "--kver", world.kver, value, check_code=0).json
    assert out["results"][0]["verdict"] == "unknown"


@pytest.fixture(scope="module")
def diagnoser(world, tmp_path_factory):
    paths = Paths(kver=world.kver, modules_dir=world.installed, index_dir=tmp_path_factory.mktemp("noindex"),
                  modprobe_dirs=(str(world.modprobe_d),), firmware_dirs=(world.firmware,))
    return Diagnoser(paths, Config(), detect(paths))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_any_string_is_refused_or_judged(diagnoser, value):
    try:
        verdict = diagnoser.explain(value)
    except InvalidInput:
        return
    assert verdict.verdict in ("loadable", "unindexed", "unknown", "ignored", "missing")


bus = st.text(alphabet=string.ascii_lowercase + string.digits + "_", min_size=1, max_size=12)
body = st.text(alphabet="".join(chr(c) for c in range(0x21, 0x7F)), max_size=200)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bus, body)
def test_well_formed_modaliases_with_glob_characters_never_break_libkmod(diagnoser, b, rest):
    try:
        verdict = diagnoser.explain(f"{b}:{rest}")  # '*', '?', '[' in input are data, not patterns
    except InvalidInput as exc:
        assert "libkmod refuses" in exc.message  # e.g. an unbalanced '['
        return
    assert verdict.verdict in ("loadable", "unindexed", "unknown", "ignored")


def test_libkmod_refusal_is_an_input_error(diagnoser):
    with pytest.raises(InvalidInput, match="libkmod refuses"):
        diagnoser.explain("pci:v0000[")


def _refusal(check, value):
    try:
        check(value)
    except InvalidInput as exc:
        return exc.message
    return None


def _first_refusal(values):
    return next((m for m in map(lambda v: _refusal(check_modalias, v), values) if m), None)


modalias_like = (st.builds(lambda b, r: f"{b}:{r}", bus, body) | st.text(max_size=40)
                 | st.sampled_from(["", "x" * 5000, "pci:v0000\n", "pci:a\nusb:b", "nocolon", 7]))


@settings(max_examples=500, deadline=None)
@given(st.lists(modalias_like, max_size=8))
def test_the_bulk_check_refuses_what_the_one_by_one_check_refuses_first(values):
    """explain_all checks every new modalias in one regular expression (check_modaliases): it
    must refuse exactly when check_modalias refuses one, with the first one's message."""
    assert _refusal(check_modaliases, values) == _first_refusal(values)
