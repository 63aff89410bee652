"""`kmodguard index fetch`: an index for a kernel's modules packages without installing them.

The primary path is an image builder running `kmodguard index build` while the packages are at
hand; this is the fallback on a running machine. For each allow-listed modules package the
repositories have for the kernel:

1. without a download, when the repository metadata already says which modules the package holds
   (Fedora's kmod(NAME.ko) provides) and another kernel's index of the same package knows every one
   of them: that index is carried over, limited to those modules (aliases rarely change between
   builds of one kernel series);
2. otherwise the package is downloaded with the package manager's own download command (no
   install) into a temporary directory under the state directory, indexed, and the download removed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .. import process, requests
from ..errors import KmodguardError, PackageUnavailable
from ..fsutil import make_dir
from . import build, derive, store


def _requests(policy, backend: str, kver: str) -> dict[str, str]:
    """{package name: what to ask the package manager for} of the modules packages to index,
    built from the allow-list's names (requests.build). The -core packages come with the kernel."""
    names = [n for n in policy.packages if not n.endswith("-core")]
    if backend == "apt":
        return {f"{n}-{kver}": requests.build(requests.NAME_KVER, f"{n}-{kver}", kver)
                for n in names if n.startswith("linux-")}
    return {n: requests.build(requests.UNAME_R, n, kver) for n in names if n.startswith("kernel")}


def _version(nevra: str | None, name: str) -> str | None:
    """kernel-modules-6.1.0-57.fc42.x86_64 -> 6.1.0-57.fc42"""
    if not nevra or not nevra.startswith(name + "-"):
        return None
    return nevra[len(name) + 1:].rsplit(".", 1)[0]


def _kmod_modules(provides: list[str]) -> set[str]:
    out = set()
    for p in provides:
        if p.startswith("kmod(") and p.endswith(".ko)"):
            out.add(p[5:-4].replace("-", "_"))
    return out


def _source_index(index_root: Path, kver: str, name: str, modules: set[str]) -> store.PackageIndex | None:
    """The newest index of package `name` for another kernel that knows every one of `modules`."""
    best = None
    for other in store.kernels(index_root):
        if other == kver:
            continue
        for pkg in store.KernelIndex(index_root, other).packages:
            if pkg.name == name and pkg.derived_from is None and modules <= set(pkg.modules):
                if best is None or pkg.built > best.built:
                    best = pkg
    return best


def fetch(engine, kver: str, progress: Callable[[str], None], *, download: bool = False,
          timeout: float = 1800, backend: str | None = None) -> list[dict]:
    """Index kver's modules packages; returns what was done for each one."""
    paths = engine.paths
    backend = engine.backend(backend)
    if not callable(getattr(backend, "download", None)):
        raise KmodguardError(f"'kmodguard index fetch' cannot use {backend.name}: kmodguard downloads packages "
                             f"without installing them only with dnf, dnf5 and apt",
                             hint="use dnf, dnf5 or apt (--backend), or index the packages where they are at hand: "
                                  "'kmodguard index build --from-rpm FILE...' or '--from-dir'")
    wanted = _requests(engine.policy, backend.name, kver)
    progress(f"asking the repositories for the modules packages of kernel {kver}")
    from ..backends import query_fresh

    offers = {o.request: o for o in query_fresh(backend, list(wanted.values()), progress)}
    available = {name: req for name, req in wanted.items() if offers.get(req) and offers[req].available}
    if not available:
        raise PackageUnavailable(f"no repository has a modules package for kernel {kver} "
                                 f"(asked for: {', '.join(wanted.values())})",
                                 hint="check the repositories ('dnf repolist'); an image builder can index the "
                                      "packages with 'kmodguard index build --from-rpm' instead")
    done = []
    to_download = []
    have = {p.name: p for p in store.KernelIndex(paths.index_root, kver).packages}
    for name, request in available.items():
        if name in have and have[name].derived_from is None and not download:
            progress(f"{name}: kernel {kver} has a real index of it already")
            done.append({**have[name].summary(), "how": "already indexed"})
            continue
        version = _version(offers[request].nevra, name)
        modules = _kmod_modules(backend.provides(request)) if not download else set()
        source = _source_index(paths.index_root, kver, name, modules) if modules else None
        if source is not None:
            made = derive.derive(paths.index_root, source.kver, kver, only_modules={name: modules},
                                versions={name: version} if version else None, packages=[name], replace=True,
                                policy=engine.policy)
            if made:
                progress(f"{name}: {len(modules)} modules known from kernel {source.kver}'s index: no download")
                done.append({**made[0].summary(), "how": "repository provides", "from_kernel": source.kver})
                continue
        to_download.append((name, request))
    if to_download:
        make_dir(paths.state_dir)
        tmp = Path(tempfile.mkdtemp(prefix="fetch-", dir=paths.state_dir))
        try:
            progress(f"downloading {', '.join(r for _, r in to_download)} (nothing is installed)")
            files = backend.download([r for _, r in to_download], tmp, timeout)
            if not files:
                raise KmodguardError(f"the package manager downloaded nothing for {', '.join(r for _, r in to_download)}")
            done += [{**p, "how": "downloaded"} for p in _index_files(paths, kver, files, progress)]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the download is not kept
    return done


def _index_files(paths, kver: str, files: list[Path], progress) -> list[dict]:
    import contextlib

    out = []
    rpms = [f for f in files if f.suffix == ".rpm"]
    if rpms:
        from . import rpmfile

        with contextlib.ExitStack() as stack:
            sources = [stack.enter_context(rpmfile.extracted(f, kver)) for f in rpms]
            built = build.build_packages(paths.index_root, [(k, s) for s, k in sources], progress)  # all or nothing
            out.extend(p.summary() for p in built)
    for deb in (f for f in files if f.suffix == ".deb"):
        out.append(_index_deb(paths, kver, deb, progress).summary())
    return out


def _index_deb(paths, kver: str, deb: Path, progress):
    """A Debian/Ubuntu modules package (linux-modules-extra-KVER): its name is its request."""
    fields = process.run(["dpkg-deb", "-f", "--", str(deb), "Package", "Version"], 120)
    if fields.returncode != 0:
        raise KmodguardError(f"{deb} is not a readable Debian package: {process.last_line(fields)}")
    info = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
    if "Package" not in info or "Version" not in info:
        raise KmodguardError(f"{deb} names no Package and Version")
    with tempfile.TemporaryDirectory(dir=deb.parent) as root:
        extracted = process.run(["dpkg-deb", "-x", "--", str(deb), root], 600)
        if extracted.returncode != 0:
            raise KmodguardError(f"cannot extract {deb}: {process.last_line(extracted)}")
        source = build.PackageSource(info["Package"], info["Version"], info["Package"], Path(root),
                                     {"downloaded": deb.name})
        progress(f"indexing {source.name} {source.version}")
        return build.build_package(paths.index_root, kver, source, progress)
