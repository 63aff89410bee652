"""dnf 4 plugin: new kernels keep the driver packages this machine needs; removals that would
take a driver from a device are announced before they run.

Installed as dnf-plugins/kmodguard.py (a shim importing `Kmodguard` from here) and enabled by
/etc/dnf/plugins/kmodguard.conf. After dnf has resolved a transaction:

- for each kernel it installs (a package providing KIND-core-uname-r = NEW, e.g. kernel-core),
  the modules packages whose modules drive this machine's devices now (kmodguard's
  lifecycle.driver_packages: kernel-modules when a GPU is bound to amdgpu, ...) are added for NEW,
  each by its exact-version provide (NAME-uname-r = NEW), unless the transaction or the system
  already has it; then dnf resolves again. Fedora's installonlypkg rule brings an installed
  kernel-modules along by itself; this covers drivers that came from elsewhere and systems
  without that rule, and never asks for a package that is not allow-listed.
- for each package the transaction erases, the devices whose every matching module it holds are
  named (kmodguard check --removal's answer) in a warning before the transaction runs.

A plugin must never break dnf: every failure here becomes a one-line warning.
"""

from __future__ import annotations

import logging
import os

import dnf
import dnf.transaction

logger = logging.getLogger("dnf.plugin.kmodguard")

CORE_SUFFIX = "-core-uname-r"


def _new_kernels(packages) -> set[str]:
    """Kernel versions a set of packages brings: their KIND-core-uname-r provides."""
    out = set()
    for pkg in packages:
        for provide in pkg.provides:
            name, _, version = str(provide).partition(" = ")
            if name.endswith(CORE_SUFFIX) and name.startswith("kernel") and version:
                out.add(version)
    return out


class Kmodguard(dnf.Plugin):
    name = "kmodguard"

    def __init__(self, base, cli):
        super().__init__(base, cli)
        self._extended = False  # dnf resolves again after we add packages: act once

    def _engine(self):
        from ..engine.api import Engine
        from ..paths import Paths

        root = self.base.conf.installroot or "/"
        overrides = {} if os.environ.get("KMODGUARD_ROOT") else {"root": root}
        return Engine(Paths.from_environment(**overrides))

    def resolved(self):
        if self._extended:
            return
        try:
            self._resolved()
        except Exception as exc:  # noqa: BLE001 - a plugin must never break dnf
            logger.warning("kmodguard: skipped its checks: %s", exc)

    def _resolved(self):
        from ..devices import enumerate_devices
        from ..engine import lifecycle

        tx = self.base.transaction
        if tx is None:
            return
        installing = list(tx.install_set)
        erasing = [item.pkg for item in tx if item.action == dnf.transaction.PKG_REMOVE]
        new_kernels = _new_kernels(installing)
        if not new_kernels and not erasing:
            return
        engine = self._engine()
        devices = enumerate_devices()
        if erasing:
            self._warn_removals(engine, devices, erasing)
        if new_kernels:
            self._add_driver_packages(engine, devices, installing, new_kernels, lifecycle)

    def _warn_removals(self, engine, devices, erasing) -> None:
        from ..engine.lifecycle import removal

        running = engine.paths.installed_modules
        for pkg in erasing:
            if not any(f.startswith(str(running).removeprefix(str(engine.paths.root).rstrip("/")) + "/")
                       for f in pkg.files):
                continue  # not the running kernel's modules (an old kernel being cleaned up)
            doc = removal(engine, devices, [str(pkg)])
            if doc["loses_driver"]:
                logger.warning("kmodguard: removing %s takes the driver of %s (modules: %s); they stop working "
                               "after a reboot or a re-probe", pkg.name, ", ".join(doc["loses_driver"]),
                               ", ".join(sorted({m for d in doc["devices"] for m in d["modules_lost"]})))

    def _add_driver_packages(self, engine, devices, installing, new_kernels, lifecycle) -> None:
        needed = lifecycle.driver_packages(engine, devices)
        provided = {str(p).replace(" ", "") for pkg in installing for p in pkg.provides}
        installed = self.base.sack.query().installed()
        added = []
        for kver in sorted(new_kernels):
            for name, device_ids in sorted(needed.items()):
                if not engine.policy.package_allowed(name):
                    continue
                request = f"{name}-uname-r = {kver}"
                if request.replace(" ", "") in provided or installed.filter(provides=request):
                    continue
                try:
                    self.base.install(request)
                except dnf.exceptions.MarkingError:
                    logger.warning("kmodguard: %s drives %s now, but no repository has it for kernel %s (%s): "
                                   "those devices will have no driver under that kernel",
                                   name, ", ".join(device_ids), kver, request)
                    continue
                added.append((request, device_ids))
        if not added:
            return
        for request, device_ids in added:
            logger.info("kmodguard: adding %s: it drives %s", request, ", ".join(device_ids))
        self._extended = True
        self.base.resolve()
