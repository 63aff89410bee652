"""PackageKitBackend against a real dbus-daemon and the real D-Bus library, with a stand-in for
packagekitd (tests/helpers/packagekit_fake.py: FakePackageKitForTests) that answers as Fedora's PackageKit
(dnf backend, exact-version provides) and fails on demand. The real packagekitd (apt backend) and
polkitd run in test_contract_packagekit.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import pytest

from packagekit_fake import FakePackage, FakePackageKitForTests

from kmodguard.backends import Offer
from kmodguard.backends.packagekit import PackageKitBackend, TRANSACTION_FLAG_ONLY_TRUSTED
from kmodguard.errors import Busy, KmodguardError, PackageUnavailable


KVER = "6.1.0-56.fc42.x86_64"
REQ = f"kernel-modules-uname-r = {KVER}"
REQ_CORE = f"kernel-modules-core-uname-r = {KVER}"
REQ_EXTRA = f"kernel-modules-extra-uname-r = {KVER}"
MODULES_ID = "kernel-modules;6.1.0-56.fc42;x86_64;fedora"


def catalogue() -> list[FakePackage]:
    return [
        FakePackage("kernel-modules-core;6.1.0-56.fc42;x86_64;fedora", (REQ_CORE, "kernel-modules-core"),
                    "core modules", 27_000_000, 9_000_000, installed=True),
        FakePackage(MODULES_ID, (REQ, "kernel-modules", "kmod(amdgpu.ko)"), "kernel modules",
                    120_000_000, 48_000_000),
        FakePackage("kernel-modules-extra;6.1.0-56.fc42;x86_64;fedora", (REQ_EXTRA, "kernel-modules-extra"),
                    "extra modules", 5_000_000, 2_000_000),
        FakePackage("unsigned-modules;1.0-1;x86_64;thirdparty", ("unsigned-modules-uname-r = 1.0",),
                    "unsigned", 1000, 500, trusted=False),
        FakePackage("fail;1.0-1;x86_64;fedora", ("fail-uname-r = 1.0",), "fails in its scriptlet", behaviour="fail"),
        FakePackage("hang;1.0-1;x86_64;fedora", ("hang-uname-r = 1.0",), "never finishes", behaviour="hang"),
    ]


@pytest.fixture
def bus_address():
    """A private dbus-daemon, killed by its PID at teardown."""
    out = subprocess.run(["dbus-daemon", "--session", "--print-address=1", "--print-pid=1", "--fork", "--nopidfile"],
                         capture_output=True, text=True, timeout=10, check=True)
    address, pid = out.stdout.split()
    yield address
    os.kill(int(pid), signal.SIGTERM)


def start_fake(address, **kw) -> FakePackageKitForTests:
    return FakePackageKitForTests(catalogue(), **kw).start(address)


@pytest.fixture
def fake(bus_address):
    pk = start_fake(bus_address)
    yield pk
    pk.stop()


@pytest.fixture
def backend(bus_address) -> PackageKitBackend:
    return PackageKitBackend(bus_address, call_timeout=20)


def install(backend, requests, *, timeout=20.0, lock_wait=5.0, messages=None):
    return backend.install(requests, comment="kmodguard: test", timeout=timeout, lock_wait=lock_wait,
                           progress=(messages.append if messages is not None else (lambda m: None)))


def test_install_resolves_and_installs(fake, backend):
    assert backend.is_installed(REQ) is False
    messages: list[str] = []
    result = install(backend, [REQ], messages=messages)

    assert result.installed == (REQ,)
    assert result.transaction_id and result.transaction_id.startswith("/")
    assert "kernel-modules;6.1.0-56.fc42;x86_64;fedora" in result.log
    assert fake.package("kernel-modules").installed
    assert backend.is_installed(REQ) is True
    # resolved by the exact-version provide, installed with ONLY_TRUSTED, the package id from PackageKit
    assert any(c[1] == "WhatProvides" and c[3] == [REQ] for c in fake.calls)
    (inst,) = fake.members("InstallPackages")
    assert inst[2] == TRANSACTION_FLAG_ONLY_TRUSTED and inst[3] == [MODULES_ID]
    assert fake.members("SetHints")[0][2] == ["interactive=false", "background=false"]
    # progress from the Percentage property and ItemProgress signals
    assert any(m.endswith("100%") and "installing kernel-modules-6.1.0-56.fc42.x86_64" in m for m in messages), messages
    assert any("%" in m and "(" in m for m in messages), messages  # Percentage with the status
    assert fake.members("Cancel") == []


def test_install_several_in_one_transaction_and_skips_installed(fake, backend):
    result = install(backend, [REQ, REQ_EXTRA, REQ_CORE])
    assert result.installed == (REQ, REQ_EXTRA, REQ_CORE)
    (inst,) = fake.members("InstallPackages")
    assert sorted(inst[3]) == sorted([MODULES_ID, "kernel-modules-extra;6.1.0-56.fc42;x86_64;fedora"])
    assert "already installed: " + REQ_CORE in result.log


def test_already_installed_needs_no_transaction(fake, backend):
    result = install(backend, [REQ_CORE])
    assert result.installed == (REQ_CORE,)
    assert fake.members("InstallPackages") == []


def test_is_installed_uses_installed_filter(fake, backend):
    assert backend.is_installed(REQ_CORE) is True
    with pytest.raises(KmodguardError):  # a bare name names no kernel: not a request kmodguard makes
        backend.is_installed("kernel-modules-core")
    assert backend.is_installed(REQ) is False
    filters = {c[2] for c in fake.members("WhatProvides")}
    assert filters == {1 << 2}  # PK_FILTER_ENUM_INSTALLED


def test_query_reports_sizes(fake, backend):
    offers = backend.query([REQ, "kernel-modules-uname-r = 0.0.1"])
    assert offers[0] == Offer(REQ, True, "kernel-modules-6.1.0-56.fc42.x86_64", 48_000_000, 120_000_000)
    assert offers[1] == Offer("kernel-modules-uname-r = 0.0.1", False)
    assert fake.members("GetDetails")[0][2] == [MODULES_ID]
    assert fake.members("InstallPackages") == []


@pytest.mark.parametrize("as_error", [False, True], ids=["empty-result", "package-not-found-error"])
def test_nobody_provides_raises_package_unavailable(bus_address, backend, as_error):
    pk = start_fake(bus_address, not_found_as_error=as_error)
    try:
        missing = "kernel-modules-uname-r = 6.1.0-1.fc40.x86_64"
        with pytest.raises(PackageUnavailable) as err:
            install(backend, [REQ, missing])
        assert missing in err.value.message and REQ not in err.value.message
        assert pk.members("InstallPackages") == []  # nothing half-done
        assert not pk.package("kernel-modules").installed
        assert backend.is_installed(missing) is False
    finally:
        pk.stop()


def test_failed_transaction_carries_packagekit_message(fake, backend):
    with pytest.raises(KmodguardError) as err:
        install(backend, ["fail-uname-r = 1.0"])
    assert not isinstance(err.value, (PackageUnavailable, Busy))
    assert "Error in POSTTRANS scriptlet in rpm package fail-1.0-1.x86_64: exit status 1" in err.value.message
    assert "package-failed-to-install" in err.value.message
    assert not fake.package("fail").installed


def test_hanging_transaction_is_cancelled_within_timeout(fake, backend):
    timeout = 1.5
    messages: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(KmodguardError) as err:
        install(backend, ["hang-uname-r = 1.0"], timeout=timeout, messages=messages)
    elapsed = time.monotonic() - t0
    assert timeout <= elapsed < timeout + 1.0, elapsed
    assert "did not finish" in err.value.message and "cancelled" in err.value.message
    (inst,) = fake.members("InstallPackages")
    assert fake.cancelled == [inst[0]]  # Cancel() on the install transaction
    assert not fake.package("hang").installed
    assert any("30%" in m for m in messages), messages  # progress arrived before the hang


def test_untrusted_package_is_refused(fake, backend):
    with pytest.raises(KmodguardError) as err:
        install(backend, ["unsigned-modules-uname-r = 1.0"])
    assert "The package unsigned-modules-1.0-1.x86_64 is not signed" in err.value.message
    assert "never turns that off" in (err.value.hint or "")
    assert fake.install_flags == [TRANSACTION_FLAG_ONLY_TRUSTED]  # ONLY_TRUSTED was sent, and only once
    assert not fake.package("unsigned-modules").installed


def test_lock_held_past_lock_wait_is_busy(fake, backend):
    fake.lock_held = True
    t0 = time.monotonic()
    with pytest.raises(Busy):
        install(backend, [REQ], timeout=20, lock_wait=0.5)
    assert time.monotonic() - t0 < 5
    assert len(fake.cancelled) == 1
    assert not fake.package("kernel-modules").installed


def test_lock_released_within_lock_wait(fake, backend):
    fake.lock_held = True

    def release():
        time.sleep(0.3)
        fake.lock_held = False

    t = threading.Thread(target=release)
    t.start()
    messages: list[str] = []
    install(backend, [REQ], lock_wait=5, messages=messages)
    t.join()
    assert fake.package("kernel-modules").installed
    assert fake.cancelled == []


def test_system_bus_from_environment(fake, bus_address, monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
    assert PackageKitBackend().is_installed(REQ_CORE) is True


def test_no_packagekit_on_the_bus(bus_address, backend):
    with pytest.raises(KmodguardError) as err:
        backend.is_installed(REQ)
    assert "PackageKit is not available" in err.value.message


def test_no_bus_at_all(tmp_path):
    backend = PackageKitBackend(f"unix:path={tmp_path}/nothing-here", call_timeout=5)
    with pytest.raises(KmodguardError) as err:
        backend.is_installed(REQ)
    assert "cannot connect" in err.value.message


def test_malformed_request_never_reaches_the_bus(fake, backend):
    for bad in ["pci:v00008086d0000 1234", "kernel-modules-uname-r = 6.1 ; rm -rf /", ""]:
        with pytest.raises(KmodguardError):
            install(backend, [bad])
    assert fake.calls == []


def test_works_when_called_inside_a_running_loop(fake, backend):
    async def engine_in_daemon():
        return install(backend, [REQ])

    assert asyncio.run(engine_in_daemon()).installed == (REQ,)
    assert fake.package("kernel-modules").installed
