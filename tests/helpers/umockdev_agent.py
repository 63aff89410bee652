"""A umockdev testbed in a process of its own, run under umockdev-wrapper (its libudev must see
the testbed to send uevents), driven by JSON lines on stdin; each command is answered by one JSON
line on stdout. Tests talk to it through daemon_world.Testbed.

  {"op": "add", "records": "P: /devices/...\\n..."}          -> {"ok": true}
  {"op": "uevent", "syspaths": [...], "action": "add", "pace": 0.002} -> {"ok": true, "sent": [t, ...]}
      (a burst; "sent": time.monotonic() as each uevent was handed to umockdev)
  {"op": "remove", "syspath": "/sys/devices/..."}            -> {"ok": true}
  {"op": "link", "syspath": ..., "name": "driver", "target": "../../..."} -> {"ok": true}
  first line written on start: {"root": testbed root dir}
"""

import json
import sys
import time

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

testbed = UMockdev.Testbed.new()
print(json.dumps({"root": testbed.get_root_dir()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    ok = True
    sent = []
    if op == "add":
        ok = testbed.add_from_string(cmd["records"])
    elif op == "uevent":
        # umockdev delivers to each listener over a unix datagram socket and aborts when its queue
        # is full: the daemon of the tests runs where that queue is deep (daemon_world.py); a
        # short pause still spreads a burst as a kernel creating VFs would.
        for i, syspath in enumerate(cmd["syspaths"]):
            if i:
                time.sleep(cmd.get("pace", 0.002))
            sent.append(time.monotonic())  # CLOCK_MONOTONIC: comparable with every process's clock
            testbed.uevent(syspath, cmd["action"])
    elif op == "remove":
        testbed.remove_device(cmd["syspath"])
    elif op == "link":
        testbed.set_attribute_link(cmd["syspath"], cmd["name"], cmd["target"])
    else:
        ok = False
    print(json.dumps({"ok": bool(ok), **({"sent": sent} if sent else {})}), flush=True)
testbed.clear()
