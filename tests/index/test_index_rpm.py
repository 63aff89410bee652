"""`kmodguard index build --from-rpm`: real RPMs built with rpmbuild, signed with a throwaway key,
read through the CLI as a user would.

Exit statuses: an RPM file that is not a readable kernel module package for the requested kernel
is bad input (InvalidInput, exit 2, as for any bad argument); with --json stdout holds one error
document. A machine that cannot read RPMs at all (no python3-rpm) is an error (exit 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rpmbuild
import synthetic

from rpmbuild import KVER, KVER_NEXT

GPU = synthetic.ALIAS["gpu"]
EXTRA_BLACKLISTED = synthetic.ALIAS["extra_blacklisted"]
EXTRA_XZ = synthetic.ALIAS["extra_xz"]
INVALID_INPUT = 2


@pytest.fixture(scope="session")
def rpm_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("rpms")
    yield base
    rpmbuild.cleanup()  # the test key's gpg-agent


@pytest.fixture(scope="session")
def repo(rpm_base):
    """One signed repository with the RPMs of two kernels: (dir, {kver: KernelRpms})."""
    return rpmbuild.kernel_repo(rpm_base, (KVER, KVER_NEXT), signed=True)


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> dict[str, Path]:
    """An installed module tree (kernel-modules-core's modules) for each Fedora-style kernel."""
    root = tmp_path_factory.mktemp("fedora-installed")
    trees = {}
    for kver in (KVER, KVER_NEXT):
        for m in synthetic.INSTALLED:
            synthetic.build_module(m, root / "lib" / "modules" / kver, root / "src")
        trees[kver] = synthetic.depmod(root, kver, synthetic.BUILTIN)
    return trees


@pytest.fixture
def kmg(kmodguard, tmp_path):
    """kmodguard with its own TMPDIR, to check that extracted payloads are removed."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return dataclasses.replace(kmodguard, env={**kmodguard.env, "TMPDIR": str(tmp)})


def leftovers(kmg) -> list[str]:
    return sorted(os.listdir(kmg.env["TMPDIR"]))


def explain(kmg, installed, kver, *aliases):
    return kmg("explain", "--json", "--kver", kver, "--modules-dir", str(installed[kver]), *aliases).json


# --- reading good packages -------------------------------------------------------------------

def test_modules_and_extra_of_two_kernels(kmg, repo, installed):
    repo_dir, rpms = repo
    assert (repo_dir / "repodata" / "repomd.xml").is_file()
    files = [str(rpms[k][p]) for k in (KVER, KVER_NEXT) for p in ("kernel-modules", "kernel-modules-extra")]
    built = kmg("index", "build", "--json", "--from-rpm", *files, check_code=0).json["built"]
    assert [(b["package"], b["version"], b["kernel"]) for b in built] == [
        ("kernel-modules", "6.1.0-56.fc42", KVER), ("kernel-modules-extra", "6.1.0-56.fc42", KVER),
        ("kernel-modules", "6.1.0-57.fc42", KVER_NEXT), ("kernel-modules-extra", "6.1.0-57.fc42", KVER_NEXT)]
    assert leftovers(kmg) == []

    listed = kmg("index", "list", "--json", check_code=0).json["kernels"]
    assert {d["kernel"]: sorted(p["package"] for p in d["packages"]) for d in listed} == {
        KVER: ["kernel-modules", "kernel-modules-extra"], KVER_NEXT: ["kernel-modules", "kernel-modules-extra"]}

    for kver, version in ((KVER, "6.1.0-56.fc42"), (KVER_NEXT, "6.1.0-57.fc42")):
        res = explain(kmg, installed, kver, GPU, EXTRA_XZ)["results"]
        assert res[0]["verdict"] == "missing"
        assert [(c["module"], c["package"], c["version"], c["request"]) for c in res[0]["candidates"]] == [
            ("kmg_gpu", "kernel-modules", version, f"kernel-modules-uname-r = {kver}")]
        assert [(c["module"], c["package"], c["request"]) for c in res[1]["candidates"]] == [
            ("kmg_extra_xz", "kernel-modules-extra", f"kernel-modules-extra-uname-r = {kver}")]


def test_index_show_records_the_package(kmg, repo):
    _, rpms = repo
    kmg("index", "build", "--kver", KVER, "--from-rpm", str(rpms[KVER]["kernel-modules"]),
        str(rpms[KVER]["kernel-modules-extra"]), check_code=0)
    pkgs = {p["package"]: p for p in kmg("index", "show", "--json", "--kver", KVER, check_code=0).json["packages"]}
    mods, extra = pkgs["kernel-modules"], pkgs["kernel-modules-extra"]
    assert mods["modules"] == len(synthetic.KERNEL_MODULES)
    assert extra["modules"] == len(synthetic.KERNEL_MODULES_EXTRA)  # .ko, .ko.xz and .ko.zst
    assert mods["source"] == {"from-rpm": str(rpms[KVER]["kernel-modules"].resolve()),
                              "nevra": "kernel-modules-6.1.0-56.fc42.x86_64"}
    # Fedora's kernel-modules %posttrans runs dracut when kernel-core is not in the transaction; -extra's does not
    assert mods["rebuilds_initramfs"] is True
    assert extra["rebuilds_initramfs"] is False
    # kernel-modules-extra's own /etc/modprobe.d/kmg-extra-blacklist.conf
    assert extra["blacklisted"] == ["kmg_extra"]
    assert mods["blacklisted"] == []


def test_own_blacklist_makes_its_device_ignored(kmg, repo, installed):
    _, rpms = repo
    kmg("index", "build", "--from-rpm", str(rpms[KVER]["kernel-modules-extra"]), check_code=0)
    (res,) = explain(kmg, installed, KVER, EXTRA_BLACKLISTED)["results"]
    assert res["verdict"] == "ignored"
    assert "kernel-modules-extra" in res["reason"]


def test_kernel_modules_core_with_dangling_symlinks(kmg, repo):
    """kernel-modules-core ships build/source symlinks to kernel-devel: not followed, not extracted."""
    _, rpms = repo
    out = kmg("index", "build", "--json", "--from-rpm", str(rpms[KVER]["kernel-modules-core"]), check_code=0).json
    (b,) = out["built"]
    assert (b["package"], b["request"], b["modules"]) == (
        "kernel-modules-core", f"kernel-modules-core-uname-r = {KVER}", len(synthetic.INSTALLED))
    assert leftovers(kmg) == []


def test_signed_rpm_is_read_without_its_key(kmg, repo, tmp_path):
    _, rpms = repo
    f = rpms[KVER]["kernel-modules"]
    key = rpms[KVER].signed_by
    # It is signed, by the test key, and that key is in no keyring rpm would look at ...
    sig = subprocess.run(["rpm", "-qp", "--qf", "%{RSAHEADER:pgpsig}", str(f)], capture_output=True, text=True)
    assert key.keyid in sig.stdout.lower(), sig
    check = subprocess.run(["rpmkeys", "-Kv", str(f)], capture_output=True, text=True)
    assert "NOKEY" in check.stdout + check.stderr, check
    # ... and the signature is good: with the key imported into a private database it verifies.
    db = tmp_path / "rpmdb"
    db.mkdir()
    subprocess.run(["rpmkeys", "--dbpath", str(db), "--import", str(key.public)], check=True)
    ok = subprocess.run(["rpmkeys", "--dbpath", str(db), "-K", str(f)], capture_output=True, text=True)
    assert ok.returncode == 0 and "signatures OK" in ok.stdout, ok
    # kmodguard reads it all the same, and says nothing about keys.
    res = kmg("index", "build", "--json", "--from-rpm", str(f), check_code=0)
    assert res.json["built"][0]["request"] == f"kernel-modules-uname-r = {KVER}"
    assert "key" not in res.stderr.lower()


@pytest.mark.parametrize("compression", [rpmbuild.XZ, rpmbuild.GZIP])
def test_other_payload_compressors(kmg, rpm_base, compression):
    rpms = rpmbuild.kernel_rpms(rpm_base, KVER, payload_compression=compression)
    out = kmg("index", "build", "--json", "--from-rpm", str(rpms["kernel-modules-extra"]), check_code=0).json
    assert out["built"][0]["modules"] == len(synthetic.KERNEL_MODULES_EXTRA)
    assert out["built"][0]["blacklisted"] == ["kmg_extra"]


def test_repository_answers_by_provide(repo, tmp_path):
    """The repository is what dnf tests install from: it resolves the exact-version provide."""
    repo_dir, _ = repo
    out = subprocess.run(
        ["dnf", "-q", "--installroot", str(tmp_path / "root"), "--releasever", "42",
         f"--repofrompath=kmg,file://{repo_dir}", "--repo=kmg", "--setopt=reposdir=/nonexistent",
         "repoquery", "--qf", "%{name}-%{version}-%{release}.%{arch}", "--whatprovides",
         f"kernel-modules-uname-r = {KVER_NEXT}"],
        capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, timeout=120)
    assert out.returncode == 0, out
    assert out.stdout.split() == ["kernel-modules-6.1.0-57.fc42.x86_64"]


# --- bad input -------------------------------------------------------------------------------

def test_a_suse_style_package_is_asked_for_by_its_exact_version(kmg, rpm_base, installed, tmp_path):
    """SUSE's kernel-default provides kernel-uname-r = KVER (no kernel-default-uname-r): the request is
    'kernel-default = VERSION-RELEASE', built by kmodguard, and that is what explain names."""
    extra = next(m for m in synthetic.KERNEL_MODULES_EXTRA if m.name == "kmg_extra")
    ko = synthetic.build_module(extra, tmp_path / "mods", tmp_path / "src")
    rpm = rpmbuild.build_rpm(rpm_base / "suse", "kernel-default", "6.1.0", "150600.1", arch="x86_64",
                             provides=(f"kernel-uname-r = {KVER}",),
                             files={f"/lib/modules/{KVER}/kernel/drivers/kmg/{ko.name}": ko.read_bytes()})
    res = kmg("index", "build", "--json", "--from-rpm", str(rpm), check_code=0)
    assert res.json["built"][0]["request"] == "kernel-default = 6.1.0-150600.1"
    (result,) = explain(kmg, installed, KVER, "pci:v0000CCCCd00000001sv00000000sd00000000bc00sc00i00")["results"]
    assert [(c["package"], c["request"]) for c in result["candidates"]] == \
        [("kernel-default", "kernel-default = 6.1.0-150600.1")], result


def test_wrong_kver_is_refused(kmg, repo):
    _, rpms = repo
    f = str(rpms[KVER]["kernel-modules"])
    res = kmg("index", "build", "--kver", KVER_NEXT, "--from-rpm", f, check_code=INVALID_INPUT)
    assert f"is for kernel {KVER}, not {KVER_NEXT}" in res.stderr
    assert res.stdout == ""
    doc = kmg("index", "build", "--json", "--kver", "6.1.0-99.fc42.x86_64", "--from-rpm", f,
              check_code=INVALID_INPUT).json
    assert doc["error"]["name"] == "InvalidInput"
    assert f"is for kernel {KVER}, not 6.1.0-99.fc42.x86_64" in doc["error"]["message"]
    assert kmg("index", "list", "--json", check_code=0).json["kernels"] == []
    assert leftovers(kmg) == []


def _header_end(f: Path) -> int:
    import rpm

    ts = rpm.TransactionSet()
    ts.setVSFlags(rpm._RPMVSF_NOSIGNATURES)
    ts.setKeyring(rpm.keyring())
    fd = rpm.fd.open(str(f))
    ts.hdrFromFdno(fd)
    end = fd.tell()
    fd.close()
    return end


def _bad_file(kind: str, tmp_path: Path, repo, rpm_base) -> Path:
    _, rpms = repo
    good = rpms[KVER]["kernel-modules"]
    data = good.read_bytes()
    path = tmp_path / f"{kind}.rpm"
    if kind == "garbage":
        path.write_text("this is not an RPM package\n" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "lead-only":
        path.write_bytes(data[:60])
    elif kind == "truncated-header":
        path.write_bytes(data[: _header_end(good) // 2])
    elif kind == "truncated-payload":
        end = _header_end(good)
        path.write_bytes(data[: end + (len(data) - end) // 2])
    elif kind == "damaged-payload":
        end = _header_end(good)
        i = end + (len(data) - end) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif kind == "damaged-header":
        i = data.index(b"kernel-modules for kernel")  # the Summary, inside the digested header
        path.write_bytes(data[:i] + b"K" + data[i + 1:])
    elif kind == "not-kernel":
        path = rpmbuild.build_rpm(rpm_base / "other", "kmg-hello", provides=("kmg-hello-helper = 1",))
    elif kind == "kernel-core":
        path = rpms[KVER]["kernel-core"]
    elif kind == "kernel-meta":
        path = rpms[KVER]["kernel"]
    elif kind == "directory":
        path = tmp_path / "a-directory.rpm"
        path.mkdir()
    elif kind == "missing":
        path = tmp_path / "no-such.rpm"
    return path


BAD = {
    "garbage": "is not an RPM package",
    "empty": "is empty, not an RPM package",
    "lead-only": "is truncated",
    "truncated-header": "its header is truncated or damaged",
    "truncated-payload": "the payload is truncated or damaged",
    "damaged-payload": "the payload is truncated or damaged",
    "damaged-header": "its header is truncated or damaged",
    "not-kernel": "is not a kernel module package: it has no *-uname-r provide",
    "kernel-core": f"holds no kernel modules for kernel {KVER}",
    "kernel-meta": "is not a kernel module package",
    "directory": "is a directory, not an RPM file",
    "missing": "no such file",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_give_a_clear_error(kind, kmg, repo, rpm_base, tmp_path):
    path = _bad_file(kind, tmp_path, repo, rpm_base)
    res = kmg("index", "build", "--from-rpm", str(path), check_code=INVALID_INPUT)
    assert BAD[kind] in res.stderr, res.stderr
    assert str(path) in res.stderr
    assert res.stdout == ""
    doc = kmg("index", "build", "--json", "--from-rpm", str(path), check_code=INVALID_INPUT).json
    assert doc["error"]["name"] == "InvalidInput"
    assert BAD[kind] in doc["error"]["message"]
    assert kmg("index", "list", "--json", check_code=0).json["kernels"] == []
    assert leftovers(kmg) == []


def test_unsafe_payload_names_are_refused():
    from kmodguard.errors import InvalidInput
    from kmodguard.index import rpmfile

    assert rpmfile._selected(f"/lib/modules/{KVER}/kernel/a.ko", KVER) == ("lib", "modules", KVER, "kernel", "a.ko")
    assert rpmfile._selected(f"/usr/lib/modules/{KVER}/kernel/a.ko.xz", KVER)[-1] == "a.ko.xz"
    assert rpmfile._selected("/etc/modprobe.d/x-blacklist.conf", KVER) == ("etc", "modprobe.d", "x-blacklist.conf")
    assert rpmfile._selected(f"/lib/modules/{KVER_NEXT}/kernel/a.ko", KVER) is None
    assert rpmfile._selected("/usr/share/doc/README", KVER) is None
    for name in (f"/lib/modules/{KVER}/../../../etc/passwd", f"/lib/modules/{KVER}/./a.ko", "lib/modules/x.ko",
                 f"/lib/modules/{KVER}//a.ko", "/etc/modprobe.d/../../root/x.conf", "/a\0b"):
        with pytest.raises(InvalidInput):
            rpmfile._selected(name, KVER)


# --- the rpm bindings ------------------------------------------------------------------------

def _run_cli(kmg, cwd: Path, *args: str, drop_system_site: bool = False) -> subprocess.CompletedProcess:
    """kmodguard run as `python -m kmodguard` from cwd (which then comes first on sys.path)."""
    if drop_system_site:
        # The same interpreter without Debian's dist-packages, where python3-rpm lives: a Python
        # that cannot see the rpm bindings (cffi, which the venv does not carry, is loaded first).
        code = ("import sys, runpy, cffi, _cffi_backend\n"
                "sys.path[:] = [p for p in sys.path if 'dist-packages' not in p]\n"
                f"sys.argv = ['kmodguard', *{list(args)!r}]\n"
                "runpy.run_module('kmodguard', run_name='__main__', alter_sys=True)\n")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "kmodguard", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=kmg.env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_a_directory_named_rpm_in_the_cwd_does_not_shadow_the_bindings(kmg, repo, tmp_path):
    _, rpms = repo
    (tmp_path / "cwd" / "rpm").mkdir(parents=True)
    (tmp_path / "cwd" / "rpm" / "__init__.py").write_text("# a regular package named rpm, not rpm's bindings\n")
    proc = _run_cli(kmg, tmp_path / "cwd", "index", "build", "--json", "--from-rpm", str(rpms[KVER]["kernel-modules"]))
    assert proc.returncode == 0, proc
    assert "kernel-modules" in proc.stdout


def test_without_the_bindings_the_error_says_what_to_install(kmg, repo, tmp_path):
    _, rpms = repo
    f = str(rpms[KVER]["kernel-modules"])
    for cwd in ("plain", "shadowed"):  # shadowed: `import rpm` "succeeds" as a namespace package
        (tmp_path / cwd).mkdir()
        if cwd == "shadowed":
            (tmp_path / cwd / "rpm").mkdir()
        proc = _run_cli(kmg, tmp_path / cwd, "index", "build", "--json", "--from-rpm", f, drop_system_site=True)
        assert proc.returncode == 1, proc
        err = json.loads(proc.stdout)["error"]
        assert err["name"] == "Failed"
        assert "Python rpm bindings" in err["message"]
        assert "python3-rpm" in err["hint"]


def test_one_bad_file_in_the_list_indexes_nothing(kmg, repo, tmp_path):
    _, rpms = repo
    bad = tmp_path / "bad.rpm"
    bad.write_bytes(b"\xed\xab\xee\xdb" + b"\0" * 200)
    res = kmg("index", "build", "--json", "--from-rpm", str(rpms[KVER]["kernel-modules"]), str(bad))
    assert res.returncode == 2 and "bad.rpm" in res.json["error"]["message"]
    assert kmg("index", "list", "--json", check_code=0).json["kernels"] == []
    assert leftovers(kmg) == []
