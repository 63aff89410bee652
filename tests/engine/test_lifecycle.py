"""A machine's life after its first fix (fedora_machine.py): a new kernel arrives, a modules package
is removed. What is checked: `kmodguard check --removal / --kver`, read from rpm's database and the
real dracut's image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dnfimage import dnf, installed
from fedora_machine import GPU, NIC, REQ_NEXT, add_next_kernel, config_dir, kernel_install
from records import pci
from rpmbuild import KVER, KVER_NEXT


def test_removal_of_the_package_that_drives_a_device_is_named(machine):
    kmg, root = machine
    doc = kmg("check", "--removal", "kernel-modules", "--json", check_code=3).json
    assert doc["loses_driver"] == ["0000:00:05.0"]  # the GPU; the NIC's driver is in kernel-modules-core
    (gpu,) = doc["devices"]
    assert gpu["modules_lost"] == ["kmg_gpu"] and gpu["modules_kept"] == [] and gpu["driver"] == "kmg_gpu"
    human = kmg("check", "--removal", "kernel-modules", check_code=3).stdout
    assert "would leave 1 device(s) without a driver" in human and "0000:00:05.0" in human and "kmg_gpu" in human
    before = installed(root)
    assert kmg("check", "--removal", "kernel-core", check_code=0).stdout.startswith(
        "kmodguard check: removing kernel-core takes no device's driver")  # it holds no module
    doc = kmg("check", "--removal", "kernel-modules-core", "--json", check_code=3).json
    assert doc["loses_driver"] == ["0000:00:03.0"]  # the NIC's
    assert installed(root) == before  # nothing was removed by asking


def test_removal_of_a_package_that_is_not_installed_is_a_clear_error(machine):
    kmg, _ = machine
    res = kmg("check", "--removal", "kernel-nonsense", "--json", check_code=2)
    assert res.json["error"]["message"] == "kernel-nonsense is not installed"


def _dpkg_status(root: Path, packages: dict[str, list[str]]) -> None:
    """A dpkg database in ROOT (status and the .list of each package), as a Debian system has."""
    admin = root / "var/lib/dpkg"
    (admin / "info").mkdir(parents=True, exist_ok=True)
    (admin / "updates").mkdir(exist_ok=True)
    entries = []
    for name, files in packages.items():
        entries.append(f"Package: {name}\nStatus: install ok installed\nPriority: optional\nSection: kernel\n"
                       f"Installed-Size: 12\nMaintainer: kmodguard tests <tests@example.org>\nArchitecture: all\n"
                       f"Version: 1.0\nDescription: a kmodguard test package\n")
        (admin / "info" / f"{name}.list").write_text("".join(f"{f}\n" for f in files))
    (admin / "status").write_text("\n".join(entries))


def test_a_root_with_rpm_and_dpkg_databases_asks_rpm_first_then_dpkg(machine):
    """A Debian root (dpkg status) whose kernel packages rpm installed (the end-to-end guest's
    case): rpm owns its modules, dpkg what rpm does not know."""
    kmg, root = machine
    dkms = f"/lib/modules/{KVER}/updates/dkms/kmg_dkms.ko"
    (root / dkms.lstrip("/")).parent.mkdir(parents=True)
    (root / dkms.lstrip("/")).write_bytes(b"\0" * 8192)
    _dpkg_status(root, {"base-files": ["/etc", "/etc/debian_version"],
                        "kmg-dkms": ["/lib", "/lib/modules", f"/lib/modules/{KVER}", f"/lib/modules/{KVER}/updates",
                                     f"/lib/modules/{KVER}/updates/dkms", dkms]})
    (root / "etc/debian_version").write_text("12.0\n")
    doc = kmg("check", "--removal", "kernel-modules", "--json", check_code=3).json  # rpm's package files
    assert doc["loses_driver"] == ["0000:00:05.0"]
    assert kmg("check", "--removal", "kmg-dkms", check_code=0).stdout.startswith(  # dpkg's package files
        "kmodguard check: removing kmg-dkms takes no device's driver")
    kmg("check", "--removal", "kernel-nonsense", check_code=2)  # in neither database
    doc = kmg("footprint", "--json", check_code=0).json
    rows = {p["package"]: p for p in doc["packages"]}
    assert set(rows) == {"kernel-modules-core-6.1.0-56.fc42", "kernel-modules-6.1.0-56.fc42", "kmg-dkms"}
    assert doc["unowned_modules"] == 0
    assert rows["kernel-modules-6.1.0-56.fc42"]["devices"] == ["0000:00:05.0"]
    assert rows["kernel-modules-6.1.0-56.fc42"]["package_bytes"] > 0  # rpm's sizes
    assert rows["kmg-dkms"]["installed_bytes"] == 12 * 1024 and rows["kmg-dkms"]["package_bytes"] is None  # dpkg's


def test_ownership_without_an_rpm_database_asks_dpkg_alone_and_creates_none(tmp_path):
    from kmodguard.engine import ownership

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/debian_version").write_text("12.0\n")
    (root / "etc/stray").write_text("")
    _dpkg_status(root, {"base-files": ["/etc", "/etc/debian_version"]})
    found = ownership.owners([str(root / "etc/debian_version"), str(root / "etc/stray"), str(root / "etc/absent")],
                             root)
    assert found == {str(root / "etc/debian_version"): "base-files", str(root / "etc/stray"): None,
                     str(root / "etc/absent"): None}
    assert ownership.package_files("base-files", root) == ["/etc", "/etc/debian_version"]
    assert ownership.sizes(["base-files", "nothing"], root) == {
        "base-files": {"installed_bytes": 12 * 1024, "package_bytes": None},
        "nothing": {"installed_bytes": None, "package_bytes": None}}
    assert sorted(p.name for p in root.iterdir()) == ["etc", "var"]  # rpm made no database here
    bare = tmp_path / "bare"  # no database at all
    bare.mkdir()
    assert ownership.owners([str(bare / "x")], bare) == {str(bare / "x"): None}
    assert list(bare.iterdir()) == []


def test_a_new_kernel_without_the_modules_package_would_strand_the_gpu(machine):
    kmg, root = machine
    add_next_kernel(root)
    doc = kmg("check", "--kver", KVER_NEXT, "--json", check_code=3).json
    assert doc["running"] == KVER and doc["kernel"] == KVER_NEXT
    verdicts = {d["id"]: (d["verdict_after"], d["loses_driver"]) for d in doc["devices"]}
    assert verdicts == {"0000:00:03.0": ("loadable", False), "0000:00:05.0": ("unindexed", True)}
    assert doc["install"] == []  # NEXT has no index yet: kmodguard cannot name the package
    # the kernel-install plugin's first step: an index for NEXT derived from the running kernel's
    derived = kmg("index", "derive", "--kver", KVER_NEXT, "--json", check_code=0).json
    assert {p["package"]: p["request"] for p in derived["built"]} == {
        "kernel-modules": REQ_NEXT, "kernel-modules-extra": f"kernel-modules-extra-uname-r = {KVER_NEXT}"}
    assert all(p["derived_from"] == KVER for p in derived["built"])
    doc = kmg("check", "--kver", KVER_NEXT, "--json", check_code=3).json
    assert doc["install"] == [{"package": "kernel-modules", "version": "6.1.0-57.fc42", "request": REQ_NEXT}]
    human = kmg("check", "--kver", KVER_NEXT, check_code=3).stdout
    assert "0000:00:05.0" in human and "kmg_gpu in kernel-modules 6.1.0-57.fc42 (not installed for it)" in human
    assert f"'{REQ_NEXT}'" in human
    # with the package installed for NEXT, nothing is stranded
    res = dnf(root, "install", REQ_NEXT)
    assert res.returncode == 0, res.stdout
    subprocess.run(["depmod", "-b", str(root), KVER_NEXT], check=True)
    assert "keeps one (2 checked)" in kmg("check", "--kver", KVER_NEXT, check_code=0).stdout


def _dracut(root: Path, kver: str, tmp_path: Path, add_drivers: str = "") -> tuple[Path, str]:
    """kernel KVER's initramfs as the real dracut makes it from KVER's installed modules, with a
    dracut.conf.d that holds kmodguard's drop-in when add_drivers is given (host-only off: only
    what is asked for goes in). Returns (image, what dracut said)."""
    confdir = tmp_path / f"dracut.conf.d-{len(list(tmp_path.glob('dracut.conf.d-*')))}"
    confdir.mkdir()
    if add_drivers:
        (confdir / "90-kmodguard.conf").write_text(f'add_drivers+=" {add_drivers} "\n')
    (tmp_path / "dracut-tmp").mkdir(exist_ok=True)
    image = root / "boot" / f"initramfs-{kver}.img"
    image.parent.mkdir(exist_ok=True)
    res = subprocess.run(["dracut", "--kver", kver, "-k", str(root / "lib/modules" / kver), "--conf", "/dev/null",
                          "--confdir", str(confdir), "--tmpdir", str(tmp_path / "dracut-tmp"), "--no-hostonly",
                          "-m", "base", "--no-early-microcode", "--compress", "cat", "--force", str(image)],
                         capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr  # dracut exits 0 even when a driver is missing
    return image, res.stdout + res.stderr


def test_check_kver_is_loud_when_the_new_initramfs_lacks_a_driver_needed_at_boot(machine, tmp_path):
    """The root comes over the network through the NIC (kmg_core_nic, in kernel-modules-core):
    NEXT's initramfs must hold that driver. When it does not (an image built without it; or the
    drop-in names it, NEXT's tree lacks it, and dracut only says 'Failed to find module'), check
    --kver says so: exit 3, initramfs.lacks_driver, a warning naming device, module and kernel
    (in the journal with --notify), and the MOTD."""
    from journal import JOURNAL_CATCHER

    kmg, root = machine
    nic = pci("0000:00:03.0", NIC, driver="kmg_core_nic").replace("\n\n", "\nA: class=0x020000\n\n")
    kmg = dataclasses.replace(kmg).with_devices(nic + pci("0000:00:05.0", GPU, driver="kmg_gpu"), tmp_path)
    (Path(kmg.env["KMODGUARD_PROC"]) / "cmdline").write_text("root=nfs4:10.0.0.1:/export/root ip=dhcp rw\n")
    add_next_kernel(root)
    assert dnf(root, "install", REQ_NEXT).returncode == 0  # no device loses its driver in NEXT's tree
    subprocess.run(["depmod", "-b", str(root), KVER_NEXT], check=True)

    # 1. an image without the NIC's driver
    image, _ = _dracut(root, KVER_NEXT, tmp_path)
    doc = kmg("check", "--kver", KVER_NEXT, "--json", check_code=3).json
    assert doc["loses_driver"] == []
    init = doc["initramfs"]
    assert init["checked"] and init["image"] == str(image) and init["lacks_driver"] == ["0000:00:03.0"]
    (dev,) = init["devices"]
    assert dev["module"] == "kmg_core_nic" and dev["in_image"] == [] and "root comes over the network" in \
        dev["needed_because"]
    res = kmg("check", "--kver", KVER_NEXT, check_code=3)
    assert (f"WARNING: the initramfs of kernel {KVER_NEXT} ({image}) lacks kmg_core_nic, the driver of 0000:00:03.0"
            in res.stdout), res.stdout
    assert "lacks kmg_core_nic, the driver of 0000:00:03.0" in res.stderr  # the log's warning

    # 2. kmodguard's drop-in puts it in: quiet, checked
    given = tmp_path / "initrd-given"
    shutil.copy2(image, given)
    _dracut(root, KVER_NEXT, tmp_path, add_drivers="kmg_core_nic")
    doc = kmg("check", "--kver", KVER_NEXT, "--json", check_code=0).json
    assert doc["initramfs"]["checked"] and doc["initramfs"]["lacks_driver"] == []
    assert doc["initramfs"]["devices"][0]["in_image"] == ["kmg_core_nic"]
    # the kernel-install plugin reads the initramfs kernel-install hands it (an INITRD argument)
    res = kernel_install(kmg, root, tmp_path, KVER_NEXT, initrd=given)
    assert res.returncode == 0 and f"({given}) lacks kmg_core_nic, the driver of 0000:00:03.0" in res.stdout, \
        res.stdout + res.stderr

    # 3. NEXT's tree lacks the module the drop-in names: dracut says so, exits 0, and the image lacks it
    for ko in (root / "lib/modules" / KVER_NEXT).rglob("kmg_core_nic.ko*"):
        ko.unlink()
    subprocess.run(["depmod", "-b", str(root), KVER_NEXT], check=True)
    _, said = _dracut(root, KVER_NEXT, tmp_path, add_drivers="kmg_core_nic")
    assert "kmg_core_nic" in said and "Failed" in said, said
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", JOURNAL_CATCHER,
           "umockdev-run", "--device", str(kmg.umockdev), "--", sys.executable, "-m", "kmodguard",
           "check", "--kver", KVER_NEXT, "--notify", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=kmg.env, timeout=300)
    assert out.returncode == 0, out.stderr
    caught = json.loads(out.stdout)
    assert caught["rc"] == 3
    (entry,) = [e for e in caught["entries"] if e.get("MESSAGE_ID") == "1e8150f94bc64906ac691f12b369fc7f"]
    assert entry["PRIORITY"] == "4" and entry["SYSLOG_IDENTIFIER"] == "kmodguard"
    assert entry["MODULE"] == "kmg_core_nic" and entry["DEVICE"] == "/sys/devices/pci0000:00/0000:00:03.0"
    assert entry["KMODGUARD_KERNEL"] == KVER_NEXT and KVER_NEXT in entry["MESSAGE"]
    motd = (Path(kmg.env["KMODGUARD_MOTD_DIR"]) / "kmodguard-kernel").read_text()
    assert f"WARNING: the initramfs of kernel {KVER_NEXT}" in motd and "0000:00:03.0" in motd


def test_check_kver_reads_the_image_for_drivers_kmodguards_drop_in_adds(machine, tmp_path):
    """initramfs = "always" put the GPU's driver in kmodguard's dracut drop-in when it was fixed:
    NEXT's image is meant to hold it although nothing mounts the root through it. With NEXT's
    kernel-modules absent, dracut says "Failed to find module" and exits 0; check --kver names it."""
    kmg, root = machine
    add_next_kernel(root)
    subprocess.run(["depmod", "-b", str(root), KVER_NEXT], check=True)
    conf = Path(kmg.env["KMODGUARD_DRACUT_CONF_DIR"])
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "90-kmodguard.conf").write_text('add_drivers+=" kmg_gpu "\n')
    _, said = _dracut(root, KVER_NEXT, tmp_path, add_drivers="kmg_gpu")
    assert "Failed" in said and "kmg_gpu" in said, said
    doc = kmg("check", "--kver", KVER_NEXT, "--json", check_code=3).json
    init = doc["initramfs"]
    assert init["checked"] and init["lacks_driver"] == ["0000:00:05.0"], init
    (dev,) = init["devices"]
    assert dev["module"] == "kmg_gpu" and "drop-in" in dev["needed_because"], dev


def test_check_kver_leaves_out_devices_the_policy_ignores(machine, tmp_path):
    """A device whose every module the policy ignores is left alone under the new kernel too:
    no "would have no driver" for it (q35's LPC bridge, lpc_ich, in every test guest)."""
    kmg, root = machine
    add_next_kernel(root)
    kmg.env["KMODGUARD_CONFIG_DIR"] = config_dir(kmg, '[ignore]\nmodules = ["pcspkr", "lpc_ich", "kmg_gpu"]\n')
    kmg("index", "derive", "--kver", KVER_NEXT, check_code=0)  # as the kernel-install plugin does
    doc = kmg("check", "--kver", KVER_NEXT, "--json", check_code=0).json
    after = {d["id"]: (d["verdict_after"], d["loses_driver"]) for d in doc["devices"]}
    assert after["0000:00:05.0"] == ("ignored", False), after
    assert doc["loses_driver"] == []
