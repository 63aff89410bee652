"""What the command line writes: never a raw control character, never a hang on endless input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import ALIAS

ESC = "\x1b"
RAW = [chr(c) for c in range(0x20) if chr(c) not in "\n\t"] + [chr(0x7F), "\x9b"]


def assert_printable(text: str) -> None:
    assert not [c for c in text if c in RAW], f"raw control characters in {text!r}"


def test_a_terminal_escape_in_a_file_name_is_shown_escaped(kmodguard, tmp_path):
    confd = Path(kmodguard.env["KMODGUARD_CONFIG_DIR"]) / "conf.d"
    confd.mkdir(parents=True)
    (confd / f"a{ESC}[2J{ESC}]0;owned\x07.toml").write_text('packages = ["kernel-modules"]\n')
    res = kmodguard("config", "check", check_code=0)
    assert_printable(res.stdout + res.stderr)
    assert "a\\x1b[2J\\x1b]0;owned\\x07.toml" in res.stdout


def test_every_stream_is_escaped_logging_included():
    code = ("import logging, sys\n"
            "from kmodguard.cli.output import printable_streams\n"
            "printable_streams(); logging.basicConfig(stream=sys.stderr)\n"
            "print('a\\x1b[31mb\\x9b1m\\x00\\udcff ok\\tend')\n"
            "logging.warning('\\x1b]0;title\\x07')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert out == "a\\x1b[31mb\\x9b1m\\x00\\xff ok\tend\n"
    assert_printable(out + err)
    assert "\\x1b]0;title\\x07" in err


@pytest.mark.parametrize("source", ["/dev/zero", "yes"])
def test_explain_refuses_endless_stdin_at_once(kmodguard, source):
    """A line longer than any modalias is refused before the rest is read; a reader never hangs."""
    if source == "yes":
        feeder = subprocess.Popen(["yes", "x" * 5000], stdout=subprocess.PIPE)
        stdin = feeder.stdout
    else:
        feeder, stdin = None, open(source, "rb")
    try:
        proc = subprocess.run([sys.executable, "-m", "kmodguard", "explain", "-"], stdin=stdin,
                              capture_output=True, env=kmodguard.env, timeout=30)
    finally:
        stdin.close()
        if feeder:
            feeder.kill()
            feeder.wait()
    assert proc.returncode == 2, proc.stderr
    assert b"stdin line 1: longer than 4096 bytes" in proc.stderr


def test_explain_stdin_keeps_control_bytes_to_refuse_them(kmodguard):
    ok = ALIAS["installed"]
    res = kmodguard("explain", "-", input=f"# list\n{ok}\r\n\n{ok}\x0b\n", check_code=2)
    assert "stdin line 4" in res.stderr
    assert_printable(res.stderr)
