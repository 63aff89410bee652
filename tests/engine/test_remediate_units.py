"""Pieces of the remediation that need no package manager: the kernel's reason, the lock, back-off."""

import os
import subprocess
import sys

import pytest

from kmodguard.backends._rpmdb import split_request
from kmodguard.engine.remediate import _load_error, kernel_reason
from kmodguard.engine.state import Backoff, RemediationLock
from kmodguard.errors import KmodError, KmodguardError

KMSG = (
    "6,1201,5020000,-;pci 0000:00:05.0: [10de:1eb8] type 00 class 0x030000\n"
    " SUBSYSTEM=pci\n"
    " DEVICE=+pci:0000:00:05.0\n"
    "3,1202,5100000,-;nouveau 0000:00:05.0: firmware: failed to load nvidia/tu104/gr/fecs_bl.bin (-2)\n"
    "4,1203,5100100,-;kmg_other: Unknown symbol kmg_helper_fn (err -2)\n"
    "6,1204,5200000,-;random: crng init done\n"
)


def test_kernel_reason_names_the_line_about_this_module_or_device(tmp_path):
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(KMSG)
    assert kernel_reason(kmsg, ["nouveau", "0000:00:05.0"]) == \
        "nouveau 0000:00:05.0: firmware: failed to load nvidia/tu104/gr/fecs_bl.bin (-2)"
    assert kernel_reason(kmsg, ["kmg_other"]) == "kmg_other: Unknown symbol kmg_helper_fn (err -2)"
    assert kernel_reason(kmsg, ["e1000e"]) is None
    assert kernel_reason(tmp_path / "absent", ["nouveau"]) is None


def test_one_remediation_at_a_time(tmp_path):
    with RemediationLock(tmp_path):
        other = subprocess.run([sys.executable, "-c", f"""
import sys
from kmodguard.engine.state import RemediationLock
from kmodguard.errors import Busy
try:
    with RemediationLock({str(tmp_path)!r}):
        sys.exit(0)
except Busy as exc:
    print(exc.message); sys.exit(9)
"""], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert other.returncode == 9 and f"pid {os.getpid()}" in other.stdout
    with RemediationLock(tmp_path):  # released on exit (and by the kernel if we die)
        pass


def _other_process_gets_the_lock(tmp_path) -> bool:
    other = subprocess.run([sys.executable, "-c", f"""
import sys
from kmodguard.engine.state import RemediationLock
from kmodguard.errors import Busy
try:
    with RemediationLock({str(tmp_path)!r}):
        sys.exit(0)
except Busy:
    sys.exit(9)
"""], env={**os.environ, "PYTHONPATH": os.getcwd()})
    return other.returncode == 0


def test_the_lock_nests_within_one_process(tmp_path):
    """The fix for a daemon's request holds the lock while it consumes the request, and the
    remediation takes it again: that nests, and the lock is let go with the outermost hold."""
    with RemediationLock(tmp_path):
        with RemediationLock(tmp_path):
            pass
        assert not _other_process_gets_the_lock(tmp_path)  # still held after the inner release
    assert _other_process_gets_the_lock(tmp_path)


def test_a_request_is_taken_once(tmp_path):
    from kmodguard.engine import state

    request = state.write_request(tmp_path, "6.1.0", ["0000:00:05.0"], "auto")
    with RemediationLock(tmp_path):
        assert state.take_request(tmp_path, tmp_path / state.REQUEST_FILE) == request
        assert state.take_request(tmp_path, tmp_path / state.REQUEST_FILE) is None  # a second fix finds none
    assert state.pending_request(tmp_path) is None and state.taken_request(tmp_path) == request
    again = state.requeue(tmp_path, request)  # its fix was killed: pending again, same id
    assert again["id"] == request["id"] and again["requested_by"] == "resume of auto"
    assert state.taken_request(tmp_path) is None and state.pending_request(tmp_path) == again
    state.finish_request(tmp_path, request["id"])
    assert state.pending_request(tmp_path) is None


def test_backoff_grows_and_clears(tmp_path):
    b = Backoff(tmp_path)
    assert b.waiting("0000:00:05.0") == 0
    b.failed("0000:00:05.0", "no firmware")
    first = b.waiting("0000:00:05.0")
    b.failed("0000:00:05.0", "no firmware")
    assert 250 < first < b.waiting("0000:00:05.0") <= 600
    b.save()
    assert Backoff(tmp_path).waiting("0000:00:05.0") > 500  # persisted
    b.succeeded("0000:00:05.0")
    assert b.waiting("0000:00:05.0") == 0
    (tmp_path / "backoff.json").write_text("garbage")
    assert Backoff(tmp_path).waiting("x") == 0  # a damaged file is a fresh start, not a crash


@pytest.mark.parametrize("request_, ok", [
    ("kernel-modules-uname-r = 6.11.4-301.fc41.x86_64", True), ("linux-modules-extra-6.8.0-31-generic", True),
    ("kernel-modules-uname-r =", False), ("a b = c", False), ("x = y z", False), ("", False)])
def test_requests_have_one_shape(request_, ok):
    if ok:
        split_request(request_)
    else:
        with pytest.raises(KmodguardError):
            split_request(request_)


def test_a_signature_the_kernel_rejects_says_what_to_do():
    # finit_module fails with EKEYREJECTED under Secure Boot for a module signed by an unknown key
    import errno

    why = _load_error(KmodError("loading module kmg_third", errno.EKEYREJECTED))
    assert "Key was rejected by service" in why and "mokutil --import" in why and "Secure Boot" in why
