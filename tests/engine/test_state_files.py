"""State and run files as root writes them: explicit modes, temporary files that are surely new,
and fix requests taken only from files only root could have written (issue 13)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kmodguard.engine import state
from kmodguard.fsutil import copy_atomic, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_directories_kmodguard_creates_have_their_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        state.write_request(tmp_path / "a" / "state", "6.1.0", ["0000:00:05.0"], "root")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a") == 0o755 and _mode(tmp_path / "a" / "state") == 0o755
    # the runtime and index directories go through the same helper
    from kmodguard.fsutil import make_dir

    old = os.umask(0o077)
    try:
        make_dir(tmp_path / "run" / "kmodguard")
        make_dir(tmp_path / "index" / "6.1.0", 0o755)
    finally:
        os.umask(old)
    for d in (tmp_path / "run", tmp_path / "run" / "kmodguard", tmp_path / "index", tmp_path / "index" / "6.1.0"):
        assert _mode(d) == 0o755, d


def test_a_planted_symlink_named_like_the_temporary_file_is_not_written_through(tmp_path):
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    os.chmod(victim, 0o600)
    target = tmp_path / "state.json"
    (tmp_path / ".state.json.kmodguard-tmp").symlink_to(victim)
    write_atomic(target, b'{"ok": 1}', 0o644)
    assert victim.read_text() == "root:secret\n" and _mode(victim) == 0o600
    assert json.loads(target.read_text()) == {"ok": 1} and _mode(target) == 0o644
    assert not os.path.lexists(tmp_path / ".state.json.kmodguard-tmp")
    # the copy the initramfs code makes goes the same way
    src = tmp_path / "initrd.new"
    src.write_bytes(b"image")
    os.chmod(src, 0o600)
    tmp = tmp_path / ".initrd.tmp"
    tmp.symlink_to(victim)
    copy_atomic(src, tmp_path / "initrd", tmp)
    assert victim.read_text() == "root:secret\n" and (tmp_path / "initrd").read_bytes() == b"image"
    assert _mode(tmp_path / "initrd") == 0o600


@pytest.mark.parametrize("plant, why", [
    ("world-writable", "group or others may write it"),
    ("not-root", "owned by uid 65534, not root"),
    ("symlink", "symbolic link"),
    ("fifo", "not a regular file"),
])
def test_a_fix_request_only_root_could_have_written_is_taken(kmodguard, tmp_path, plant, why, caplog):
    state_dir = Path(kmodguard.env["KMODGUARD_STATE_DIR"])
    request = state.write_request(state_dir, "6.1.0", ["0000:00:05.0"], "root")
    path = state_dir / state.REQUEST_FILE
    if plant == "world-writable":
        os.chmod(path, 0o666)
    elif plant == "not-root":
        os.chown(path, 65534, 65534)
    elif plant == "symlink":
        real = tmp_path / "elsewhere.json"
        real.write_text(json.dumps(request))
        os.chmod(real, 0o600)
        path.unlink()
        path.symlink_to(real)
    elif plant == "fifo":
        path.unlink()
        os.mkfifo(path, 0o600)
    # the daemon does not resume it, and says why
    with caplog.at_level("WARNING", logger="kmodguard.engine.state"):
        assert state.pending_request(state_dir) is None
    assert any(why in r.getMessage() and "refused the fix request" in r.getMessage() for r in caplog.records)
    # the fix it would start refuses it, and leaves it where it is
    res = kmodguard("fix", "--yes", "--json", "--request", str(path))
    assert res.returncode == 2, (res.stdout, res.stderr)  # InvalidInput
    doc = json.loads(res.stdout)
    assert doc["error"]["name"] == "InvalidInput" and why in doc["error"]["message"]
    assert os.path.lexists(path) and not (state_dir / state.TAKEN_FILE).exists()


def test_a_fix_request_root_wrote_is_still_taken(tmp_path):
    request = state.write_request(tmp_path / "state", "6.1.0", ["0000:00:05.0"], "root")
    assert state.pending_request(tmp_path / "state")["id"] == request["id"]
    assert state.take_request(tmp_path / "state", tmp_path / "state" / state.REQUEST_FILE)["id"] == request["id"]
    assert state.taken_request(tmp_path / "state")["id"] == request["id"]


def test_kmodguard_index_build_under_a_closed_umask_leaves_a_readable_index(kmodguard, world):
    import subprocess
    import sys

    name, payload = next(iter(world.packages.items()))
    subprocess.run([sys.executable, "-m", "kmodguard", "index", "build", "--kver", world.kver, "--package", name,
                    "--version", "6.1.0-1.kmg", "--request", f"{name}-uname-r = {world.kver}",
                    "--from-dir", str(payload)], env=kmodguard.env, check=True, capture_output=True, timeout=120,
                   preexec_fn=lambda: os.umask(0o077))
    index = Path(kmodguard.env["KMODGUARD_INDEX_DIR"])
    assert _mode(index) == 0o755 and _mode(index / world.kver) == 0o755
