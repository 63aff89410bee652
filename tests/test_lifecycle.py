"""A machine's life after its first fix: a new kernel arrives, a modules package is removed.

The image is a real dnf installroot of the Fedora-like kernel (dnfimage.py) holding kernel-core,
kernel-modules-core and kernel-modules of KVER; the repository also has KVER_NEXT. Devices are
umockdev records: a NIC bound to kmg_core_nic (in kernel-modules-core) and a GPU bound to
kmg_gpu (in kernel-modules). What is checked: `kmodguard check --removal / --kver`, the
kernel-install plugin run by Debian's real kernel-install, and the dnf plugin inside real dnf.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import synthetic
from dnfimage import copy_image, dnf, history, image_env, installed
from rpmbuild import KVER, KVER_NEXT

REPO = Path(__file__).resolve().parent.parent
GPU, NIC = synthetic.ALIAS["gpu"], synthetic.ALIAS["installed"]
REQ_NEXT = f"kernel-modules-uname-r = {KVER_NEXT}"


def pci(addr: str, modalias: str, driver: str | None) -> str:
    lines = [f"P: /devices/pci0000:00/{addr}", "E: SUBSYSTEM=pci", f"E: PCI_SLOT_NAME={addr}",
             f"E: MODALIAS={modalias}", f"A: modalias={modalias}", "A: driver_override=(null)"]
    if driver:
        lines += [f"E: DRIVER={driver}", f"L: driver=../../../bus/pci/drivers/{driver}"]
    return "\n".join(lines) + "\n\n"


BOUND = pci("0000:00:03.0", NIC, "kmg_core_nic") + pci("0000:00:05.0", GPU, "kmg_gpu")


@pytest.fixture(scope="module")
def modules_image(base_root, repo, tmp_path_factory):
    """The cloud image after kmodguard fixed its GPU: kernel-modules of KVER installed too."""
    root = copy_image(base_root, tmp_path_factory.mktemp("lifecycle") / "root")
    res = dnf(root, "install", f"kernel-modules-uname-r = {KVER}")
    assert res.returncode == 0, res.stdout
    subprocess.run(["depmod", "-b", str(root), KVER], check=True)
    return root


@pytest.fixture
def machine(modules_image, kmodguard, repo, tmp_path):
    root = copy_image(modules_image, tmp_path / "root")
    proc = tmp_path / "proc"  # a kernel that loads modules (this machine's does not)
    proc.mkdir()
    (proc / "modules").write_text("")
    (proc / "cmdline").write_text("root=/dev/vda1 ro\n")
    env = {**kmodguard.env, **image_env(root, tmp_path), "KMODGUARD_KVER": KVER,
           "KMODGUARD_MOTD_DIR": str(tmp_path / "motd.d"), "KMODGUARD_PROC": str(proc)}
    env.pop("KMODGUARD_MODULES_DIR")  # ROOT/lib/modules/KVER, for every kernel
    kmg = dataclasses.replace(kmodguard, env=env).with_devices(BOUND, tmp_path)
    _, rpms, _ = repo
    kmg("index", "build", "--from-rpm", str(rpms[KVER]["kernel-modules"]), str(rpms[KVER]["kernel-modules-extra"]),
        check_code=0)
    return kmg, root


def add_next_kernel(root: Path) -> None:
    """kernel-core and kernel-modules-core of the next kernel, as a `dnf upgrade` would install them."""
    res = dnf(root, "install", f"kernel-core-uname-r = {KVER_NEXT}", f"kernel-modules-core-uname-r = {KVER_NEXT}")
    assert res.returncode == 0, res.stdout
    subprocess.run(["depmod", "-b", str(root), KVER_NEXT], check=True)


# --- kmodguard check --removal ----------------------------------------------------------------------

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


# --- kmodguard check --kver, index derive, the kernel-install plugin ---------------------------------

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
    nic = pci("0000:00:03.0", NIC, "kmg_core_nic").replace("\n\n", "\nA: class=0x020000\n\n")
    kmg = dataclasses.replace(kmg).with_devices(nic + pci("0000:00:05.0", GPU, "kmg_gpu"), tmp_path)
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
    assert f"lacks kmg_core_nic, the driver of 0000:00:03.0" in res.stderr  # the log's warning

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
    kmg.env["KMODGUARD_CONFIG_DIR"] = _config(kmg, '[ignore]\nmodules = ["pcspkr", "lpc_ich", "kmg_gpu"]\n')
    kmg("index", "derive", "--kver", KVER_NEXT, check_code=0)  # as the kernel-install plugin does
    doc = kmg("check", "--kver", KVER_NEXT, "--json", check_code=0).json
    after = {d["id"]: (d["verdict_after"], d["loses_driver"]) for d in doc["devices"]}
    assert after["0000:00:05.0"] == ("ignored", False), after
    assert doc["loses_driver"] == []


def kernel_install(kmg, root: Path, tmp_path: Path, kver: str, extra_env: dict | None = None,
                   initrd: Path | None = None):
    """Debian's real kernel-install, with only kmodguard's plugin and a boot directory of the test."""
    boot = tmp_path / "boot"
    boot.mkdir(exist_ok=True)
    image = root / "lib/modules" / kver / "vmlinuz"
    # installed as the package installs it (KERNEL_INSTALL_PLUGINS is a blank-separated list: the
    # checkout's path may hold a space)
    plugin = tmp_path / "install.d" / "90-kmodguard.install"
    plugin.parent.mkdir(exist_ok=True)
    shutil.copy2(REPO / "units/90-kmodguard.install", plugin)
    env = {**kmg.env, "KERNEL_INSTALL_PLUGINS": str(plugin), "BOOT_ROOT": str(boot),
           "KERNEL_INSTALL_MACHINE_ID": "0123456789abcdef0123456789abcdef",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(extra_env or {})}
    cmd = ["umockdev-run", "--device", str(kmg.umockdev), "--", "kernel-install", "add", kver, str(image),
           *([str(initrd)] if initrd else [])]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


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


# --- the dnf plugin ------------------------------------------------------------------------------------

@pytest.fixture
def dnf_with_plugin(machine, tmp_path):
    """Real dnf (4) on the image with kmodguard's plugin, as the RPM installs it, seeing the devices."""
    kmg, root = machine
    confdir = tmp_path / "dnf-plugins.d"
    confdir.mkdir()
    (confdir / "kmodguard.conf").write_text((REPO / "packaging/dnf-plugin/kmodguard.conf").read_text())
    # the shim in a plugin directory of its own, as the RPM installs it (dnf splits a pluginpath
    # with a blank in it: the checkout's path may hold one)
    plugindir = tmp_path / "dnf-plugins"
    plugindir.mkdir()
    shutil.copy2(REPO / "packaging/dnf-plugin/kmodguard.py", plugindir / "kmodguard.py")
    env = {**kmg.env, "PYTHONPATH": str(REPO), "LC_ALL": "C"}

    def run(*args: str, devices: Path | None = None, without: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        cmd = ["umockdev-run", "--device", str(devices or kmg.umockdev), "--",
               "dnf", "-y", "--installroot", str(root), f"--setopt=pluginpath={plugindir}",
               f"--setopt=pluginconfpath={confdir}", *args]
        # one stream, in the order dnf wrote it (warnings go to stderr, the transaction to stdout)
        return subprocess.run(cmd, env={k: v for k, v in env.items() if k not in without}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)

    return run, kmg, root


def test_dnf_plugin_adds_the_modules_package_a_new_kernel_needs(dnf_with_plugin):
    run, kmg, root = dnf_with_plugin
    before = len(history(root))
    res = run("install", f"kernel-core-uname-r = {KVER_NEXT}")
    assert res.returncode == 0, res.stdout
    assert f"kmodguard: adding {REQ_NEXT}: it drives 0000:00:05.0" in res.stdout
    assert "kernel-modules-6.1.0-57.fc42" in installed(root)  # in the same transaction
    assert len(history(root)) == before + 1


def test_dnf_plugin_takes_the_root_from_dnf(dnf_with_plugin):
    """As installed, nothing sets KMODGUARD_ROOT: the plugin's root is dnf's installroot, which
    dnf hands over as a str (Debian's dnf 4 does); kmodguard's paths are Paths all the same."""
    run, kmg, root = dnf_with_plugin
    res = run("install", f"kernel-core-uname-r = {KVER_NEXT}", without=("KMODGUARD_ROOT",))
    assert res.returncode == 0, res.stdout
    assert "skipped its checks" not in res.stdout, res.stdout
    assert f"kmodguard: adding {REQ_NEXT}: it drives 0000:00:05.0" in res.stdout
    assert "kernel-modules-6.1.0-57.fc42" in installed(root)


def test_dnf_plugin_adds_nothing_when_no_device_needs_it(dnf_with_plugin, tmp_path):
    run, kmg, root = dnf_with_plugin
    only_nic = tmp_path / "nic.umockdev"
    only_nic.write_text(pci("0000:00:03.0", NIC, "kmg_core_nic"))
    res = run("install", f"kernel-core-uname-r = {KVER_NEXT}", devices=only_nic)
    assert res.returncode == 0, res.stdout
    assert "kmodguard: adding" not in res.stdout
    assert "kernel-modules-6.1.0-57.fc42" not in installed(root)
    assert "kernel-core-6.1.0-57.fc42" in installed(root)


def test_dnf_plugin_warns_before_removing_a_driver_in_use(dnf_with_plugin):
    run, kmg, root = dnf_with_plugin
    res = run("remove", "kernel-modules")
    out = res.stdout
    assert "kmodguard: removing kernel-modules takes the driver of 0000:00:05.0 (modules: kmg_gpu)" in out
    # the warning comes before the transaction runs
    assert out.index("kmodguard: removing") < out.index("Running transaction")


# --- kmodguard index fetch -----------------------------------------------------------------------------

def index_of(kmg, kver: str) -> dict:
    return {p["package"]: p for p in kmg("index", "show", "--kver", kver, "--json", check_code=0).json["packages"]}


def test_fetch_carries_an_index_over_when_the_repository_names_the_modules(machine):
    kmg, root = machine
    kmg.env["KMODGUARD_CONFIG_DIR"] = _config(kmg, 'backend = "dnf"\n')
    doc = kmg("index", "fetch", "--kver", KVER_NEXT, "--json", check_code=0).json
    how = {p["package"]: (p["how"], p["version"], p["request"]) for p in doc["packages"]}
    assert how == {"kernel-modules": ("repository provides", "6.1.0-57.fc42", REQ_NEXT),
                   "kernel-modules-extra": ("repository provides", "6.1.0-57.fc42",
                                            f"kernel-modules-extra-uname-r = {KVER_NEXT}")}
    assert not list(Path(kmg.env["KMODGUARD_STATE_DIR"]).glob("fetch-*"))  # nothing downloaded, nothing left
    # it answers like a real index of NEXT: the GPU's module is in NEXT's kernel-modules
    res = kmg("explain", "--kver", KVER_NEXT, "--json", GPU).json["results"][0]
    assert res["verdict"] == "missing" and res["candidates"][0]["request"] == REQ_NEXT


def test_fetch_downloads_indexes_and_removes_the_download_when_nothing_is_known(machine):
    kmg, root = machine
    kmg.env["KMODGUARD_CONFIG_DIR"] = _config(kmg, 'backend = "dnf"\n')
    before = installed(root)
    doc = kmg("index", "fetch", "--kver", KVER_NEXT, "--download", "--json", check_code=0).json
    assert {p["package"]: p["how"] for p in doc["packages"]} == {"kernel-modules": "downloaded",
                                                                  "kernel-modules-extra": "downloaded"}
    real = index_of(kmg, KVER_NEXT)
    assert real["kernel-modules"]["derived_from"] is None and real["kernel-modules"]["request"] == REQ_NEXT
    assert real["kernel-modules"]["modules"] == 7  # every module of the package, read from the RPM
    assert installed(root) == before  # downloaded, never installed
    assert not list(Path(kmg.env["KMODGUARD_STATE_DIR"]).glob("fetch-*"))  # and the download is gone


def test_fetch_for_a_kernel_no_repository_has_exits_5(machine):
    kmg, root = machine
    kmg.env["KMODGUARD_CONFIG_DIR"] = _config(kmg, 'backend = "dnf"\n')
    res = kmg("index", "fetch", "--kver", "6.1.0-99.fc42.x86_64", "--json", check_code=5)
    assert res.json["error"]["name"] == "PackageUnavailable"
    assert "no repository has a modules package for kernel 6.1.0-99.fc42.x86_64" in res.json["error"]["message"]


def _config(kmg, text: str) -> str:
    etc = Path(kmg.env["KMODGUARD_STATE_DIR"]).parent / "etc-fetch"
    etc.mkdir(exist_ok=True)
    (etc / "kmodguard.toml").write_text(text)
    return str(etc)


# --- footprint, Prometheus metrics, Ansible facts --------------------------------------------------

def test_footprint_tells_what_each_modules_package_costs_and_who_uses_it(machine):
    kmg, root = machine
    doc = kmg("footprint", "--json", check_code=0).json
    rows = {p["package"]: p for p in doc["packages"]}
    assert set(rows) == {"kernel-modules-core-6.1.0-56.fc42", "kernel-modules-6.1.0-56.fc42"}
    mods, core = rows["kernel-modules-6.1.0-56.fc42"], rows["kernel-modules-core-6.1.0-56.fc42"]
    assert mods["modules"] == 7 and mods["modules_in_use"] == ["kmg_gpu"] and mods["devices"] == ["0000:00:05.0"]
    assert core["devices"] == ["0000:00:03.0"] and not core["removable"] and not mods["removable"]
    rpm_size = subprocess.run(["rpm", "--root", str(root), "-q", "--qf", "%{LONGSIZE}", "kernel-modules"],
                              capture_output=True, text=True).stdout
    assert mods["installed_bytes"] == int(rpm_size) and mods["package_bytes"] > 0
    human = kmg("footprint", check_code=0).stdout
    assert "kernel-modules-6.1.0-56.fc42" in human and "needed by 0000:00:05.0" in human
    # with the GPU gone, kernel-modules is dead weight, and footprint says what removing it saves
    nic = dataclasses.replace(kmg).with_devices(pci("0000:00:03.0", NIC, "kmg_core_nic"), Path(kmg.umockdev).parent)
    rows = {p["package"]: p for p in nic("footprint", "--json", check_code=0).json["packages"]}
    assert rows["kernel-modules-6.1.0-56.fc42"]["removable"]
    assert rows["kernel-modules-6.1.0-56.fc42"]["removal_saves_bytes"] == int(rpm_size)


def test_prometheus_metrics_parse_and_count_devices_by_verdict(machine, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    kmg, root = machine
    devices = BOUND + pci("0000:00:07.0", synthetic.ALIAS["extra_xz"], None)  # + one that needs a package
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


# --- kmodguard check --apply-policy (what kmodguard-check.service runs after cloud-init) ------------

EXTRA_DEVICE = pci("0000:00:07.0", synthetic.ALIAS["extra_xz"], None)  # its driver is in kernel-modules-extra


def test_check_in_offer_mode_announces_and_installs_nothing(machine, tmp_path):
    kmg, root = machine
    kmg = kmg.with_devices(BOUND + EXTRA_DEVICE, tmp_path)
    before = installed(root)
    res = kmg("check", "--apply-policy", check_code=3)
    assert "1 device(s) need a driver" in res.stdout and "done: offer: 1 device(s) announced" in res.stdout
    motd = (tmp_path / "motd.d" / "kmodguard").read_text()
    assert "0000:00:07.0: kmg_extra_xz in kernel-modules-extra 6.1.0-56.fc42 (not installed)" in motd
    assert installed(root) == before
    assert "kmodguard check: every device" in kmg.with_devices(BOUND, tmp_path)("check", check_code=0).stdout


def test_check_apply_policy_journal_entry_has_the_daemons_message_id_and_fields(machine, tmp_path):
    """kmodguard-check.service's announcement is the daemon's: the README's MESSAGE_ID with DEVICE=,
    MODALIAS=, PACKAGE=, MODULE= (a journal catcher stands for journald)."""
    from journal import JOURNAL_CATCHER

    kmg, _ = machine
    kmg = kmg.with_devices(BOUND + EXTRA_DEVICE, tmp_path)
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", JOURNAL_CATCHER,
           "umockdev-run", "--device", str(kmg.umockdev), "--", sys.executable, "-m", "kmodguard",
           "check", "--apply-policy"]
    # JOURNAL_STREAM: as systemd sets it for kmodguard-check.service, whose log then goes to the journal
    out = subprocess.run(cmd, capture_output=True, text=True, env={**kmg.env, "JOURNAL_STREAM": "8:1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    caught = json.loads(out.stdout.strip().splitlines()[-1])
    assert caught["rc"] == 3
    (entry,) = [e for e in caught["entries"] if e.get("MESSAGE_ID") == "c167d616d03446fb8fe127f7a6b46fa6"]
    assert entry["DEVICE"].endswith("/0000:00:07.0") and entry["MODALIAS"], entry
    assert entry["PACKAGE"] == "kernel-modules-extra" and entry["MODULE"] == "kmg_extra_xz", entry


def test_check_in_auto_mode_fixes_the_devices_on_auto_buses(machine, tmp_path):
    kmg, root = machine
    etc = Path(_config(kmg, 'mode = "auto"\nbackend = "dnf"\n[timeouts]\nsettle = 0.2\nlock_wait = 5\n'))
    kmg = dataclasses.replace(kmg, env={**kmg.env, "KMODGUARD_CONFIG_DIR": str(etc)}).with_devices(
        BOUND + EXTRA_DEVICE, tmp_path)
    before = len(history(root))
    doc = kmg("check", "--apply-policy", "--json", timeout=300).json
    assert doc["applied"]["action"] == "fix" and doc["applied"]["exit_code"] == 6  # installed; cannot load here
    assert "kernel-modules-extra-6.1.0-56.fc42" in installed(root) and len(history(root)) == before + 1
    record = json.loads((Path(kmg.env["KMODGUARD_STATE_DIR"]) / "last-fix.json").read_text())
    assert record["devices"] == ["0000:00:07.0"]
    # a USB device is not on auto_buses: announced, never installed for
    usb = ("P: /devices/pci0000:00/0000:00:14.0/usb1/1-1\nE: SUBSYSTEM=usb\nE: MODALIAS=" + GPU + "\nA: modalias="
           + GPU + "\n\n")
    doc = kmg.with_devices(BOUND + usb, tmp_path)("check", "--apply-policy", "--json", check_code=3).json
    assert doc["applied"]["action"] == "offer" and "none that mode auto may fix" in doc["applied"]["detail"]
