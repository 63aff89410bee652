"""kmodguard's kernel-install plugin (units/90-kmodguard.install) run by Debian's real kernel-install
on the Fedora-like machine (fedora_machine.py) when a new kernel arrives.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from dnfimage import dnf
from fedora_machine import REQ_NEXT, add_next_kernel, kernel_install
from rpmbuild import KVER_NEXT


def test_kernel_install_plugin_reports_a_stranded_device_and_never_fails(machine, tmp_path):
    kmg, root = machine
    add_next_kernel(root)
    res = kernel_install(kmg, root, tmp_path, KVER_NEXT)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"under kernel {KVER_NEXT}, 1 device(s) would have no driver" in out
    assert f"'{REQ_NEXT}'" in out  # named from the index it derived for NEXT
    motd = (tmp_path / "motd.d" / "kmodguard-kernel").read_text()
    assert "0000:00:05.0" in motd and REQ_NEXT in motd
    assert Path(kmg.env["KMODGUARD_INDEX_DIR"], KVER_NEXT, "kernel-modules").is_symlink()
    # once the package is there for NEXT, the plugin is quiet and the MOTD fragment goes away
    assert dnf(root, "install", REQ_NEXT).returncode == 0
    subprocess.run(["depmod", "-b", str(root), KVER_NEXT], check=True)
    res = kernel_install(kmg, root, tmp_path, KVER_NEXT)
    assert res.returncode == 0 and "keeps one" in res.stdout
    assert not (tmp_path / "motd.d" / "kmodguard-kernel").exists()


def test_kernel_install_plugin_exits_0_even_when_kmodguard_fails(machine, tmp_path):
    kmg, root = machine
    add_next_kernel(root)
    etc = tmp_path / "broken-etc"
    etc.mkdir()
    (etc / "kmodguard.toml").write_text('mode = "sometimes"\n')  # every kmodguard command now fails
    res = kernel_install(kmg, root, tmp_path, KVER_NEXT, {"KMODGUARD_CONFIG_DIR": str(etc)})
    assert res.returncode == 0, res.stderr  # the kernel's installation goes on
    assert "mode must be one of off, offer, auto" in res.stdout  # and says why it could not check
