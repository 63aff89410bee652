"""The initramfs: is a device needed before the real root is mounted, and regenerate it safely.

A driver belongs in the initramfs only when its device backs /, /usr or the resume device
(directly or through md / LVM / dm / multipath / NVMe-multipath stacks), or carries a network
root. Then the driver is persisted in a dracut.conf.d drop-in (so future kernels keep it) and the
image is rebuilt: dracut writes a temporary file next to the image, lsinitrd proves every required
module is inside, and only then is the temporary file renamed over the image. On any failure
(dracut exit status, timeout, a module missing from the result, a kill) the previous image is left
byte for byte as it was.

Unified kernel images and ostree/bootc deployments carry an initramfs kmodguard cannot regenerate:
they are reported (unsupported) and never touched.

Everything is read through Paths (sysfs, proc, boot_dir, dracut_conf_dir, root) so that a fake
system tree can stand in for the real one. dracut and lsinitrd get argument lists, never a shell.

Three modules: topology (which devices matter at boot), decision (whether a fix rebuilds, and
who), image (the dracut image and its drop-in). This package re-exports their public names.
"""

from __future__ import annotations

from .topology import (
    NETWORK_FS, NETWORK_ROOT_PREFIXES, HV_NETVSC_CLASS, VIRTIO_ID_NET, boot_critical,
)
from .decision import (
    MODULE_NAME, InitramfsDecision, decide, _norm,
)
from .image import (
    DROP_IN, DEFAULT_DRACUT_CONF_DIR, MODULE_FILE, InitramfsFailed, image_path, unsupported,
    persisted_drivers, persist_drivers, snapshot_path, snapshot, restore, image_modules,
    missing_from_image, dracut_command, rebuild, _builtin,
)

__all__ = [
    "NETWORK_FS",
    "NETWORK_ROOT_PREFIXES",
    "HV_NETVSC_CLASS",
    "VIRTIO_ID_NET",
    "boot_critical",
    "MODULE_NAME",
    "InitramfsDecision",
    "decide",
    "_norm",
    "DROP_IN",
    "DEFAULT_DRACUT_CONF_DIR",
    "MODULE_FILE",
    "InitramfsFailed",
    "image_path",
    "unsupported",
    "persisted_drivers",
    "persist_drivers",
    "snapshot_path",
    "snapshot",
    "restore",
    "image_modules",
    "missing_from_image",
    "dracut_command",
    "rebuild",
    "_builtin",
]
