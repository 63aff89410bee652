"""`kmodguard fix` for real: signed Fedora-like kernel RPMs in a createrepo_c repository, the real
dnf (4) installing into an installroot, devices faked with umockdev, converging on a rerun.

The kernel here cannot load modules (no module support; synthetic modules would be refused by any
kernel anyway), so every run ends with the load step failed and exit 6: what is asserted is
everything up to it, which is what the package manager part of a fix does.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rpmbuild
import synthetic
from dnfimage import copy_image, dnf, history, image_env, installed, write_repo_config
from journal import JOURNAL_CATCHER
from records import pci
from rpmbuild import KVER, LOGGED

GPU, VIRTIO, EXTRA_XZ = synthetic.ALIAS["gpu"], synthetic.ALIAS["virtio"], synthetic.ALIAS["extra_xz"]
REQ = f"kernel-modules-uname-r = {KVER}"
REQ_EXTRA = f"kernel-modules-extra-uname-r = {KVER}"


DEVICES = (pci("0000:00:05.0", GPU) + pci("0000:00:06.0", GPU) + pci("0000:00:07.0", EXTRA_XZ)
           + f"P: /devices/pci0000:00/0000:00:08.0/virtio3\nE: SUBSYSTEM=virtio\nE: MODALIAS={VIRTIO}\n"
             f"A: modalias={VIRTIO}\n\n")


@pytest.fixture
def machine(base_root, kmodguard, repo, tmp_path):
    """A fresh copy of the image, kmodguard pointed at it, both packages indexed from their RPMs."""
    _, rpms, _ = repo
    root = copy_image(base_root, tmp_path / "root")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "kmodguard.toml").write_text('backend = "dnf"\n[timeouts]\nsettle = 0.2\nlock_wait = 2\n'
                                        'package_manager = 120\n')
    env = {**kmodguard.env, **image_env(root, tmp_path), "KMODGUARD_CONFIG_DIR": str(etc)}
    kmg = dataclasses.replace(kmodguard, env=env).with_devices(DEVICES, tmp_path)
    kmg("index", "build", "--from-rpm", str(rpms[KVER]["kernel-modules"]), str(rpms[KVER]["kernel-modules-extra"]),
        check_code=0)
    return kmg, root


def steps(doc) -> dict[str, dict]:
    return {s["step"]: s for s in doc["steps"]}


def test_dry_run_plans_one_transaction_with_sizes_and_touches_nothing(machine):
    kmg, root = machine
    before = installed(root)
    doc = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert [p["request"] for p in doc["install"]] == [REQ, REQ_EXTRA]
    assert all(p["download_size"] and p["installed_size"] for p in doc["install"])
    assert sorted(doc["load"]) == ["kmg_extra_xz", "kmg_gpu", "kmg_virtio"]
    assert doc["initramfs"]["rebuild"] is False
    assert {d["id"]: d["action"] for d in doc["devices"]} == {
        "0000:00:05.0": "install", "0000:00:06.0": "install", "0000:00:07.0": "install",
        "/sys/devices/pci0000:00/0000:00:08.0/virtio3": "install"}
    assert installed(root) == before
    human = kmg("fix", "--dry-run", "--kver", KVER, check_code=3).stdout
    assert f"{REQ}  (kernel-modules 6.1.0-56.fc42)  download" in human


def test_fix_installs_exactly_the_running_kernels_packages_in_one_transaction(machine):
    kmg, root = machine
    before_history = history(root)
    res = kmg("fix", "--yes", "--json", "--kver", KVER)
    assert res.returncode == 6, res.stderr  # installed, but this kernel cannot load modules
    doc = res.json
    s = steps(doc)
    assert s["install"]["result"] == "done" and REQ in s["install"]["detail"] and REQ_EXTRA in s["install"]["detail"]
    assert s["depmod"]["result"] == "done"  # the packages' scriptlets did not run depmod here
    assert s["load"]["result"] == "failed"
    assert {o["outcome"] for o in doc["outcomes"]} == {"failed"}
    assert all("could not be loaded" in o["reason"] for o in doc["outcomes"])
    now = installed(root)
    assert "kernel-modules-6.1.0-56.fc42" in now and "kernel-modules-extra-6.1.0-56.fc42" in now
    assert not any("57.fc42" in p for p in now)  # never the newest kernel's package
    new = history(root)[: len(history(root)) - len(before_history)]
    assert len(new) == 1  # one transaction for four devices
    info = dnf(root, "-q", "history", "info", "last").stdout
    assert "kmodguard: driver packages for 0000:00:05.0" in info
    log = (root / "var/log/kmg-scriptlets.log").read_text()
    assert f"kernel-modules posttrans: dracut -f --kver {KVER}" in log  # Fedora's own rebuild ran
    assert "kmg_gpu" in (root / "lib/modules" / KVER / "modules.dep").read_text()
    # the devices are no longer missing: their driver is installed
    status = kmg("status", "--json", "--kver", KVER).json
    assert {d["verdict"] for d in status["devices"]} == {"loadable"}
    assert "0000:00:05.0" in (kmg.env["KMODGUARD_STATE_DIR"] and
                              Path(kmg.env["KMODGUARD_STATE_DIR"], "backoff.json").read_text())


def test_a_second_run_converges_without_a_second_transaction(machine, base_root):
    kmg, root = machine
    kmg("fix", "--yes", "--json", "--kver", KVER)
    count, before = len(history(root)), installed(root)
    again = kmg("fix", "--yes", "--json", "--kver", KVER, "0000:00:05.0", "0000:00:07.0").json
    assert again["install"] == [] and sorted(again["load"]) == ["kmg_extra_xz", "kmg_gpu"]  # now loadable
    assert steps(again)["install"]["result"] == "skipped"
    # as if killed right after the transaction: packages in, module index not yet rebuilt
    mdir = root / "lib/modules" / KVER
    for f in (base_root / "lib/modules" / KVER).glob("modules.*"):
        shutil.copyfile(f, mdir / f.name)
    doc = kmg("fix", "--yes", "--json", "--kver", KVER, "0000:00:05.0", "0000:00:07.0").json
    assert [p["request"] for p in doc["install"]] == [REQ, REQ_EXTRA]  # judged missing again...
    s = steps(doc)
    assert s["install"]["result"] == "skipped" and "already installed" in s["install"]["detail"]  # ...no 2nd transaction
    assert s["depmod"]["result"] == "done"
    assert len(history(root)) == count and installed(root) == before


def test_devices_backing_off_are_left_out_unless_named(machine):
    kmg, root = machine
    kmg("fix", "--yes", "--json", "--kver", KVER)  # fails to load: every device backs off
    # not "nothing to fix": the devices left out are named, with until when, and the exit is 3
    doc = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert doc["devices"] == [] and doc["install"] == []
    backing = {b["id"]: b for b in doc["backing_off"]}
    assert "0000:00:05.0" in backing and backing["0000:00:05.0"]["until"].endswith("Z")
    status = kmg("status", "--json", "--kver", KVER, check_code=3).json
    assert sorted(b["id"] for b in status["backing_off"]) == sorted(backing)
    text = kmg("fix", "--kver", KVER, check_code=3)
    assert "nothing to fix" not in text.stdout
    for device_id, b in backing.items():
        assert f"{device_id}: backing off after" in text.stdout and f"until {b['until']}" in text.stdout
    again = kmg("fix", "--yes", "--json", "--kver", KVER, check_code=3).json
    assert sorted(b["id"] for b in again["backing_off"]) == sorted(backing)
    named = kmg("fix", "--dry-run", "--json", "--kver", KVER, "0000:00:05.0", check_code=3).json
    assert [d["id"] for d in named["devices"]] == ["0000:00:05.0"] and named["backing_off"] == []


def test_exact_version_in_no_repository_exits_5_and_says_what_to_do(machine, repo, tmp_path):
    kmg, root = machine
    repo_dir, rpms, key = repo
    only_next = tmp_path / "only-next"
    only_next.mkdir()
    for f in repo_dir.glob("*.rpm"):
        if "56.fc42" not in f.name:
            shutil.copyfile(f, only_next / f.name)
    rpmbuild.createrepo(only_next)
    write_repo_config(root, f"file://{only_next}", key.public)
    before = installed(root)
    res = kmg("fix", "--yes", "--json", "--kver", KVER)
    assert res.returncode == 5, res.stderr
    assert res.json["error"]["name"] == "PackageUnavailable"
    assert REQ in res.json["error"]["message"]
    assert "local package file" in res.json["error"]["hint"] and "update the kernel" in res.json["error"]["hint"]
    assert installed(root) == before


def test_unreachable_repository_is_a_clear_error(machine, repo):
    kmg, root = machine
    write_repo_config(root, "file:///nonexistent/kmg-repo", repo[2].public)
    before = installed(root)
    res = kmg("fix", "--yes", "--json", "--kver", KVER)
    assert res.returncode == 1  # not 5: nobody can tell whether the package exists
    assert "could not reach the repositories kmg" in res.json["error"]["message"]
    assert "network" in res.json["error"]["hint"]
    assert installed(root) == before


def test_held_package_lock_waits_then_gives_up_busy(machine):
    kmg, root = machine
    lock = root / "root/.rpmdb/.rpm.lock" if (root / "root/.rpmdb").is_dir() else root / "var/lib/rpm/.rpm.lock"
    assert lock.exists()
    with open(lock, "rb+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)  # what rpm holds during a transaction (cloud-init, dnf-automatic)
        res = kmg("fix", "--yes", "--json", "--kver", KVER)
    assert res.returncode == 1
    assert res.json["error"]["name"] == "Busy" and "stayed locked for 2 s" in res.json["error"]["message"]
    assert "waiting for the package lock" in res.stderr


def test_hanging_repository_is_stopped_at_the_timeout(machine, repo):
    kmg, root = machine
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    def hold_connections():
        try:
            for _ in range(8):
                held.append(server.accept())  # accepted, never answered
        except OSError:
            pass  # the test closed the server

    threading.Thread(target=hold_connections, daemon=True).start()
    write_repo_config(root, f"http://127.0.0.1:{server.getsockname()[1]}/repo", repo[2].public)
    Path(kmg.env["KMODGUARD_CONFIG_DIR"], "conf.d").mkdir()
    Path(kmg.env["KMODGUARD_CONFIG_DIR"], "conf.d/timeout.toml").write_text("[timeouts]\npackage_manager = 3\n")
    res = kmg("fix", "--yes", "--json", "--kver", KVER, timeout=60)
    server.close()
    assert res.returncode == 1
    assert "did not finish within 3 s and was stopped" in res.json["error"]["message"]


def test_signature_checks_stay_on(machine, rpm_base, repo, tmp_path):
    """An unsigned package with the same provide is refused by dnf: kmodguard never turns checks off."""
    kmg, root = machine
    unsigned = rpmbuild.kernel_rpms(rpm_base, KVER, scripts=LOGGED, signed=False)
    plain = tmp_path / "unsigned-repo"
    plain.mkdir()
    for f in list(unsigned.rpms.values()) + list(repo[0].glob("kmg-*.rpm")):
        shutil.copyfile(f, plain / Path(f).name)
    rpmbuild.createrepo(plain)
    write_repo_config(root, f"file://{plain}", repo[2].public)
    before = installed(root)
    res = kmg("fix", "--yes", "--json", "--kver", KVER)
    assert res.returncode == 1
    assert "install failed" in res.json["error"]["message"]
    assert installed(root) == before


def test_fix_without_root_is_not_authorized(machine, unprivileged):
    kmg, _ = machine
    res = subprocess.run(unprivileged.command("fix", "--yes", "--json", "--kver", KVER), capture_output=True,
                         text=True, env=unprivileged.env(kmg.env))
    assert res.returncode == 4, res.stdout + res.stderr
    assert json.loads(res.stdout)["error"]["name"] == "NotAuthorized"
    assert "--dry-run" in res.stderr  # what to do instead
    # nor may it run a fix request (the daemon's, run as root): 4 and a clear message, no PermissionError
    request = Path(kmg.env["KMODGUARD_STATE_DIR"]) / "fix-request.json"
    res = subprocess.run(unprivileged.command("fix", "--yes", "--json", "--request", str(request)),
                         capture_output=True, text=True, env=unprivileged.env(kmg.env))
    assert res.returncode == 4, res.stdout + res.stderr
    assert json.loads(res.stdout)["error"]["name"] == "NotAuthorized"
    assert "only root may run it" in res.stderr and "PermissionError" not in res.stdout + res.stderr


# --- a kill at any step, then a new run: the same end state as one uninterrupted run ---------

def end_state(kmg, root: Path) -> dict:
    status = kmg("status", "--json", "--kver", KVER).json
    return {"installed": installed(root), "transactions": len(history(root)),
            "modules.dep": sorted((root / "lib/modules" / KVER / "modules.dep").read_text().splitlines()),
            "verdicts": sorted((d["id"], d["verdict"]) for d in status["devices"])}


def run_and_kill_at(kmg, marker: str, root: Path) -> None:
    """Start `kmodguard fix`, SIGKILL it (umockdev-run and kmodguard: its whole session) as soon
    as it reports `marker` on stderr. A dnf it started runs on in a session of its own, as under
    systemd; the next run begins once that one has let go of rpm's lock."""
    cmd = ["umockdev-run", "--device", str(kmg.umockdev), "--", sys.executable, "-m", "kmodguard",
           "fix", "--yes", "--kver", KVER]
    proc = subprocess.Popen(cmd, env=kmg.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line.decode(errors="replace"))
        if marker in seen[-1]:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    proc.stderr.close()
    assert any(marker in s for s in seen), seen
    lock = root / "root/.rpmdb/.rpm.lock" if (root / "root/.rpmdb").is_dir() else root / "var/lib/rpm/.rpm.lock"
    deadline = time.monotonic() + 120
    with open(lock, "rb+") as f:
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(f, fcntl.LOCK_UN)
                return
            except OSError:
                assert time.monotonic() < deadline, "the interrupted dnf never let go of rpm's lock"
                time.sleep(0.1)


_reference = {}


def uninterrupted(make_machine) -> dict:
    if "state" not in _reference:
        kmg, root = make_machine()
        kmg("fix", "--yes", "--kver", KVER)
        _reference["state"] = end_state(kmg, root)
    return _reference["state"]


@pytest.mark.parametrize("marker", ["step install", "dnf: installing", "step depmod", "step load", "step probe"])
def test_killed_at_any_step_a_new_run_converges(machine, marker, kmodguard, base_root, repo, tmp_path_factory):
    def fresh():
        tmp = tmp_path_factory.mktemp("reference")
        env = {**machine[0].env, "KMODGUARD_STATE_DIR": str(tmp / "state"), "KMODGUARD_INDEX_DIR": str(tmp / "index")}
        root = tmp / "root"
        subprocess.run(["cp", "-a", str(base_root), str(root)], check=True)
        for k in ("KMODGUARD_ROOT", "KMODGUARD_MODULES_DIR", "KMODGUARD_MODPROBE_DIRS", "KMODGUARD_BOOT_DIR",
                  "KMODGUARD_DRACUT_CONF_DIR"):
            env[k] = env[k].replace(str(machine[1]), str(root))
        kmg = dataclasses.replace(machine[0], env=env)
        kmg("index", "build", "--from-rpm", str(repo[1][KVER]["kernel-modules"]),
            str(repo[1][KVER]["kernel-modules-extra"]), check_code=0)
        return kmg, root

    expected = uninterrupted(fresh)
    kmg, root = machine
    run_and_kill_at(kmg, marker, root)
    res = kmg("fix", "--yes", "--json", "--kver", KVER, "0000:00:05.0", "0000:00:06.0", "0000:00:07.0",
              "/sys/devices/pci0000:00/0000:00:08.0/virtio3")
    assert res.returncode == 6, res.stderr  # the same ending as an uninterrupted run here
    assert end_state(kmg, root) == expected


def test_initramfs_always_rebuilds_with_real_dracut_and_keeps_the_drivers(machine):
    kmg, root = machine
    conf = root / "etc/dracut.conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    # a small, generic image: the test's choice of dracut configuration, read by dracut itself
    (conf / "00-small.conf").write_text('hostonly="no"\ndracutmodules=" base "\ncompress="cat"\n'
                                        'early_microcode="no"\n')
    image = root / "boot" / f"initramfs-{KVER}.img"
    image.parent.mkdir(exist_ok=True)
    subprocess.run(["dracut", "--kver", KVER, "-k", str(root / "lib/modules" / KVER), "--confdir", str(conf),
                    "--force", str(image)], check=True, capture_output=True, timeout=300)
    Path(kmg.env["KMODGUARD_CONFIG_DIR"], "kmodguard.toml").write_text(
        'backend = "dnf"\ninitramfs = "always"\n[timeouts]\nsettle = 0.2\nlock_wait = 2\n')
    plan = kmg("fix", "--dry-run", "--json", "--kver", KVER, check_code=3).json
    assert plan["initramfs"]["rebuild"] is True and plan["initramfs"]["by"] == "package"  # read from the RPM
    doc = kmg("fix", "--yes", "--json", "--kver", KVER).json
    s = steps(doc)
    assert s["initramfs"]["result"] == "done", s["initramfs"]
    assert "rebuilt with" in s["initramfs"]["detail"]  # the LOGGED scriptlet ran no dracut, kmodguard did
    listing = subprocess.run(["lsinitrd", str(image)], capture_output=True, text=True, check=True).stdout
    for name in ("kmg_gpu.ko", "kmg_virtio.ko", "kmg_extra_xz.ko"):
        assert name in listing, name
    dropin = (conf / "90-kmodguard.conf").read_text()
    assert "kmg_gpu" in dropin and "add_drivers+=" in dropin  # later kernels keep them
    again = kmg("fix", "--yes", "--json", "--kver", KVER, "0000:00:05.0").json
    assert steps(again)["initramfs"]["result"] in ("done", "skipped")
    assert "rebuilt" not in steps(again)["initramfs"]["detail"]  # converged: no second rebuild


@pytest.mark.parametrize("where, env, says", [
    ("container", {"KMODGUARD_CONTAINER": "docker"}, "running in a container (docker)"),
    ("image mode", {}, "an image-mode system (ostree/bootc)"),
])
def test_in_a_container_or_image_mode_fix_plans_and_installs_nothing(machine, where, env, says):
    kmg, root = machine
    if where == "image mode":
        (root / "run").mkdir(exist_ok=True)
        (root / "run/ostree-booted").touch()
    kmg = dataclasses.replace(kmg, env={**kmg.env, **env})
    before, count = installed(root), len(history(root))
    res = kmg("fix", "--yes", "--kver", KVER)
    assert res.returncode == 3  # something needs doing, and was not done here
    assert says in res.stdout and "nothing will be installed or loaded" in res.stdout
    assert REQ in res.stdout  # the plan is still shown
    if where == "image mode":
        assert f"rpm-ostree install '{REQ}' '{REQ_EXTRA}'" in res.stdout  # named, not run
    doc = kmg("fix", "--yes", "--json", "--kver", KVER, check_code=3).json
    assert says in doc["blocked"]
    assert installed(root) == before and len(history(root)) == count


def test_every_step_reaches_the_journal_with_structured_fields(machine):
    kmg, _ = machine
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", JOURNAL_CATCHER,
           "umockdev-run", "--device", str(kmg.umockdev), "--", sys.executable, "-m", "kmodguard",
           "fix", "--yes", "--kver", KVER]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**kmg.env, "JOURNAL_STREAM": "8:1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["rc"] == 6
    steps_logged = [e.get("KMODGUARD_STEP") for e in doc["entries"] if "KMODGUARD_STEP" in e]
    assert steps_logged == ["install", "depmod", "load", "probe", "initramfs"]
    # MESSAGE= is the text alone (the level is PRIORITY=), as `journalctl -u kmodguard-fix` shows it
    assert [e["MESSAGE"].split(":")[0] for e in doc["entries"] if "KMODGUARD_STEP" in e] == \
        [f"step {s}" for s in steps_logged]
    assert all(e.get("SYSLOG_IDENTIFIER") == "kmodguard" for e in doc["entries"])
    outcomes = {e["DEVICE"]: e["KMODGUARD_OUTCOME"] for e in doc["entries"] if "KMODGUARD_OUTCOME" in e}
    assert outcomes["/sys/devices/pci0000:00/0000:00:05.0"] == "failed"
    assert any("dnf output" in e.get("MESSAGE", "") for e in doc["entries"])  # the package manager's output
