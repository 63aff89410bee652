"""The Ansible facts script (units/kmodguard.fact): one JSON document and exit 0, even when
kmodguard fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def test_ansible_facts_script_prints_one_document_and_exits_0(machine):
    kmg, root = machine
    env = {**kmg.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(["umockdev-run", "--device", str(kmg.umockdev), "--", str(REPO / "units/kmodguard.fact")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    facts = json.loads(res.stdout)
    assert {d["id"]: d["verdict"] for d in facts["devices"]} == {"0000:00:03.0": "bound", "0000:00:05.0": "bound"}
    broken = {**env, "KMODGUARD_CONFIG_DIR": str(Path(kmg.umockdev).parent / "nowhere" / "x")}
    Path(broken["KMODGUARD_CONFIG_DIR"]).mkdir(parents=True)
    Path(broken["KMODGUARD_CONFIG_DIR"], "kmodguard.toml").write_text("mode = 1\n")
    res = subprocess.run([str(REPO / "units/kmodguard.fact")], env=broken, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and json.loads(res.stdout)["error"]["name"] == "InvalidInput"
