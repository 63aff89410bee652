"""An index for a new kernel derived from an old kernel's, without the new kernel's files.

Until a package of the new kernel is indexed for real (`index build`, `index fetch --download`),
the same modules are assumed to come with the same package, and the request is respelled for the
new kernel the way the package manager spells the old one (`index derive`, the kernel-install
plugin, `index fetch` when the repository names the modules).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

from . import store

def derive(index_root: Path, old: str, new: str, *, only_modules: dict[str, set[str]] | None = None,
           versions: dict[str, str] | None = None, packages: list[str] | None = None,
           replace: bool = False, policy=None) -> list[store.PackageIndex]:
    """Index kernel NEW's packages from kernel OLD's index, without NEW's files: the same modules
    and aliases are assumed until a real index replaces it (kernel-install runs this inside the
    kernel's own transaction, where nothing can be downloaded).

    Each allow-listed (`policy`, else the default policy) OLD package whose request names OLD gets
    one for NEW, made from the package name and NEW spelled the way OLD's request spells OLD
    (derived_request). With `only_modules` ({package: module names}, from the repository's
    kmod(NAME.ko) provides) a package's lookups are limited to the modules NEW's package really
    holds; `versions` gives NEW's package versions when the repository told them. Packages NEW
    already has an index of are kept, unless `replace`.
    """
    from ..config import Config

    policy = policy if policy is not None else Config()
    store.valid_name("kernel version", new)
    old_index = store.KernelIndex(index_root, old)
    have = {p.name for p in store.KernelIndex(index_root, new).packages}
    made = []
    for pkg in old_index.packages:
        if packages is not None and pkg.name not in packages:
            continue
        derived = derived_request(pkg.name, pkg.request, old, new, policy)
        if derived is None:
            continue  # not allow-listed, or the request does not name the kernel: nothing to carry over safely
        name, request, spelled_old, spelled_new = derived
        if name in have and not replace:
            continue
        meta = dict(pkg.meta)
        meta["kernel"] = new
        meta["package"] = {**meta["package"], "name": name, "request": request,
                           "version": (versions or {}).get(pkg.name)
                           or _assumed_version(pkg.version, spelled_old, spelled_new)}
        meta["derived_from"] = old
        meta["built"] = time.time()
        if only_modules is not None and pkg.name in only_modules:
            meta["only_modules"] = sorted(only_modules[pkg.name])
            meta["modules"] = len(meta["only_modules"])
        stage = Path(tempfile.mkdtemp(prefix=f".derive-{name}.", dir=index_root))  # same file system
        try:
            shutil.copytree(pkg.path, stage / "index", symlinks=True)  # a verified index holds no links
            store.write_meta(stage / "index", meta)
            made.append(store.PackageIndex(store.publish(index_root, new, name, stage / "index"), new))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return made


def derived_request(package: str, request: str, old: str, new: str, policy) -> tuple[str, str, str, str] | None:
    """(NEW's package name, NEW's request, OLD as the request spells it, NEW spelled alike) for an
    allow-listed package whose request for kernel OLD names OLD; None otherwise.

    The request is built from the allow-listed name, never copied: NAME-uname-r = NEW for RPM
    kernels; for Debian and Ubuntu the package name carries the kernel (linux-modules-extra-NEW).
    A package manager may spell a kernel otherwise than uname does: an RPM version cannot hold
    Debian's 6.1.0-56-amd64, so such a kernel's packages provide kernel-modules-uname-r =
    6.1.0-56.amd64; NEW is spelled the same way (respell)."""
    base = policy.allowed_name(package)
    if base is None:
        return None
    name, sep, spelled_old = request.partition(" = ")
    if sep:
        spelled_new = respell(old, spelled_old, new)
        if spelled_new is None:
            return None
        return package, f"{package}-uname-r = {spelled_new}", spelled_old, spelled_new
    if request != package or package == base:  # a bare name that names no kernel
        return None
    spelled_old = package[len(base) + 1:]
    spelled_new = respell(old, spelled_old, new)
    if spelled_new is None:
        return None
    return f"{base}-{spelled_new}", f"{base}-{spelled_new}", spelled_old, spelled_new


_SEPARATORS = re.compile(r"([-.+_~^])")


def respell(old: str, spelled: str, new: str) -> str | None:
    """NEW spelled the way `spelled` spells kernel release OLD; None when no rule ties them.

    Rules: the same string; the same words with some separators changed, at the same places
    counted from the end (6.1.0-56-amd64 as 6.1.0-56.amd64 makes 6.1.0-57-amd64 6.1.0-57.amd64);
    OLD inside a longer spelling (what surrounds it surrounds NEW)."""
    if spelled == old:
        return new
    a, b, n = _SEPARATORS.split(old), _SEPARATORS.split(spelled), _SEPARATORS.split(new)
    if len(a) == len(b) and a[0::2] == b[0::2]:
        for i in range(1, len(a), 2):  # the separators (odd places)
            if a[i] == b[i]:
                continue
            j = len(n) - (len(a) - i)
            if j < 1 or n[j] != a[i]:
                return None  # NEW has no separator there to change alike
            n[j] = b[i]
        return "".join(n)
    at = spelled.find(old)
    if at >= 0:
        return spelled[:at] + new + spelled[at + len(old):]
    return None


def _assumed_version(version: str, old: str, new: str) -> str:
    """6.11.4-301.fc41 for kernel 6.11.4-301.fc41.x86_64 becomes NEW's VERSION-RELEASE the same way."""
    if old.startswith(version):
        return new[: len(new) - (len(old) - len(version))] if len(new) > len(old) - len(version) else new
    return "unknown"
