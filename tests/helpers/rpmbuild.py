"""Fedora-like kernel subpackage RPMs, built with the real rpmbuild, signed with a throwaway gpg key,
served as a repository made by createrepo_c.

What Fedora's kernel.spec does and these packages copy (one spec, one package per subpackage):

  kernel                (meta, no files)  Requires kernel-core-uname-r, kernel-modules-uname-r,
                                          kernel-modules-core-uname-r = KVER
  kernel-core           vmlinuz, System.map, config, modules.builtin* (no .ko)
                        Provides kernel-core-uname-r = KVER, kernel-uname-r = KVER, installonlypkg(kernel)
                        Requires kernel-modules-core-uname-r = KVER
                        %post: touch installing_core_KVER; %posttrans: rm it, kernel-install add
  kernel-modules-core   Provides kernel-modules-core-uname-r = KVER, installonlypkg(kernel-module), kmod(X.ko)
                        Requires kernel-uname-r = KVER; %posttrans: depmod
  kernel-modules        Provides kernel-modules-uname-r = KVER, installonlypkg(kernel-module), kmod(X.ko)
                        Requires kernel-uname-r, kernel-modules-core-uname-r = KVER
                        %post: depmod; unless kernel-core is in the same transaction, touch
                        need_to_run_dracut_KVER; %posttrans: if it is there, rm it and
                        `dracut -f --kver KVER`
  kernel-modules-extra  Provides kernel-modules-extra-uname-r = KVER, installonlypkg(kernel-module), kmod(X.ko)
                        Requires kernel-uname-r, kernel-modules-uname-r, kernel-modules-core-uname-r = KVER
                        ships /etc/modprobe.d/*-blacklist.conf (%config(noreplace)); %post: depmod

KVER is Fedora's uname -r, VERSION-RELEASE.ARCH (6.1.0-56.fc42.x86_64): the RPM Version is 6.1.0 and
the Release 56.fc42 (an RPM version cannot hold '-').

Scriptlets call the commands named in a `Scripts` (default: Fedora's). Tests that install into a
--installroot point dracut / kernel-install / depmod at something harmless and read the `log`
file each scriptlet appends to, to tell whether the package itself would have rebuilt the initramfs.

Scriptlets require /bin/sh: in an empty dnf --installroot, `shell_rpm` (kmg-busybox-sh, a static
busybox as /bin/sh, in every `kernel_repo` by default) provides it and runs them.

Everything built here is cached per test session (per process) by its arguments: see `kernel_rpms`,
`kernel_repo` and `test_key`. `cleanup()` (also registered with atexit) stops the test key's gpg-agent.
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import synthetic  # noqa: E402

# Two Fedora-style kernels: the same modules built for each.
KVER = "6.1.0-56.fc42.x86_64"
KVER_NEXT = "6.1.0-57.fc42.x86_64"

SUBPACKAGES = ("kernel-core", "kernel-modules-core", "kernel-modules", "kernel-modules-extra")
META = "kernel"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
EXTRA_BLACKLIST = "kmg-extra-blacklist.conf"

# RPM payload compressors (rpm's _binary_payload): Fedora uses zstd.
ZSTD = "w19.zstdio"
XZ = "w2.xzdio"
GZIP = "w9.gzdio"

RPM_STATE = "/var/lib/rpm-state/kernel"


def split_kver(kver: str) -> tuple[str, str, str]:
    """'6.1.0-56.fc42.x86_64' -> ('6.1.0', '56.fc42', 'x86_64'): RPM Version, Release, Arch."""
    version, sep, rest = kver.partition("-")
    release, dot, arch = rest.rpartition(".")
    if not sep or not dot or not version or not release or "-" in rest:
        raise ValueError(f"{kver!r} is not a Fedora-style kernel version VERSION-RELEASE.ARCH")
    return version, release, arch


@dataclass(frozen=True)
class Scripts:
    """The commands the packages' scriptlets run (paths as seen inside the target root).

    log: a file (inside the target root) every scriptlet appends one line to, e.g.
         "kernel-modules posttrans: dracut -f --kver KVER"; None: no log.
    enabled: False builds packages with no scriptlets at all.
    """

    dracut: str = "dracut"
    kernel_install: str = "/bin/kernel-install"
    depmod: str = "/sbin/depmod"
    log: str | None = None
    enabled: bool = True


FEDORA = Scripts()
# Scriptlets that run anywhere (an installroot with only a shell): nothing is rebuilt, all is logged.
LOGGED = Scripts(dracut="true", kernel_install="true", depmod="true", log="/var/log/kmg-scriptlets.log")


@dataclass(frozen=True)
class TestKey:
    """A throwaway gpg signing key (no passphrase) in its own GNUPGHOME."""

    __test__ = False  # not a pytest class

    home: Path
    uid: str
    fingerprint: str
    public: Path  # ASCII-armoured public key: `rpmkeys --import`, dnf's gpgkey=file://

    @property
    def keyid(self) -> str:
        return self.fingerprint[-16:].lower()


@dataclass
class KernelRpms:
    """The RPMs of one kernel version: subpackage name -> file."""

    kver: str
    rpms: dict[str, Path] = field(default_factory=dict)
    signed_by: TestKey | None = None

    def __getitem__(self, name: str) -> Path:
        return self.rpms[name]


# --- payloads --------------------------------------------------------------------------------

def core_payload(root: Path, kver: str) -> Path:
    """What kernel-core ships: a fake vmlinuz and the files depmod wants next to the modules; no .ko."""
    mdir = root / "lib" / "modules" / kver
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "vmlinuz").write_bytes(b"MZ kmodguard test kernel " + kver.encode() + b"\n")
    (mdir / "System.map").write_text("ffffffff81000000 T _text\n")
    (mdir / "config").write_text("CONFIG_MODULES=y\n")
    (mdir / "modules.builtin").write_text("")
    (mdir / "modules.builtin.modinfo").write_bytes(b"")
    return root


def synthetic_payloads(root: Path, kver: str = KVER) -> dict[str, Path]:
    """Payload roots for every subpackage, built from tests/helpers/synthetic.py's modules for kver:
    kernel-core gets core_payload; kernel-modules-core synthetic.INSTALLED, modules.order and the
    dangling build/source symlinks; kernel-modules KERNEL_MODULES; kernel-modules-extra
    KERNEL_MODULES_EXTRA plus etc/modprobe.d/kmg-extra-blacklist.conf (blacklists kmg_extra)."""
    work = root / "src"
    payloads = {"kernel-core": core_payload(root / "kernel-core", kver)}
    for name, modules in (("kernel-modules-core", synthetic.INSTALLED),
                          ("kernel-modules", synthetic.KERNEL_MODULES),
                          ("kernel-modules-extra", synthetic.KERNEL_MODULES_EXTRA)):
        payload = root / name
        for m in modules:
            synthetic.build_module(m, payload / "lib" / "modules" / kver, work)
        payloads[name] = payload
    core_mdir = payloads["kernel-modules-core"] / "lib" / "modules" / kver
    (core_mdir / "modules.order").write_text("".join(f"{m.subdir}/{m.name}.ko\n" for m in synthetic.INSTALLED))
    for link in ("build", "source"):  # Fedora's dangling links to kernel-devel
        os.symlink(f"/usr/src/kernels/{kver}", core_mdir / link)
    conf = payloads["kernel-modules-extra"] / "etc" / "modprobe.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / EXTRA_BLACKLIST).write_text("# like Fedora's kernel-modules-extra\nblacklist kmg_extra\n")
    return payloads


def kmod_provides(payload: Path, kver: str) -> list[str]:
    """Fedora's kmod(NAME.ko) provides for the modules in a payload (compressed ones too)."""
    names = set()
    for sub in ("lib/modules", "usr/lib/modules"):
        mdir = payload / sub / kver
        if mdir.is_dir():
            for f in mdir.rglob("*"):
                for suffix in MODULE_SUFFIXES:
                    if f.is_file() and f.name.endswith(suffix):
                        names.add(f.name[: -len(suffix)])
    return [f"kmod({n}.ko)" for n in sorted(names)]


# --- the spec --------------------------------------------------------------------------------

def _escape(s: str) -> str:
    return s.replace("%", "%%")


def _files_section(payload: Path | None, kver: str, own_kver_dir: bool) -> list[str]:
    """%files lines for a payload: every file, the directories below lib/modules/KVER, and
    %config(noreplace) for /etc. Shared parents (/etc/modprobe.d, /lib/modules) are not owned."""
    lines = []
    if own_kver_dir:
        lines.append(f"%dir /lib/modules/{kver}")
    if payload is None:
        return lines
    for dirpath, dirnames, filenames in os.walk(payload):
        dirnames.sort()
        rel = Path(dirpath).relative_to(payload)
        parts = rel.parts
        for mods in (("lib", "modules", kver), ("usr", "lib", "modules", kver)):
            if len(parts) > len(mods) and parts[: len(mods)] == mods:
                lines.append(f'%dir "/{_escape(str(rel))}"')
        for f in sorted(filenames):
            path = "/" + _escape(str(rel / f))
            if parts and parts[0] == "etc":
                lines.append(f'%config(noreplace) "{path}"')
            else:
                lines.append(f'"{path}"')
    return lines


def _log(scripts: Scripts, line: str) -> str:
    if not scripts.log:
        return ""
    return f"mkdir -p \"$(dirname {scripts.log})\"; echo \"{line}\" >> {scripts.log}\n"


def spec_text(kver: str, payloads: dict[str, Path | None], scripts: Scripts = FEDORA,
              summary_note: str = "kmodguard test") -> str:
    """A spec for the meta package and the subpackages in payloads (kernel-core is always built).
    The payload roots are copied into the buildroot as they are."""
    version, release, arch = split_kver(kver)
    state = RPM_STATE
    core = f"{state}/installing_core_{kver}"
    need = f"{state}/need_to_run_dracut_{kver}"
    s = scripts
    out = [
        "%global debug_package %{nil}",
        "%global __os_install_post %{nil}",
        "%global __brp_strip %{nil}",
        "%global _build_id_links none",
        "%global __requires_exclude_from .*",
        "%global __provides_exclude_from .*",
        "Name: kernel",
        f"Version: {version}",
        f"Release: {release}",
        f"Summary: The Linux kernel ({summary_note})",
        "License: GPL-2.0-only",
        "AutoReqProv: no",
        f"Provides: kernel = {version}-{release}",
        f"Requires: kernel-core-uname-r = {kver}",
        f"Requires: kernel-modules-uname-r = {kver}",
        f"Requires: kernel-modules-core-uname-r = {kver}",
        "",
        "%description",
        "Meta package (test build).",
        "",
    ]
    subs = {
        "kernel-core": dict(
            provides=[f"kernel = {version}-{release}", f"kernel-{arch} = {version}-{release}",
                      f"kernel-uname-r = {kver}", f"kernel-core-uname-r = {kver}", "installonlypkg(kernel)"],
            requires=[f"kernel-modules-core-uname-r = {kver}"]),
        "kernel-modules-core": dict(
            provides=[f"kernel-modules-core-{arch} = {version}-{release}", f"kernel-modules-core = {version}-{release}",
                      "installonlypkg(kernel-module)", f"kernel-modules-core-uname-r = {kver}"],
            requires=[f"kernel-uname-r = {kver}"]),
        "kernel-modules": dict(
            provides=[f"kernel-modules-{arch} = {version}-{release}", f"kernel-modules = {version}-{release}",
                      "installonlypkg(kernel-module)", f"kernel-modules-uname-r = {kver}"],
            requires=[f"kernel-uname-r = {kver}", f"kernel-modules-core-uname-r = {kver}"]),
        "kernel-modules-extra": dict(
            provides=[f"kernel-modules-extra-{arch} = {version}-{release}",
                      f"kernel-modules-extra = {version}-{release}",
                      "installonlypkg(kernel-module)", f"kernel-modules-extra-uname-r = {kver}"],
            requires=[f"kernel-uname-r = {kver}", f"kernel-modules-uname-r = {kver}",
                      f"kernel-modules-core-uname-r = {kver}"]),
    }
    wanted = ["kernel-core", *(n for n in SUBPACKAGES[1:] if n in payloads)]
    for name in wanted:
        sub = subs[name]
        out += [f"%package -n {name}", f"Summary: {name} for kernel {kver} ({summary_note})"]
        out += [f"Provides: {p}" for p in sub["provides"] + kmod_provides(payloads.get(name) or Path("/nonexistent"), kver)]
        out += [f"Requires: {r}" for r in sub["requires"]]
        out += ["", f"%description -n {name}", f"{name} (test build).", ""]

    out += ["%prep", "%build", "%install"]
    for name in wanted:
        p = payloads.get(name)
        if p is not None:
            out.append(f"cp -a '{Path(p).resolve()}/.' %{{buildroot}}/")
    out.append(f"mkdir -p %{{buildroot}}/lib/modules/{kver}")
    out.append("")

    if s.enabled:
        depmod = f"{s.depmod} -a {kver}"
        out += [
            "%post -n kernel-core",
            _log(s, "kernel-core post") + f"mkdir -p {state}\ntouch {core}",
            "",
            "%posttrans -n kernel-core",
            _log(s, f"kernel-core posttrans: kernel-install add {kver}")
            + f"rm -f {core}\n{s.kernel_install} add {kver} /lib/modules/{kver}/vmlinuz || exit $?",
            "",
            "%preun -n kernel-core",
            f"{s.kernel_install} remove {kver} /lib/modules/{kver}/vmlinuz || exit $?",
            "",
        ]
        if "kernel-modules-core" in wanted:
            out += ["%posttrans -n kernel-modules-core", _log(s, "kernel-modules-core posttrans: depmod") + depmod, "",
                    "%postun -n kernel-modules-core", depmod, ""]
        if "kernel-modules" in wanted:
            out += [
                "%post -n kernel-modules",
                _log(s, "kernel-modules post: depmod") + f"{depmod}\n"
                f"if [ ! -f {core} ]; then\n  mkdir -p {state}\n  touch {need}\nfi",
                "",
                "%postun -n kernel-modules", depmod, "",
                "%posttrans -n kernel-modules",
                f"if [ -f {need} ]; then\n  rm -f {need}\n"
                f"  echo \"Running: dracut -f --kver {kver}\"\n"
                + "  " + _log(s, f"kernel-modules posttrans: dracut -f --kver {kver}")
                + f"  {s.dracut} -f --kver \"{kver}\" || exit $?\nfi",
                "",
            ]
        if "kernel-modules-extra" in wanted:
            out += ["%post -n kernel-modules-extra", _log(s, "kernel-modules-extra post: depmod") + depmod, "",
                    "%postun -n kernel-modules-extra", depmod, ""]

    out += ["%files", ""]
    for name in wanted:
        out.append(f"%files -n {name}")
        out += _files_section(payloads.get(name), kver, own_kver_dir=(name == "kernel-core"))
        out.append("")
    return "\n".join(out) + "\n"


# --- building --------------------------------------------------------------------------------

def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C", **kw.pop("env", {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def rpmbuild(spec: Path, outdir: Path, payload_compression: str = ZSTD, target: str | None = None) -> list[Path]:
    """rpmbuild -bb spec in a private _topdir under outdir's parent; the RPMs land in outdir."""
    outdir.mkdir(parents=True, exist_ok=True)
    top = outdir.parent / f".rpmbuild-{spec.stem}"
    shutil.rmtree(top, ignore_errors=True)
    defines = {"_topdir": str(top), "_rpmdir": str(outdir), "_build_name_fmt": "%%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
               "_binary_payload": payload_compression, "_tmppath": str(top / "tmp"), "__spec_clean_body": "%{nil}"}
    cmd = ["rpmbuild", "--quiet", "-bb", "--nodeps"]
    for k, v in defines.items():
        cmd += ["--define", f"{k} {v}"]
    if target:
        cmd += ["--target", target]
    (top / "tmp").mkdir(parents=True)
    before = set(outdir.glob("*.rpm"))
    _run([*cmd, str(spec)])
    shutil.rmtree(top, ignore_errors=True)
    return sorted(set(outdir.glob("*.rpm")) - before)


def build_kernel_rpms(outdir: Path, kver: str, payloads: dict[str, Path | None], *,
                      scripts: Scripts = FEDORA, payload_compression: str = ZSTD,
                      sign: TestKey | None = None) -> KernelRpms:
    """Build the meta package and the Fedora-like subpackages for kver into outdir (not cached).

    payloads maps a subpackage name (kernel-core, kernel-modules-core, kernel-modules,
    kernel-modules-extra) to a payload root laid out as installed (ROOT/lib/modules/KVER/...,
    ROOT/etc/modprobe.d/...). Subpackages not named are not built, except kernel-core, which is
    always built (from core_payload when not given). Returns the files by package name."""
    version, release, arch = split_kver(kver)
    payloads = dict(payloads)
    if payloads.get("kernel-core") is None:
        payloads["kernel-core"] = core_payload(outdir.parent / f".core-{kver}", kver)
    specdir = outdir.parent / ".specs"
    specdir.mkdir(parents=True, exist_ok=True)
    spec = specdir / f"kernel-{kver}.spec"
    spec.write_text(spec_text(kver, payloads, scripts))
    files = rpmbuild(spec, outdir, payload_compression, target=arch)
    result = KernelRpms(kver)
    for f in files:
        name = f.name[: -len(f"-{version}-{release}.{arch}.rpm")]
        result.rpms[name] = f
    if sign is not None:
        sign_rpms(list(result.rpms.values()), sign)
        result.signed_by = sign
    return result


def build_rpm(outdir: Path, name: str, version: str = "1.0", release: str = "1", *,
              provides: tuple[str, ...] = (), requires: tuple[str, ...] = (),
              supplements: tuple[str, ...] = (),
              conflicts: tuple[str, ...] = (), obsoletes: tuple[str, ...] = (),
              files: dict[str, bytes] | None = None, arch: str = "noarch",
              payload_compression: str = ZSTD, mode: int = 0o644, sign: TestKey | None = None) -> Path:
    """A plain package (no *-uname-r provide unless given): files maps absolute paths to contents
    (all with the given mode)."""
    files = files or {"/usr/share/doc/" + name + "/README": b"not a kernel module package\n"}
    src = outdir.parent / f".payload-{name}-{version}-{release}"
    shutil.rmtree(src, ignore_errors=True)
    for path, data in files.items():
        dest = src / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        dest.chmod(mode)
    lines = ["%global debug_package %{nil}", "%global __os_install_post %{nil}", "%global _build_id_links none",
             f"Name: {name}", f"Version: {version}", f"Release: {release}", f"Summary: {name} (kmodguard test)",
             "License: MIT", "AutoReqProv: no", f"BuildArch: {arch}"]
    lines += [f"Provides: {p}" for p in provides] + [f"Requires: {r}" for r in requires]
    lines += [f"Supplements: {x}" for x in supplements]
    lines += [f"Conflicts: {c}" for c in conflicts] + [f"Obsoletes: {o}" for o in obsoletes]
    lines += ["", "%description", "Test package.", "", "%prep", "%build", "%install",
              f"cp -a '{src.resolve()}/.' %{{buildroot}}/", "", "%files"]
    lines += [f'"{_escape(p)}"' for p in sorted(files)]
    specdir = outdir.parent / ".specs"
    specdir.mkdir(parents=True, exist_ok=True)
    spec = specdir / f"{name}-{version}-{release}.spec"
    spec.write_text("\n".join(lines) + "\n")
    (built,) = rpmbuild(spec, outdir, payload_compression, target=None if arch == "noarch" else arch)
    if sign is not None:
        sign_rpms([built], sign)
    return built


def shell_rpm(outdir: Path, busybox: str | None = None) -> Path:
    """kmg-busybox-sh: a static busybox as /bin/sh, so that the kernel packages' scriptlets (which
    require /bin/sh) resolve and run inside an otherwise empty dnf --installroot. Needs
    busybox-static on the build machine."""
    src = busybox or shutil.which("busybox") or "/bin/busybox"
    if not os.path.isfile(src):
        raise RuntimeError("shell_rpm needs a static busybox (Debian: apt-get install busybox-static)")
    return build_rpm(outdir, "kmg-busybox-sh", "1.0", "1", files={"/bin/sh": Path(src).read_bytes()},
                     arch=platform.machine(), mode=0o755)


# --- signing and repositories ----------------------------------------------------------------

def make_test_key(home: Path, uid: str = "kmodguard test key <kmodguard-test@example.invalid>") -> TestKey:
    """Generate an RSA 2048 signing key with no passphrase in a private GNUPGHOME (about 1 s)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home), "--no-tty"]
    _run([*gpg, "--passphrase", "", "--pinentry-mode", "loopback",
          "--quick-generate-key", uid, "rsa2048", "sign", "never"])
    out = _run([*gpg, "--with-colons", "--list-secret-keys", uid]).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    public = home / "RPM-GPG-KEY-kmodguard-test"
    public.write_text(_run([*gpg, "--armor", "--export", fpr]).stdout)
    return TestKey(home, uid, fpr, public)


def stop_agent(key: TestKey) -> None:
    """Stop the gpg-agent that gpg started for this key's GNUPGHOME (it outlives gpg)."""
    subprocess.run(["gpgconf", "--homedir", str(key.home), "--kill", "gpg-agent"], capture_output=True)


def sign_rpms(rpms: list[Path], key: TestKey) -> None:
    """rpmsign --addsign with the test key (rpm's signing macros pointed at it)."""
    gpg = shutil.which("gpg") or "/usr/bin/gpg"
    defines = {"_gpg_name": key.fingerprint, "_gpg_path": str(key.home), "__gpg": gpg,
               "_gpg_sign_cmd_extra_args": "--batch --pinentry-mode loopback"}
    cmd = ["rpmsign", "--addsign"]
    for k, v in defines.items():
        cmd += ["--define", f"{k} {v}"]
    _run([*cmd, *map(str, rpms)], env={"GNUPGHOME": str(key.home)}, stdin=subprocess.DEVNULL)


def createrepo(repo: Path) -> Path:
    """createrepo_c over repo (the RPMs in it and its subdirectories); returns repo."""
    _run(["createrepo_c", "--quiet", "--no-database", str(repo)])
    return repo


# --- per-session caches ----------------------------------------------------------------------

_cache: dict = {}
_keys: list[TestKey] = []


def test_key(base: Path) -> TestKey:
    """The session's test key (made once, under base/gnupg)."""
    if "key" not in _cache:
        key = make_test_key(Path(base) / "gnupg")
        if not _keys:
            atexit.register(cleanup)  # also when a run ends without fixture teardown
        _keys.append(key)
        _cache["key"] = key
    return _cache["key"]


test_key.__test__ = False  # type: ignore[attr-defined]


def kernel_rpms(base: Path, kver: str = KVER, *, scripts: Scripts = FEDORA, signed: bool = False,
                payload_compression: str = ZSTD) -> KernelRpms:
    """The synthetic kernel's RPMs for kver (all subpackages), built once per session per arguments
    under base (a session directory, e.g. tmp_path_factory.mktemp; only the first call's base is
    used, later calls with the same arguments get the cached files). Do not modify the files."""
    key = ("kernel", kver, scripts, signed, payload_compression)
    if key not in _cache:
        n = sum(1 for k in _cache if k[0] == "kernel")
        work = Path(base) / f"build-{n}"
        payloads = synthetic_payloads(work / "payload", kver)
        _cache[key] = build_kernel_rpms(work / "rpms", kver, payloads, scripts=scripts,
                                        payload_compression=payload_compression,
                                        sign=test_key(base) if signed else None)
    return _cache[key]


def kernel_repo(base: Path, kvers: tuple[str, ...] = (KVER, KVER_NEXT), *, scripts: Scripts = FEDORA,
                signed: bool = True, with_shell: bool = True, name: str = "repo"
                ) -> tuple[Path, dict[str, KernelRpms]]:
    """A createrepo_c repository holding the synthetic kernel RPMs of every kver (cached per session),
    and (with_shell) kmg-busybox-sh, which provides the /bin/sh the scriptlets require:
    returns (repo dir, {kver: KernelRpms of the files inside the repo})."""
    key = ("repo", kvers, scripts, signed, with_shell, name)
    if key not in _cache:
        repo, i = Path(base) / name, 1
        while repo.exists():  # another combination of arguments built one here already
            repo, i = Path(base) / f"{name}-{i}", i + 1
        repo.mkdir(parents=True)
        if with_shell:
            shell_rpm_cached(base, signed)
            shutil.copyfile(_cache[("shell", signed)], repo / _cache[("shell", signed)].name)
        found = {}
        for kver in kvers:
            built = kernel_rpms(base, kver, scripts=scripts, signed=signed)
            copies = KernelRpms(kver, signed_by=built.signed_by)
            for pkg, f in built.rpms.items():
                dest = repo / f.name
                shutil.copyfile(f, dest)
                copies.rpms[pkg] = dest
            found[kver] = copies
        createrepo(repo)
        _cache[key] = (repo, found)
    return _cache[key]


def shell_rpm_cached(base: Path, signed: bool = True) -> Path:
    """shell_rpm, built (and signed with the session key) once per session."""
    key = ("shell", signed)
    if key not in _cache:
        built = shell_rpm(Path(base) / f"shell-{'signed' if signed else 'unsigned'}")
        if signed:
            sign_rpms([built], test_key(base))
        _cache[key] = built
    return _cache[key]


def cleanup() -> None:
    """Stop the gpg-agents of the keys made this session."""
    for key in _keys:
        stop_agent(key)
    _keys.clear()
