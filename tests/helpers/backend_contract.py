"""The contract every package backend passes, run for real against each package manager's own
database and a local signed repository: install, already installed, stale metadata refreshed
once, not available, lock held, timeout, signature refused.

Each backend's test file (test_contract_dnf.py, test_contract_apt.py, test_contract_zypper.py)
imports these tests and provides the `machine` fixture from its harness (backend_harness.py); a
new backend is added with a harness and a file of three lines. What is asserted is read from the
system (the root's rpm database or dpkg status), plus the exit code and error name the Contract
promises. This kernel cannot load modules: an install ends in 6.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["test_install", "test_already_installed_is_no_second_transaction", "test_stale_metadata_is_refreshed_once",
           "test_not_available_after_a_refresh_is_exit_5_naming_the_package", "test_held_lock_waits_then_is_busy",
           "test_hanging_repository_is_stopped_at_the_timeout",
           "test_refused_signature_is_signature_refused_not_unavailable"]


def test_install(machine):
    before = machine.installed()
    assert not machine.has_target()
    res = machine.fix()
    assert res.returncode == 6, res.stdout + res.stderr  # installed; the load fails on this kernel
    steps = {s["step"]: s for s in res.json["steps"]}
    assert steps["install"]["result"] == "done" and steps["depmod"]["result"] == "done"
    assert machine.has_target()
    after = machine.installed()
    added, removed = set(after) - set(before), set(before) - set(after)
    assert {p.split("=")[0] for p in added} == {machine.harness.package}  # exactly the target, nothing else
    assert {p.split("=")[0] for p in removed} == set(machine.harness.replaces)  # SUSE: kernel-default-base
    status = machine.kmg("status", "--json", "--kver", machine.harness.kver).json
    assert [d["verdict"] for d in status["devices"]] == ["loadable"]  # the device judged again


def test_already_installed_is_no_second_transaction(machine):
    machine.fix()
    after = machine.installed()
    again = machine.fix("0000:00:05.0")
    steps = {s["step"]: s for s in again.json["steps"]}
    assert again.json["install"] == [] and steps["install"]["result"] == "skipped"
    assert machine.installed() == after


def test_stale_metadata_is_refreshed_once(machine):
    harness = machine.harness
    harness.publish(machine, target=False)
    harness.refresh_metadata(machine)  # the root's metadata predates the package
    harness.publish(machine, target=True)
    res = machine.fix()
    assert res.returncode == 6, res.stdout + res.stderr
    assert machine.has_target()
    assert res.stderr.count("refreshing the repository metadata") == 1


def test_not_available_after_a_refresh_is_exit_5_naming_the_package(machine):
    harness = machine.harness
    harness.publish(machine, target=False)
    harness.refresh_metadata(machine)  # the package is gone from the mirror and its metadata
    before = machine.installed()
    res = machine.fix()
    assert res.returncode == 5, res.stdout + res.stderr
    err = res.json["error"]
    assert err["name"] == "PackageUnavailable" and harness.request in err["message"]
    assert harness.unavailable_hint in err["hint"] and "reboot" in err["hint"]
    assert res.stderr.count("refreshing the repository metadata") == 1
    assert machine.installed() == before


def test_held_lock_waits_then_is_busy(machine):
    before = machine.installed()
    with machine.harness.lock(machine):
        res = machine.fix()
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.json["error"]["name"] == "Busy" and machine.harness.lock_error in res.json["error"]["message"]
    assert machine.installed() == before


def test_hanging_repository_is_stopped_at_the_timeout(machine):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []

    def hold():
        try:
            for _ in range(8):
                held.append(server.accept())  # accepted, never answered
        except OSError:
            pass  # closed by the test

    threading.Thread(target=hold, daemon=True).start()
    machine.harness.hang(machine, f"http://127.0.0.1:{server.getsockname()[1]}/repo")
    conf = machine.tmp / "etc/conf.d"
    conf.mkdir()
    (conf / "timeout.toml").write_text("[timeouts]\npackage_manager = 3\n")
    before = machine.installed()
    try:
        res = machine.fix(timeout=60)
    finally:
        server.close()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "did not finish within 3 s and was stopped" in res.json["error"]["message"]
    assert machine.installed() == before


def test_refused_signature_is_signature_refused_not_unavailable(machine):
    machine.harness.refuse_signatures(machine)
    before = machine.installed()
    res = machine.fix()
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.json["error"]["name"] == "SignatureRefused"
    assert "never" in res.json["error"]["hint"]  # kmodguard never turns the checks off
    assert machine.installed() == before
