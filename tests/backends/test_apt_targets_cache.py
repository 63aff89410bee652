"""apt's index targets kept in STATE_DIR: `apt-get indextargets` rebuilds apt's whole cache (most
of a second where an image disables pkgcache.bin), so status and explain ask it again only when
apt's sources, configuration or lists change. Real apt-get on a real minimal Debian root."""

from __future__ import annotations

import json
import os

import pytest

import aptroot
from kmodguard.backends.apt import TARGETS_CACHE, AptBackend


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    world = aptroot.make_world(tmp_path_factory.mktemp("apt-targets"))
    aptroot.write_sources(world.root, world.repo)
    aptroot.apt_get(world.root, "-q", "update")
    yield world.root
    world.close()


def counted(backend: AptBackend) -> list:
    """The real apt calls, each argument list recorded."""
    calls, real = [], backend._apt

    def spy(args, *rest, **kw):
        calls.append(args)
        return real(args, *rest, **kw)

    backend._apt = spy
    return calls


def indextargets(calls) -> int:
    return sum(1 for args in calls if args[:2] == ["apt-get", "indextargets"])


def test_indextargets_is_asked_once_until_apts_configuration_changes(root, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    first = AptBackend(root, cache_dir=state)
    calls = counted(first)
    lists = first._package_lists(60)
    assert lists and all(f.startswith(f"{root}/var/lib/apt/lists/") for f in lists)
    assert indextargets(calls) == 1 and (state / TARGETS_CACHE).is_file()

    again = AptBackend(root, cache_dir=state)  # the next status: a new process, the same answer
    calls = counted(again)
    assert again._package_lists(60) == lists and indextargets(calls) == 0

    sources = root / "etc/apt/sources.list"
    sources.write_text(sources.read_text() + "# changed\n")
    os.utime(sources, ns=(1, 1))  # another mtime whatever the clock's resolution
    changed = AptBackend(root, cache_dir=state)
    calls = counted(changed)
    assert changed._package_lists(60) == lists and indextargets(calls) == 1


def test_a_cache_naming_files_outside_apts_lists_is_a_miss(root, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    AptBackend(root, cache_dir=state)._package_lists(60)
    doc = json.loads((state / TARGETS_CACHE).read_text())
    doc["targets"] = [["Packages", "main", "/etc/shadow"]]
    (state / TARGETS_CACHE).write_text(json.dumps(doc))
    backend = AptBackend(root, cache_dir=state)
    calls = counted(backend)
    assert "/etc/shadow" not in backend._package_lists(60) and indextargets(calls) == 1


def test_without_a_writable_state_dir_nothing_is_kept(root, tmp_path):
    backend = AptBackend(root, cache_dir=tmp_path / "absent")
    assert backend._package_lists(60)
    assert not (tmp_path / "absent").exists()
