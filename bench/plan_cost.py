"""Planning cost for an SR-IOV storm (256 VFs) versus one device, same run, same process.

Judging and planning are timed together (the lookups are part of it), on the synthetic world:
every VF carries the same modalias, as the VFs of one PF do. Reports the ratio 256/1 (goal < 3:
the cost must not grow with the number of devices beyond the lookups, which libkmod answers in
microseconds).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests" / "helpers")]

import synthetic  # noqa: E402
from kmodguard.config import Config  # noqa: E402
from kmodguard.devices import Device, PciFacts  # noqa: E402
from kmodguard.engine.diagnosis import Diagnoser  # noqa: E402
from kmodguard.engine.environment import detect  # noqa: E402
from kmodguard.engine.plan import make_plan  # noqa: E402
from kmodguard.index.build import PackageSource, build_package  # noqa: E402
from kmodguard.paths import Paths  # noqa: E402


ENV = None


def vfs(n: int) -> list[Device]:
    pf = "/sys/devices/pci0000:00/0000:00:03.0"
    return [Device(syspath=f"{pf}/0000:01:{i // 8:02x}.{i % 8}", subsystem="pci", sysname=f"0000:01:{i // 8:02x}.{i % 8}",
                   modalias=synthetic.ALIAS["gpu"], pci=PciFacts(physfn=pf, sriov_drivers_autoprobe=True))
            for i in range(n)]


def measure(paths: Paths, devices: list[Device], repeat: int) -> float:
    """From a fresh engine, as `kmodguard fix` plans: open the indexes, judge, plan."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        diagnoser = Diagnoser(paths, Config(), ENV)
        judged = [(d, diagnoser.diagnose(d)) for d in devices]
        plan = make_plan(diagnoser.paths.kver, judged, diagnoser.config)
        times.append(time.perf_counter() - t)
        assert len(plan.install) == 1
    return statistics.median(times)


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        world = synthetic.make_world(Path(tmp) / "world")
        paths = Paths(kver=world.kver, modules_dir=world.installed, index_dir=Path(tmp) / "index",
                      modprobe_dirs=(str(world.modprobe_d),), firmware_dirs=(world.firmware,))
        for name, payload in world.packages.items():
            build_package(paths.index_root, world.kver,
                          PackageSource(name, "1", f"{name}-uname-r = {world.kver}", payload, {}))
        global ENV
        ENV = detect(paths)
        measure(paths, vfs(1), 20)  # warm the page cache
        one = measure(paths, vfs(1), 100)
        storm = measure(paths, vfs(256), 100)
    result = {"plan_1_device_ms": one * 1000, "plan_256_devices_ms": storm * 1000, "ratio_256_to_1": storm / one,
              "per_device_us": storm / 256 * 1e6, "goal": "ratio < 3"}
    return result


if __name__ == "__main__":
    r = main()
    print(f"plan 1 device: {r['plan_1_device_ms']:.3f} ms; 256 devices: {r['plan_256_devices_ms']:.3f} ms; "
          f"ratio {r['ratio_256_to_1']:.1f} (goal < 3); {r['per_device_us']:.1f} us per device")
