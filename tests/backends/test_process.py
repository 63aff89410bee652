"""kmodguard.process.run and start: the one runner of external commands (deadlines that hold)."""

import os
import signal
import sys
import time

import pytest

from kmodguard import process
from kmodguard.errors import KmodguardError

PY = sys.executable


def test_output_and_exit_code_and_c_locale():
    res = process.run([PY, "-c", "import os,sys; print(os.environ['LC_ALL']); sys.stderr.write('e'); sys.exit(3)"], 30)
    assert (res.returncode, res.stdout, res.stderr) == (3, "C\n", "e")


def test_a_command_that_exited_is_done_even_when_a_setsid_child_holds_its_pipes(tmp_path):
    """dnf succeeded; a helper it started left the process group and kept stdout open for 60 s."""
    pidfile = tmp_path / "pid"
    script = ("import os,sys,time\n"
              "if os.fork() == 0:\n"
              "    os.setsid(); open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60); os._exit(0)\n"
              "while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
              "print('Complete!')\n")
    start = time.monotonic()
    res = process.run([PY, "-c", script, str(pidfile)], 30, "dnf")
    elapsed = time.monotonic() - start
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert res.returncode == 0 and "Complete!" in res.stdout
    assert elapsed < process.EXIT_GRACE + 3, elapsed


def test_the_deadline_stops_the_whole_group(tmp_path):
    pidfile = tmp_path / "pid"
    script = ("import os,sys,time,signal\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "if os.fork() == 0:\n"
              "    open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60); os._exit(0)\n"
              "print('started', flush=True); time.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(process.CommandTimedOut, match="did not finish within 1 s"):
        process.run([PY, "-c", script, str(pidfile)], 1, "dnf", timeout_hint="raise it")
    assert time.monotonic() - start < 1 + process.TERM_GRACE + 3
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the group's SIGKILL reaches the child too
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the command's child outlived the deadline")


def test_output_is_capped(monkeypatch):
    monkeypatch.setattr(process, "OUTPUT_CAP", 1000)
    res = process.run([PY, "-c", "import sys; sys.stdout.write('x' * 100000)"], 30)
    assert res.returncode == 0 and len(res.stdout) == 1000


def test_a_missing_command_is_a_clear_error():
    with pytest.raises(KmodguardError, match="cannot run nosuchtool: No such file"):
        process.run(["/nonexistent/nosuchtool"], 5, "nosuchtool")


def test_keep_lines_keeps_the_wanted_lines_of_output_far_over_the_cap(monkeypatch):
    # a Contents index is hundreds of MB, of which the firmware lines matter
    monkeypatch.setattr(process, "OUTPUT_CAP", 4096)
    script = ("import sys\n"
              "for i in range(20000): sys.stdout.write(f'usr/bin/tool{i} utils/pkg{i}\\n')\n"
              "sys.stdout.write('lib/firmware/a.bin non-free-firmware/firmware-a\\n')\n"
              "for i in range(20000): sys.stdout.write(f'usr/share/doc/x{i} doc/pkg{i}\\n')\n"
              "sys.stdout.write('lib/firmware/b.bin non-free-firmware/firmware-b')\n")  # no newline at the end
    res = process.run([sys.executable, "-c", script], 30, keep_lines=(b"lib/firmware/",))
    assert res.returncode == 0
    assert res.stdout.splitlines() == ["lib/firmware/a.bin non-free-firmware/firmware-a",
                                       "lib/firmware/b.bin non-free-firmware/firmware-b"]


def test_a_started_command_works_beside_the_caller_and_its_deadline_counts_from_the_start(tmp_path):
    """process.start: depmod beside the module reads, systemd-detect-virt beside a cold start."""
    mark = tmp_path / "ran"
    started = process.start(["sh", "-c", f"echo out; : > '{mark}'"], 30)
    waited = time.monotonic() + 30
    while not mark.exists() and time.monotonic() < waited:
        time.sleep(0.01)
    assert mark.exists()  # it ran before anyone asked for its result
    res = started.result()
    assert (res.returncode, res.stdout, res.stderr) == (0, "out\n", "")
    late = process.start(["sleep", "60"], 0.5, "late")
    time.sleep(1.0)  # the caller's own work outlasts the command's deadline
    asked = time.monotonic()
    with pytest.raises(process.CommandTimedOut, match="late did not finish within 0.5 s"):
        late.result()
    assert time.monotonic() - asked < process.TERM_GRACE, "stopped at once: its deadline had passed"
    with pytest.raises(KmodguardError, match="cannot run"):
        process.start([str(tmp_path / "absent")], 5)
