"""`kmodguard status --prometheus` as Prometheus' own parser reads it, on the Fedora-like machine
(fedora_machine.py), and the textfile it writes.
"""

from __future__ import annotations


import synthetic
from fedora_machine import BOUND
from records import pci
from rpmbuild import KVER


def test_prometheus_metrics_parse_and_count_devices_by_verdict(machine, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    kmg, root = machine
    devices = BOUND + pci("0000:00:07.0", synthetic.ALIAS["extra_xz"])  # + one that needs a package
    kmg = kmg.with_devices(devices, tmp_path)
    text = kmg("status", "--prometheus", check_code=3).stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    verdicts = {s.labels["verdict"]: s.value for s in families["kmodguard_devices"].samples}
    assert verdicts["bound"] == 2 and verdicts["missing"] == 1 and sum(verdicts.values()) == 3
    assert {s.labels["package"] for s in families["kmodguard_index_age_seconds"].samples} == {
        "kernel-modules", "kernel-modules-extra"}
    assert families["kmodguard_daemon_up"].samples[0].value == 0
    (info,) = families["kmodguard_info"].samples
    assert info.labels["kernel"] == KVER and info.labels["mode"] == "offer"
    out = tmp_path / "textfile" / "kmodguard.prom"
    out.parent.mkdir()
    kmg("status", "--prometheus", "--output", str(out), check_code=3)
    written = {f.name: f for f in text_string_to_metric_families(out.read_text())}
    assert written.keys() == families.keys() and oct(out.stat().st_mode & 0o777) == "0o644"
    assert written["kmodguard_devices"].samples == families["kmodguard_devices"].samples
