"""dnf5 cannot run here (Debian 12 has none): every command line kmodguard gives dnf5 is checked
against dnf5's own manual instead (rpm-software-management/dnf5, doc/dnf5.8.rst and
doc/commands/{install,repoquery,download,makecache}.8.rst, read 2026-12-02). The table below is
what those pages document; a command line using anything else fails here.

The dnf5 process itself is replaced by a recorder (RecordingDnf5, a stand-in) that keeps the
argument list and answers as dnf5's manual says it answers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kmodguard.backends.dnf import QUERYFORMAT, DnfBackend

REQ = "kernel-modules-uname-r = 6.12.5-200.fc41.x86_64"

# dnf5(8) "Global Options" that kmodguard uses, and each command's own (NAME=VALUE form documented)
GLOBAL = {"-y": False, "--installroot": True, "--comment": True, "--refresh": False, "-C": False}
# --setopt=KEY=VALUE (dnf5(8)) for the dnf5.conf(5) keys kmodguard sets, and no other
SETOPT = {"optional_metadata_types"}
COMMANDS = {
    "install": {},
    "repoquery": {"--whatprovides": True, "--whatsupplements": True, "--queryformat": True, "--latest-limit": True,
                  "--provides": False},
    "download": {"--destdir": True},
    "makecache": {},
}
# dnf5-repoquery(8), --queryformat: the tags it lists
QUERY_TAGS = {"name", "evr", "arch", "downloadsize", "installsize", "full_nevra", "provides", "version", "release",
              "files", "supplements"}


class RecordingDnf5(DnfBackend):
    """A stand-in for the dnf5 process: records each argument list, answers like dnf5 would."""

    def __init__(self, root: Path = Path("/")):
        super().__init__("dnf5", root)
        self.calls: list[list[str]] = []

    def _run(self, args, timeout):
        self.calls.append(args)
        out = ""
        if "repoquery" in args and "--provides" in args:
            out = "kernel-modules-uname-r = 6.12.5-200.fc41.x86_64\nkmod(e1000e.ko)\n"
        elif "repoquery" in args:
            out = "kernel-modules-6.12.5-200.fc41.x86_64\t123\t456\n"
        return subprocess.CompletedProcess(args, 0, out, "")


def check_documented(argv: list[str]) -> None:
    """Every option is documented for dnf5, global ones before the command, values as NAME=VALUE."""
    assert Path(argv[0]).name == "dnf5"
    command = next(a for a in argv[1:] if not a.startswith("-"))
    at = argv.index(command)
    for opt in argv[1:at]:
        name, eq, value = opt.partition("=")
        if name == "--setopt":
            assert value.partition("=")[0] in SETOPT, f"{opt!r} sets what kmodguard never sets"
            continue
        assert name in GLOBAL, f"{opt!r} is no dnf5 global option"
        assert bool(eq) == GLOBAL[name], f"{opt!r}: dnf5 documents {name}{'=VALUE' if GLOBAL[name] else ''}"
    for opt in argv[at + 1:]:
        if not opt.startswith("-"):
            continue
        name, eq, _ = opt.partition("=")
        allowed = {**COMMANDS[command], **GLOBAL}
        assert name in allowed, f"{opt!r} is not documented for 'dnf5 {command}'"
        assert bool(eq) == allowed[name], f"{opt!r}: dnf5 documents {name}{'=VALUE' if allowed[name] else ''}"
    assert "--" not in argv  # dnf5 before 5.4.3 refuses it (requests.py makes a leading '-' impossible)


def test_install_argv():
    argv = RecordingDnf5(Path("/sysroot")).install_argv([REQ], "kmodguard: driver packages for 0000:00:05.0")
    assert argv[1:] == ["--installroot=/sysroot", "-y", "--comment=kmodguard: driver packages for 0000:00:05.0",
                        "install", REQ]
    check_documented(argv)


def test_query_uses_the_documented_tags_and_parses_the_answer():
    dnf5 = RecordingDnf5()
    (offer,) = dnf5.query([REQ])
    (argv,) = dnf5.calls
    check_documented(argv)
    assert argv[-1] == f"--whatprovides={REQ}"
    fmt = next(a for a in argv if a.startswith("--queryformat=")).split("=", 1)[1]
    assert fmt == QUERYFORMAT["dnf5"]
    tags = {t.split("}")[0] for t in fmt.split("%{")[1:]}
    assert tags <= QUERY_TAGS, tags - QUERY_TAGS  # dnf5 has no download_size / install_size
    assert offer.available and offer.nevra == "kernel-modules-6.12.5-200.fc41.x86_64"
    assert (offer.download_size, offer.installed_size) == (123, 456)


def test_provides_download_and_refresh_argv(tmp_path):
    dnf5 = RecordingDnf5()
    assert "kmod(e1000e.ko)" in dnf5.provides(REQ)
    dnf5.download([REQ], tmp_path, 60)
    dnf5.refresh()
    provides, download, refresh = dnf5.calls
    assert provides[1:] == ["repoquery", "--latest-limit=1", "--provides", f"--whatprovides={REQ}"]
    assert download[1:] == ["download", f"--destdir={tmp_path}", REQ]
    assert refresh[1:] == ["makecache", "--refresh"]
    for argv in dnf5.calls:
        check_documented(argv)


@pytest.mark.parametrize("bad", ["--nogpgcheck", "--setopt=gpgcheck=0", "-x"])
def test_the_checker_refuses_what_dnf5_does_not_document_for_kmodguard(bad):
    with pytest.raises(AssertionError):
        check_documented(["dnf5", "-y", bad, "install", REQ])


def _tags(argv: list[str]) -> set[str]:
    fmt = next(a for a in argv if a.startswith("--queryformat=")).split("=", 1)[1]
    return {t.split("}")[0] for t in fmt.split("%{")[1:]}


def test_firmware_and_announcement_queries_use_documented_options_and_tags():
    dnf5 = RecordingDnf5()
    argv = dnf5.firmware_argv(["kmg/gpu.bin"], cache_only=True)
    check_documented(argv)
    assert argv[1:4] == ["-C", "--setopt=optional_metadata_types=filelists", "repoquery"]
    assert "--whatprovides=/usr/lib/firmware/kmg/gpu.bin.xz" in argv and _tags(argv) <= QUERY_TAGS
    for how, option in (("provides", "--whatprovides=modalias(*)"), ("supplements", "--whatsupplements=*")):
        argv = dnf5.announcements_argv(how, option, cache_only=True)
        check_documented(argv)
        assert _tags(argv) <= QUERY_TAGS and argv[-1] == option


class UncachedDnf5(RecordingDnf5):
    """dnf5 -C over a repository it never cached: exit 1 and libdnf5's RepoError, as dnf5's own
    test suite shows it (dnf5 test/behave 'repoquery -C (without any cache)')."""

    def _run(self, args, timeout):
        self.calls.append(args)
        return subprocess.CompletedProcess(args, 1, "", 'Cache-only enabled but no cache for repository "fw"\n')


def test_dnf5_without_a_cache_gives_the_makecache_note_not_an_error():
    dnf5 = UncachedDnf5()
    found = dnf5.firmware_providers(["kmg/gpu.bin"], cache_only=True)
    assert found.providers == {} and "no metadata for the repositories fw" in found.note
    assert "run 'dnf5 makecache'" in found.note
    announced = dnf5.driver_announcements(cache_only=True)
    assert announced.items == () and "run 'dnf5 makecache'" in announced.note
    assert len(dnf5.calls) == 2  # the first repoquery said it; the second is not run
