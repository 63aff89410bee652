"""kmodguard finds the devices libudev's own enumerator finds: every bus device (and class entry
of a bus's name) with a MODALIAS, on this machine's real sysfs and on umockdev testbeds."""

from __future__ import annotations

import json
import subprocess
import sys

from synthetic import ALIAS

# libudev's answer (the oracle) and kmodguard's, as JSON lists of syspaths and modaliases
COMPARE = r"""
import json, os
from kmodguard.devices import enumerate_devices, from_udev, udev_context
ctx = udev_context()
e = ctx.list_devices().match_property("MODALIAS", "*")
for bus in sorted(os.listdir(os.path.join(ctx.sys_path, "bus"))):
    e.match_subsystem(bus)
oracle = sorted((d for d in (from_udev(x) for x in e) if d is not None), key=lambda d: d.syspath)
print(json.dumps({"libudev": [list(d) for d in oracle], "kmodguard": [list(d) for d in enumerate_devices(ctx)]}))
"""

RECORDS = "".join([
    "P: /devices/pci0000:00/0000:00:05.0\nE: SUBSYSTEM=pci\nE: MODALIAS={gpu}\nA: modalias={gpu}\n\n",
    "P: /devices/pci0000:00/0000:00:06.0\nE: SUBSYSTEM=pci\nE: DRIVER=kmg_core_nic\nE: MODALIAS={nic}\n"
    "A: modalias={nic}\nL: driver=../../../bus/pci/drivers/kmg_core_nic\n\n",
    "P: /devices/pci0000:00/0000:00:07.0\nE: SUBSYSTEM=pci\n\n",  # no modalias: not listed
    "P: /devices/pci0000:00/0000:00:03.0/virtio0\nE: SUBSYSTEM=virtio\nE: MODALIAS={virtio}\n"
    "A: modalias={virtio}\n\n",
    "P: /devices/vmbus_0/vmbus-1\nE: SUBSYSTEM=vmbus\nE: MODALIAS={vmbus}\nA: modalias={vmbus}\n\n",
    "P: /devices/virtual/input/input3\nE: SUBSYSTEM=input\nE: MODALIAS=input:b0019v0000p0001e0000-e0\n\n",
]).format(gpu=ALIAS["gpu"], nic=ALIAS["installed"], virtio=ALIAS["virtio"], vmbus=ALIAS["vmbus"])


def _compare(cmd: list[str]) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_the_same_devices_as_libudev_on_this_machine():
    doc = _compare([sys.executable, "-c", COMPARE])
    assert doc["kmodguard"] == doc["libudev"]
    assert doc["kmodguard"], "this machine's sysfs has devices with a modalias (its host bridge)"


def test_the_same_devices_as_libudev_on_a_testbed(tmp_path):
    rec = tmp_path / "devices.umockdev"
    rec.write_text(RECORDS)
    doc = _compare(["umockdev-run", "--device", str(rec), "--", sys.executable, "-c", COMPARE])
    assert doc["kmodguard"] == doc["libudev"]
    found = {d[0]: d[3] for d in doc["kmodguard"]}
    assert found == {"/sys/devices/pci0000:00/0000:00:05.0": ALIAS["gpu"],
                     "/sys/devices/pci0000:00/0000:00:06.0": ALIAS["installed"],
                     "/sys/devices/pci0000:00/0000:00:03.0/virtio0": ALIAS["virtio"],
                     "/sys/devices/vmbus_0/vmbus-1": ALIAS["vmbus"]}, found  # input is a class: left out
