"""The image itself: where it is, whether it can be regenerated here (not a UKI, not ostree/bootc),
the dracut drop-in, a snapshot, dracut into a temporary file, lsinitrd's proof, the atomic rename."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable

from .. import process
from ..errors import InvalidInput, KmodguardError
from ..fsutil import copy_atomic, fsync_dir, make_dir, write_atomic
from ..paths import Paths

from .decision import MODULE_NAME, _norm
from .topology import _read

log = logging.getLogger("kmodguard.initramfs")


DROP_IN = "90-kmodguard.conf"
DEFAULT_DRACUT_CONF_DIR = Path("/etc/dracut.conf.d")
MODULE_FILE = re.compile(r"/lib/modules/[^/]+/.*?([^/\s]+)\.ko(?:\.(?:xz|zst|gz|bz2|lz4))?$")


class InitramfsFailed(KmodguardError):
    """The initramfs could not be regenerated or verified; the previous image is unchanged."""

    name = "Failed"


def image_path(kver: str, paths: Paths) -> Path:
    """The initramfs of kver: BOOT/initramfs-KVER.img (Fedora, RHEL), or an existing initrd-KVER (SUSE)
    or initrd.img-KVER (Debian, Ubuntu)."""
    default = paths.boot_dir / f"initramfs-{kver}.img"
    if not default.exists():
        for name in (f"initrd-{kver}", f"initrd.img-{kver}"):
            if (paths.boot_dir / name).is_file():
                return paths.boot_dir / name
    return default


def _install_layout(paths: Paths) -> str | None:
    layout = None
    for conf in (paths.root / "usr/lib/kernel/install.conf", paths.root / "etc/kernel/install.conf"):
        text = _read(conf)
        for line in (text or "").splitlines():
            key, eq, value = line.strip().partition("=")
            if eq and key.strip() == "layout":
                layout = value.strip().strip("\"'")
    return layout


def _esp_dirs(paths: Paths) -> list[Path]:
    boot = paths.boot_dir
    return [boot / "efi" / "EFI" / "Linux", boot / "EFI" / "Linux", boot.parent / "efi" / "EFI" / "Linux"]


def _uki_for(kver: str, paths: Paths) -> Path | None:
    """A unified kernel image of kver on the ESP or XBOOTLDR: [TOKEN-]KVER[+TRIES[-DONE]].efi."""
    pattern = re.compile(r"(?:.*-)?" + re.escape(kver) + r"(?:\+\d+(?:-\d+)?)?\.efi", re.IGNORECASE)
    for d in _esp_dirs(paths):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if pattern.fullmatch(name):
                return d / name
    return None


def unsupported(paths: Paths) -> str | None:
    """Why this system's initramfs for paths.kver cannot be regenerated here (reported, never touched)."""
    if (paths.root / "run" / "ostree-booted").exists():
        return ("an image-mode system (ostree/bootc): the initramfs is part of the deployment; "
                "enable client-side regeneration with 'rpm-ostree initramfs --enable' or rebuild the image")
    if _install_layout(paths) == "uki":
        return ("kernel-install uses layout=uki (/etc/kernel/install.conf): the initramfs is inside a "
                "signed unified kernel image that dracut here does not replace")
    uki = _uki_for(paths.kver, paths)
    if uki is not None:
        return (f"kernel {paths.kver} boots from a unified kernel image ({uki}): its initramfs is built in and "
                "signed; kmodguard does not regenerate it")
    if (paths.installed_modules / "vmlinuz-virt.efi").exists() and not image_path(paths.kver, paths).exists():
        return (f"kernel {paths.kver} is a unified kernel image (kernel-uki-virt: "
                f"{paths.installed_modules / 'vmlinuz-virt.efi'}); its initramfs cannot be regenerated here")
    return None


_ADD_DRIVERS = re.compile(r"""^\s*add_drivers\s*\+?=\s*(["'])(.*?)\1\s*(?:#.*)?$""")


def persisted_drivers(paths: Paths) -> list[str]:
    """The drivers in kmodguard's dracut drop-in (sorted), [] when there is none."""
    text = _read(paths.dracut_conf_dir / DROP_IN) or ""
    names: dict[str, str] = {}
    for line in text.splitlines():
        m = _ADD_DRIVERS.match(line)
        if m:
            for name in m.group(2).split():
                if MODULE_NAME.match(name):
                    names.setdefault(_norm(name), name)
    return sorted(names.values())


def persist_drivers(modules: Iterable[str], paths: Paths) -> Path:
    """Merge modules into DRACUT_CONF_DIR/90-kmodguard.conf (add_drivers+=" a b "), atomically.

    Idempotent: the file is rewritten only when its set of drivers changes. dracut sources the file
    with bash, so only plain module names are accepted.
    """
    modules = list(modules)
    for m in modules:
        if not isinstance(m, str) or not MODULE_NAME.match(m):
            raise InvalidInput(f"not a kernel module name: {m!r}")
    path = paths.dracut_conf_dir / DROP_IN
    names = {_norm(n): n for n in persisted_drivers(paths)}
    for m in modules:
        names.setdefault(_norm(m), m)
    drivers = sorted(names.values())
    text = ("# Written by kmodguard: drivers of devices needed before the real root is mounted.\n"
            "# kmodguard merges into this file; dracut keeps these drivers for every new kernel.\n"
            f'add_drivers+=" {" ".join(drivers)} "\n')
    if _read(path) == text.strip():
        return path
    paths.dracut_conf_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())
    log.info("dracut drop-in %s: %s", path, " ".join(drivers))
    return path


def snapshot_path(kver: str, paths: Paths) -> Path:
    return paths.state_dir / f"{image_path(kver, paths).name}.before-kmodguard"


def snapshot(kver: str, paths: Paths) -> Path | None:
    """Copy the current image to STATE_DIR/<image>.before-kmodguard (atomically); None when there is no image."""
    image = image_path(kver, paths)
    if not image.is_file():
        return None
    dest = snapshot_path(kver, paths)
    make_dir(paths.state_dir)
    try:
        copy_atomic(image, dest, dest.with_name(f".{dest.name}.tmp"))
    except OSError as exc:
        raise InitramfsFailed(f"cannot keep a copy of {image} in {paths.state_dir}: {exc.strerror or exc}") from None
    return dest


def restore(kver: str, paths: Paths) -> bool:
    """Put the snapshot back over the image (atomically). False when there is no snapshot."""
    snap = snapshot_path(kver, paths)
    if not snap.is_file():
        return False
    image = image_path(kver, paths)
    try:
        copy_atomic(snap, image, image.with_name(f".{image.name}.kmodguard-restore"))
    except OSError as exc:
        raise InitramfsFailed(f"cannot restore {image} from {snap}: {exc.strerror or exc}") from None
    return True


def _builtin(paths: Paths) -> set[str]:
    text = _read(paths.installed_modules / "modules.builtin") or ""
    return {_norm(os.path.basename(line).split(".ko")[0]) for line in text.splitlines() if line.strip()}


def _tool(name: str) -> str:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}", f"/sbin/{name}")
                                       if os.path.exists(p)), name)


def image_modules(image: Path, timeout: float = 120) -> set[str]:
    """The kernel modules inside an initramfs image (normalized names), as lsinitrd lists them."""
    try:
        proc = process.run([_tool("lsinitrd"), str(image)], timeout, "lsinitrd", text=False)
    except KmodguardError as exc:
        raise InitramfsFailed(f"lsinitrd {image}: {exc.message}") from None
    if proc.returncode != 0:
        raise InitramfsFailed(f"lsinitrd {image} failed (exit {proc.returncode})",
                              hint=_tail(proc.stderr or proc.stdout))
    found = set()
    for line in proc.stdout.decode(errors="replace").splitlines():
        line = line.split(" -> ")[0].rstrip()
        m = MODULE_FILE.search(line)
        if m:
            found.add(_norm(m.group(1)))
    return found


def missing_from_image(kver: str, modules: Iterable[str], paths: Paths, timeout: float = 120) -> list[str]:
    """Which of modules the current image lacks (built-in modules never count as missing)."""
    image = image_path(kver, paths)
    wanted = [m for m in modules if _norm(m) not in _builtin(paths)]
    if not wanted:
        return []
    if not image.is_file():
        return list(wanted)
    inside = image_modules(image, timeout)
    return [m for m in wanted if _norm(m) not in inside]


def _tail(data: bytes | str | None, lines: int = 12) -> str | None:
    if not data:
        return None
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return "\n".join(text.strip().splitlines()[-lines:]) or None


class _Lock:
    """An exclusive lock on STATE_DIR/initramfs.lock, also held by dracut and its children.

    dracut inherits the locked descriptor: when the process that started it is killed, the lock
    stays held until the orphaned dracut ends, so no new rebuild races it for the temporary file.
    """

    def __init__(self, paths: Paths, timeout: float):
        self.path = paths.state_dir / "initramfs.lock"
        try:
            make_dir(paths.state_dir)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InitramfsFailed(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise InitramfsFailed(f"another initramfs rebuild is still running (lock {self.path})") from None
                time.sleep(0.1)

    def close(self) -> None:
        os.close(self.fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def dracut_command(kver: str, modules: Iterable[str], out: Path, paths: Paths,
                   dracut_args: Iterable[str] = ()) -> list[str]:
    """The dracut argument list rebuild runs (extra dracut_args come last, so they win)."""
    args = [_tool("dracut"), "--kver", kver, "-k", str(paths.installed_modules)]
    if paths.dracut_conf_dir.is_dir():
        args += ["--confdir", str(paths.dracut_conf_dir)]
    modules = [m for m in modules]
    if modules:
        args += ["--add-drivers", " ".join(modules)]
    args += ["--force", *dracut_args, str(out)]
    return args


def rebuild(kver: str, modules: Iterable[str], paths: Paths, timeout: float = 600,
            dracut_args: Iterable[str] = ()) -> None:
    """Regenerate BOOT/initramfs-KVER.img with modules inside, or leave it byte for byte as it was.

    dracut --kver KVER -k MODULES_DIR [--confdir DRACUT_CONF_DIR] --add-drivers "..." --force
    [dracut_args] TMP writes a temporary file next to the image; lsinitrd must list every module
    (built-in ones excepted); then the file is fsynced and renamed over the image. The caller keeps
    a snapshot() from before any package transaction (a package's own scriptlet may rewrite the
    image in place); this function needs none, the rename is atomic. Raises InitramfsFailed on any failure; the temporary file
    is removed, and one left by an earlier killed run is removed first.
    """
    modules = list(modules)
    for m in modules:
        if not isinstance(m, str) or not MODULE_NAME.match(m):
            raise InvalidInput(f"not a kernel module name: {m!r}")
    dracut_args = [str(a) for a in dracut_args]
    paths = paths.with_kver(kver)  # the modules directory of this kernel, unless one is given
    why_not = unsupported(paths)
    if why_not:
        raise InitramfsFailed(f"the initramfs of {kver} is not rebuilt: {why_not}")
    image = image_path(kver, paths)
    if not image.is_file():
        raise InitramfsFailed(f"there is no initramfs at {image} to rebuild",
                              hint="this system may not boot from a dracut initramfs here")
    deadline = time.monotonic() + timeout
    lock = _Lock(paths, timeout)
    tmp = image.with_name(f".{image.name}.kmodguard-new")
    try:
        _unlink(tmp)  # left by an earlier run that was killed
        builtin = _builtin(paths)
        loadable = [m for m in modules if _norm(m) not in builtin]
        cmd = dracut_command(kver, loadable, tmp, paths, dracut_args)
        log.info("rebuilding %s: %s", image, " ".join(cmd))
        try:
            proc = process.run(cmd, max(deadline - time.monotonic(), 0.1), "dracut", merge_stderr=True,
                               pass_fds=(lock.fd,), text=False)
        except process.CommandTimedOut:
            raise InitramfsFailed(f"dracut did not finish within {timeout:g} s; the previous image is unchanged") \
                from None
        except KmodguardError as exc:
            raise InitramfsFailed(exc.message) from None
        output = proc.stdout
        if proc.returncode != 0:
            raise InitramfsFailed(f"dracut failed (exit {proc.returncode}); the previous image is unchanged",
                                  hint=_tail(output))
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise InitramfsFailed("dracut wrote no image; the previous image is unchanged", hint=_tail(output))
        inside = image_modules(tmp, timeout=max(min(deadline - time.monotonic(), 300), 10))
        absent = [m for m in loadable if _norm(m) not in inside]
        if absent:
            raise InitramfsFailed(f"the new initramfs lacks {', '.join(absent)}; the previous image is unchanged",
                                  hint=_tail(output))
        try:
            mode = os.stat(image).st_mode & 0o7777
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, image)
            fsync_dir(image.parent)
        except OSError as exc:
            raise InitramfsFailed(f"cannot replace {image}: {exc.strerror or exc}; the previous image is unchanged") \
                from None
        log.info("rebuilt %s with %s", image, ", ".join(modules) or "no extra drivers")
    finally:
        try:
            _unlink(tmp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot remove %s: %s", tmp, exc)
        lock.close()
