"""The plan: what would be done, decided before anything is touched."""

from kmodguard.config import Config
from kmodguard.devices import Device, PciFacts
from kmodguard.engine.diagnosis import Candidate, Verdict
from kmodguard.engine.plan import InitramfsDecision, make_plan

KVER = "6.11.4-301.fc41.x86_64"
REQ = f"kernel-modules-uname-r = {KVER}"


def vf(n: int) -> Device:
    return Device(syspath=f"/sys/devices/pci0000:00/0000:00:03.0/0000:01:{n // 8:02x}.{n % 8}", subsystem="pci",
                  sysname=f"0000:01:{n // 8:02x}.{n % 8}", modalias="pci:v00008086d0000154Csv*sd*bc02sc00i00",
                  pci=PciFacts(physfn="/sys/devices/pci0000:00/0000:00:03.0", sriov_drivers_autoprobe=True))


def missing(module="iavf", package="kernel-modules", request=REQ) -> Verdict:
    return Verdict("missing", "no installed module matches",
                   candidates=(Candidate(module, package, "6.11.4-301.fc41", request),))


def test_an_sriov_storm_gives_one_transaction_and_one_load():
    judged = [(vf(n), missing()) for n in range(256)]
    plan = make_plan(KVER, judged, Config())
    assert [p.request for p in plan.install] == [REQ]
    assert plan.load == ("iavf",)
    assert len(plan.devices) == 256 and {d.action for d in plan.devices} == {"install"}
    assert plan.as_json()["install"] == [{"package": "kernel-modules", "version": "6.11.4-301.fc41",
                                          "request": REQ, "download_size": None, "installed_size": None,
                                          "kind": "modules", "for": ["iavf"]}]


def test_devices_that_share_a_verdict_keep_their_own_ids_and_boot_reasons():
    shared = missing()
    devices = [vf(n) for n in range(3)]
    plan = make_plan(KVER, [(d, shared) for d in devices], Config(),
                     boot_critical=lambda d: "the root disk" if d is devices[1] else None)
    assert [(a.id, a.syspath, a.modalias) for a in plan.devices] == [(d.id, d.syspath, d.modalias) for d in devices]
    assert [a.boot_critical for a in plan.devices] == [None, "the root disk", None]
    assert [p.for_modules for p in plan.install] == [("iavf",)]


def test_two_packages_still_one_plan():
    extra = f"kernel-modules-extra-uname-r = {KVER}"
    judged = [(vf(0), missing()), (vf(1), missing("kmg_x", "kernel-modules-extra", extra))]
    plan = make_plan(KVER, judged, Config())
    assert [p.request for p in plan.install] == [REQ, extra]


def test_package_outside_the_allow_list_is_refused_not_installed():
    plan = make_plan(KVER, [(vf(0), missing(package="evil-modules", request="evil-modules"))], Config())
    assert plan.install == () and plan.load == ()
    assert plan.devices[0].action == "refused"
    assert "allow-list" in plan.devices[0].reason
    assert not plan.needs_action


def test_loadable_loads_the_first_usable_module_and_builtin_does_nothing():
    loadable = Verdict("loadable", "r", installed_modules=("kmg_banned", "kmg_ok"), blacklisted=("kmg_banned",))
    builtin = Verdict("loadable", "r", installed_modules=("kmg_builtin",), builtin=True)
    plan = make_plan(KVER, [(vf(0), loadable), (vf(1), builtin)], Config())
    assert plan.load == ("kmg_ok",)
    assert [d.action for d in plan.devices] == ["load", "none"]


def test_bound_unknown_and_ignored_devices_need_nothing():
    judged = [(vf(0), Verdict("bound", "bound to iavf", driver="iavf")), (vf(1), Verdict("unknown", "no driver")),
              (vf(2), Verdict("ignored", "driver_override"))]
    plan = make_plan(KVER, judged, Config())
    assert not plan.needs_action and plan.install == ()
    assert not plan.initramfs.rebuild


def test_boot_critical_devices_reach_the_initramfs_decision():
    seen = {}

    def decide(modules, critical, packages):
        seen.update(modules=modules, critical=critical, packages=packages)
        return InitramfsDecision(True, "package", "kernel-modules rebuilds it", tuple(critical))

    judged = [(vf(0), missing("mpt3sas")), (vf(1), missing("iavf"))]
    plan = make_plan(KVER, judged, Config(), decide_initramfs=decide,
                     boot_critical=lambda d: "backs / through sda" if d.sysname.endswith("00.0") else None)
    assert seen == {"modules": ["mpt3sas", "iavf"], "critical": {"mpt3sas": "backs / through sda"},
                    "packages": ["kernel-modules"]}
    assert plan.devices[0].boot_critical == "backs / through sda" and plan.devices[1].boot_critical is None
    assert plan.initramfs.as_json() == {"rebuild": True, "by": "package", "reason": "kernel-modules rebuilds it",
                                        "drivers": ["mpt3sas"]}
