"""The remediation plan: decided from verdicts and policy before anything is touched. Pure.

All devices found together give ONE plan and so one package transaction. Package requests are
built (kmodguard.requests) from an allow-listed package name and the plan's kernel; the index's
stored request must be exactly that one, or the device is refused; nothing in a plan is
taken from device strings except the device's identity.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from .. import requests
from ..config import Config
from ..errors import InvalidInput
from ..devices import Device
from ..initramfs import InitramfsDecision
from .diagnosis import Verdict


class PackageRequest(NamedTuple):
    package: str
    version: str
    request: str  # what the package manager is asked for, e.g. 'kernel-modules-uname-r = KVER'
    download_size: int | None = None
    installed_size: int | None = None
    kind: str = "modules"  # modules | firmware
    for_modules: tuple[str, ...] = ()  # the modules it serves

    def as_json(self) -> dict:
        return {"package": self.package, "version": self.version, "request": self.request,
                "download_size": self.download_size, "installed_size": self.installed_size,
                "kind": self.kind, "for": list(self.for_modules)}


class DeviceAction(NamedTuple):
    id: str
    syspath: str
    subsystem: str
    modalias: str
    verdict: str
    action: str  # install | load | none | refused
    module: str | None
    package: str | None
    reason: str
    boot_critical: str | None = None  # why it is needed before the real root is mounted

    def as_json(self) -> dict:
        return dict(self._asdict())


class Plan(NamedTuple):
    kernel: str
    install: tuple[PackageRequest, ...]
    load: tuple[str, ...]
    devices: tuple[DeviceAction, ...]
    initramfs: InitramfsDecision
    blocked: str | None = None  # why nothing may be done here (container, image mode)

    @property
    def needs_action(self) -> bool:
        return bool(self.install or self.load)

    def as_json(self) -> dict:
        return {
            "kernel": self.kernel,
            "install": [p.as_json() for p in self.install],
            "load": list(self.load),
            "initramfs": self.initramfs.as_json(),
            "devices": [d.as_json() for d in self.devices],
            "blocked": self.blocked,
        }


NO_INITRAMFS = InitramfsDecision(False, None, "no device in the plan is needed before the real root is mounted")


def make_plan(kernel: str, judged: list[tuple[Device, Verdict]], config: Config, *,
              blocked: str | None = None,
              boot_critical: Callable[[Device], str | None] = lambda d: None,
              decide_initramfs: Callable[[list[str], dict[str, str], list[str]], InitramfsDecision]
              = lambda modules, critical, packages: NO_INITRAMFS,
              ) -> Plan:
    """One plan for all the judged devices.

    boot_critical(device) says why a device is needed in the initramfs (or None);
    decide_initramfs(modules, {module: why}, [packages to install]) turns that into a decision
    (initramfs.decide; a package whose own scriptlet runs dracut makes it "by": "package").
    """
    install: dict[str, PackageRequest] = {}
    load: dict[str, None] = {}
    actions = []
    critical: dict[str, str] = {}
    # devices that share a verdict (the VFs of one PF do) share its decision: the requests are
    # built and checked once, not once a device (id: `judged` keeps every verdict alive)
    decided: dict[int, tuple[DeviceAction, list[PackageRequest]]] = {}
    for device, verdict in judged:
        shared = decided.get(id(verdict))
        if shared is None:
            action, request = _action(device, verdict, config, kernel)
            wanted = ([request] if request is not None else []) + (
                _firmware_requests(action.module, verdict, config) if action.action in ("install", "load") else [])
            decided[id(verdict)] = (action, wanted)
        else:
            action = shared[0]._replace(id=device.id, syspath=device.syspath, subsystem=device.subsystem,
                                        modalias=device.modalias)
            wanted = shared[1]
        if action.action in ("install", "load"):
            why = boot_critical(device)
            if why and action.module:
                critical[action.module] = why
                action = action._replace(boot_critical=why)
            if action.module and not verdict.builtin:  # None: a repository's package; its module is known once installed
                load[action.module] = None
            # the module's package and its firmware packages: all in the one transaction
            for r in wanted:
                known = install.setdefault(r.request, r)
                if action.module and action.module not in known.for_modules:
                    install[r.request] = known._replace(for_modules=known.for_modules + (action.module,))
        actions.append(action)
    modules = list(load)
    packages = list(dict.fromkeys(p.package for p in install.values() if p.kind == "modules"))
    decision = decide_initramfs(modules, critical, packages) if modules else NO_INITRAMFS
    return Plan(kernel, tuple(install.values()), tuple(modules), tuple(actions), decision, blocked)


def _firmware_need(module: str | None, verdict: Verdict):
    if verdict.verdict == "loadable":
        return verdict.firmware
    return next((c.firmware for c in verdict.candidates if c.module == module), None)


def _firmware_requests(module: str | None, verdict: Verdict, config: Config) -> list[PackageRequest]:
    """The firmware packages the module needs: allow-listed (firmware_packages), asked for by name."""
    need = _firmware_need(module, verdict)
    out = []
    for package, version in (need.packages if need else ()):
        if config.firmware_allowed(package):
            out.append(PackageRequest(package, version, requests.build_name(package), kind="firmware"))
    return out


def _action(device: Device, verdict: Verdict, config: Config,
            kernel: str) -> tuple[DeviceAction, PackageRequest | None]:
    """What to do for one device, and the package request (built, not copied) when it is an install."""
    base = dict(id=device.id, syspath=device.syspath, subsystem=device.subsystem, modalias=device.modalias,
                verdict=verdict.verdict)
    if verdict.verdict == "loadable":
        usable = [m for m in verdict.installed_modules if m not in verdict.blacklisted]
        if verdict.builtin:
            inside = verdict.firmware.module if verdict.firmware else usable[0]
            fw = [r.package for r in _firmware_requests(inside, verdict, config)]
            if fw:  # the driver is in the kernel already: its firmware, then a re-probe
                return DeviceAction(**base, action="install", module=inside, package=fw[0],
                                    reason=f"install {', '.join(fw)} for the firmware of the built-in driver "
                                           f"{inside} and re-probe the device"), None
            return DeviceAction(**base, action="none", module=inside, package=None,
                                reason="a built-in driver matches and did not bind: loading cannot help; see dmesg"), None
        fw = [r.package for r in _firmware_requests(usable[0], verdict, config)]
        if fw:
            return DeviceAction(**base, action="install", module=usable[0], package=fw[0],
                                reason=f"install {', '.join(fw)} for the firmware of {usable[0]}, load it and "
                                       "re-probe the device"), None
        return DeviceAction(**base, action="load", module=usable[0], package=None,
                            reason=f"load the installed module {usable[0]}"), None
    if verdict.verdict == "missing":
        refused, bad = [], []
        for cand in verdict.candidates:
            if not config.package_allowed(cand.package, kernel):
                refused.append(cand.package)
                continue
            try:
                request = requests.for_package(cand.package, kernel, cand.version, cand.request)
            except InvalidInput as exc:  # the index's request is not the one kmodguard builds
                bad.append((cand.package, exc.message))
                continue
            fw = [r.package for r in _firmware_requests(cand.module, verdict, config)]
            also = f" and {', '.join(fw)} for its firmware" if fw else ""
            what = cand.module or "the driver its repository metadata announces for this device"
            return (DeviceAction(**base, action="install", module=cand.module, package=cand.package,
                                 reason=f"install {cand.package} {cand.version} for {what}{also}"),
                    PackageRequest(cand.package, cand.version, request))
        if bad:
            return DeviceAction(**base, action="refused", module=verdict.candidates[0].module, package=bad[0][0],
                                reason=f"the index of {bad[0][0]} holds a request kmodguard does not make: "
                                       f"{bad[0][1]}; rebuild it with 'kmodguard index build'"), None
        return DeviceAction(**base, action="refused", module=verdict.candidates[0].module, package=refused[0],
                            reason=f"{', '.join(dict.fromkeys(refused))} is not in the allow-list "
                                   "('packages' in /etc/kmodguard/kmodguard.toml)"), None
    return DeviceAction(**base, action="none", module=None, package=None,
                        reason=f"{verdict.verdict}: {verdict.reason}"), None
