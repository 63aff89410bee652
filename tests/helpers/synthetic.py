"""Synthetic kernel modules, built with gcc: real ELF objects that depmod, libkmod and modprobe read.

A module is a C file whose .modinfo section holds "key=value" strings; a dependency is a symbol
one module lists in __ksymtab_strings and another calls (depmod then records the edge).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

KVER = "6.1.0-kmg1-amd64"


@dataclass(frozen=True)
class Module:
    name: str
    aliases: tuple[str, ...] = ()
    firmware: tuple[str, ...] = ()
    exports: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()  # symbols from other modules
    depends: tuple[str, ...] = ()  # the modinfo depends= line kbuild would write
    subdir: str = "kernel/drivers/kmg"
    compress: str | None = None  # None, "xz" or "zst"

    @property
    def filename(self) -> str:
        return f"{self.name}.ko" + {"xz": ".xz", "zst": ".zst", None: ""}[self.compress]


def _c_source(m: Module) -> str:
    lines = []
    infos = [f"name={m.name}", *(f"alias={a}" for a in m.aliases), *(f"firmware={f}" for f in m.firmware),
             f"depends={','.join(m.depends)}", "license=GPL"]
    for i, info in enumerate(infos):
        escaped = info.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'static const char kmg_info{i}[] __attribute__((section(".modinfo"),used,aligned(1))) = "{escaped}";')
    for sym in m.exports:
        lines.append(f'static const char kmg_ks_{sym}[] __attribute__((section("__ksymtab_strings"),used,aligned(1))) = "{sym}";')
        lines.append(f"int {sym}(void) {{ return 1; }}")
    for sym in m.uses:
        lines.append(f"extern int {sym}(void);")
    calls = " + ".join(f"{s}()" for s in m.uses) or "0"
    lines.append(f"int kmg_entry_{m.name.replace('-', '_')}(void) {{ return {calls}; }}")
    return "\n".join(lines) + "\n"


def build_module(m: Module, moddir: Path, workdir: Path) -> Path:
    """Compile m into moddir/m.subdir/m.filename; returns the file."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"{m.name}.c"
    src.write_text(_c_source(m))
    dest_dir = moddir / m.subdir
    dest_dir.mkdir(parents=True, exist_ok=True)
    ko = dest_dir / f"{m.name}.ko"
    subprocess.run(["gcc", "-c", "-O0", "-fno-asynchronous-unwind-tables", "-o", str(ko), str(src)], check=True)
    if m.compress == "xz":
        subprocess.run(["xz", "--check=crc32", "-f", str(ko)], check=True)
    elif m.compress == "zst":
        subprocess.run(["zstd", "-q", "--rm", "-f", str(ko)], check=True)
    return dest_dir / m.filename


def depmod(root: Path, kver: str = KVER, builtin: dict[str, tuple[str, ...]] | None = None,
           builtin_firmware: dict[str, tuple[str, ...]] | None = None) -> Path:
    """Run the real depmod on root/lib/modules/kver; builtin maps module -> aliases built into vmlinuz,
    builtin_firmware module -> the firmware it names (modules.builtin.modinfo, as the kernel build writes it)."""
    mdir = root / "lib" / "modules" / kver
    mdir.mkdir(parents=True, exist_ok=True)
    builtin = builtin or {}
    (mdir / "modules.builtin").write_text("".join(f"kernel/builtin/{n}.ko\n" for n in builtin))
    (mdir / "modules.builtin.modinfo").write_bytes(b"".join(
        f"{n}.alias={a}\0".encode() for n, aliases in builtin.items() for a in aliases) + b"".join(
        f"{n}.firmware={f}\0".encode() for n, names in (builtin_firmware or {}).items() for f in names))
    (mdir / "modules.order").touch()
    empty = root / ".depmod.d"
    empty.mkdir(exist_ok=True)
    subprocess.run([shutil.which("depmod") or "/sbin/depmod", "-C", str(empty), "-b", str(root), kver], check=True)
    return mdir


@dataclass
class World:
    """An installed module tree plus the payloads of two not-installed packages, for one kernel."""

    root: Path
    kver: str = KVER
    installed: Path = field(init=False)
    packages: dict[str, Path] = field(default_factory=dict)  # name -> payload root
    modprobe_d: Path = field(init=False)
    firmware: Path = field(init=False)

    def __post_init__(self):
        self.installed = self.root / "installed" / "lib" / "modules" / self.kver
        self.modprobe_d = self.root / "modprobe.d"
        self.firmware = self.root / "firmware"


# The modaliases tests use, by what they should come out as.
PCI = "pci:v{v:08X}d{d:08X}sv00000000sd00000000bc{bc:02X}sc00i00"
ALIAS = {
    "installed": PCI.format(v=0xAAAA, d=1, bc=2),
    "blacklisted": PCI.format(v=0xAAAA, d=2, bc=2),
    "builtin": PCI.format(v=0xAAAA, d=3, bc=2),
    "gpu": PCI.format(v=0xBBBB, d=1, bc=3),
    "twins": PCI.format(v=0xBBBB, d=2, bc=2),
    "extra_blacklisted": PCI.format(v=0xCCCC, d=1, bc=2),
    "extra_xz": PCI.format(v=0xCCCC, d=2, bc=2),
    "extra_zst": PCI.format(v=0xCCCC, d=3, bc=2),
    "none": PCI.format(v=0xDDDD, d=1, bc=6),
    "virtio": "virtio:d0000ABCDv00001AF4",
    "vmbus": "vmbus:d2b99a10cffac4d8e8fc6d19e3d9cf5e",
    "xen": "xen:kmgvif",
}

INSTALLED = (
    Module("kmg_core_nic", aliases=("pci:v0000AAAAd00000001sv*sd*bc*sc*i*",)),
    Module("kmg_banned", aliases=("pci:v0000AAAAd00000002sv*sd*bc*sc*i*",)),
)
BUILTIN = {"kmg_builtin": ("pci:v0000AAAAd00000003sv*sd*bc*sc*i*",)}
KERNEL_MODULES = (
    Module("kmg_gpu", aliases=("pci:v0000BBBBd00000001sv*sd*bc03sc*i*",),
           firmware=("kmg/gpu_present.bin", "kmg/gpu_absent.bin"), uses=("kmg_helper_fn",), depends=("kmg_helper",),
           subdir="kernel/drivers/gpu/drm/kmg"),
    Module("kmg_helper", exports=("kmg_helper_fn",), subdir="kernel/drivers/gpu/drm/kmg"),
    Module("kmg_twin_a", aliases=("pci:v0000BBBBd00000002sv*sd*bc*sc*i*",)),
    Module("kmg-twin-b", aliases=("pci:v0000BBBBd00000002sv*sd*bc02sc*i*",)),
    Module("kmg_virtio", aliases=("virtio:d0000ABCDv*",), subdir="kernel/drivers/virtio"),
    Module("kmg_vmbus", aliases=("vmbus:d2b99a10cffac4d8e8fc6d19e3d9cf5e",), subdir="kernel/drivers/hv"),
    Module("kmg_xen", aliases=("xen:kmgvif",), subdir="kernel/drivers/xen"),
)
KERNEL_MODULES_EXTRA = (
    Module("kmg_extra", aliases=("pci:v0000CCCCd00000001sv*sd*bc*sc*i*",)),
    Module("kmg_extra_xz", aliases=("pci:v0000CCCCd00000002sv*sd*bc*sc*i*",), compress="xz"),
    Module("kmg_extra_zst", aliases=("pci:v0000CCCCd00000003sv*sd*bc*sc*i*",), compress="zst"),
)


def make_world(root: Path, kver: str = KVER) -> World:
    """Build the standard synthetic world under root (about 0.5 s)."""
    world = World(root, kver)
    work = root / "src"
    for m in INSTALLED:
        build_module(m, world.installed, work)
    depmod(root / "installed", kver, BUILTIN)
    world.modprobe_d.mkdir(parents=True)
    (world.modprobe_d / "admin.conf").write_text("# the admin does not want it\nblacklist kmg_banned\n")
    for name, modules in (("kernel-modules", KERNEL_MODULES), ("kernel-modules-extra", KERNEL_MODULES_EXTRA)):
        payload = root / "payload" / name
        for m in modules:
            build_module(m, payload / "lib" / "modules" / kver, work)
        world.packages[name] = payload
    conf = world.packages["kernel-modules-extra"] / "etc" / "modprobe.d"
    conf.mkdir(parents=True)
    (conf / "kmg-extra-blacklist.conf").write_text("# like Fedora's kernel-modules-extra\nblacklist kmg_extra\n")
    (world.firmware / "kmg").mkdir(parents=True)
    (world.firmware / "kmg" / "gpu_present.bin").write_bytes(b"\0")
    return world
