"""umockdev device records (umockdev-record's text format) for the devices a test fakes: the
sysfs a kmodguard process sees under umockdev-run (`Kmodguard.with_devices` in conftest.py)."""

from __future__ import annotations


def pci(addr: str, modalias: str, *, driver: str | None = None, override: str | None = "(null)",
        attrs: dict | None = None, links: dict | None = None) -> str:
    """A PCI device record (under /devices/pci0000:00/), optionally bound to `driver`."""
    lines = [f"P: /devices/pci0000:00/{addr}", "E: SUBSYSTEM=pci", f"E: PCI_SLOT_NAME={addr}"]
    if driver:
        lines.append(f"E: DRIVER={driver}")
    lines += [f"E: MODALIAS={modalias}", f"A: modalias={modalias}"]
    if override is not None:
        lines.append(f"A: driver_override={override}")
    lines += [f"A: {k}={v}" for k, v in (attrs or {}).items()]
    if driver:
        lines.append(f"L: driver=../../../bus/pci/drivers/{driver}")
    lines += [f"L: {k}={v}" for k, v in (links or {}).items()]
    return "\n".join(lines) + "\n\n"


def device(path: str, subsystem: str, modalias: str, *, links: dict | None = None) -> str:
    """A device record on any bus; `path` starts with /devices/."""
    lines = [f"P: {path}", f"E: SUBSYSTEM={subsystem}", f"E: MODALIAS={modalias}", f"A: modalias={modalias}"]
    lines += [f"L: {k}={v}" for k, v in (links or {}).items()]
    return "\n".join(lines) + "\n\n"
