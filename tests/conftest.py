"""Shared fixtures: a synthetic world of real kernel modules, and a kmodguard runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# the helpers (tests/helpers/) are imported by name from every layer's tests
sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import synthetic  # noqa: E402
from unprivileged import Unprivileged  # noqa: E402

# fixtures of the Fedora-like machine after its first fix (tests/helpers/fedora_machine.py), for every layer
pytest_plugins = ["fedora_machine"]

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(session, config, items):
    """Unit and integration tests first, the end-to-end scenarios (minutes of QEMU) last: a harness
    failure there never hides the rest, and `-x` stops at the cheapest failure."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


# --- an unprivileged user ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def unprivileged():
    top = Path(tempfile.mkdtemp(prefix="kmg-public-", dir="/tmp"))
    shutil.copytree(REPO / "kmodguard", top / "kmodguard", ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    yield Unprivileged(top)
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> synthetic.World:
    """Installed tree, package payloads, modprobe.d and firmware (built once per session; do not modify)."""
    return synthetic.make_world(tmp_path_factory.mktemp("world"))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout)


@dataclass
class Kmodguard:
    """Runs the installed `kmodguard` command as a user would, with its paths pointed at a test world."""

    env: dict
    umockdev: Path | None = None

    def __call__(self, *args: str, input: bytes | str | None = None, check_code: int | None = None,
                 timeout: float = 120) -> Result:
        cmd = [sys.executable, "-m", "kmodguard", *args]
        if self.umockdev is not None:
            cmd = ["umockdev-run", "--device", str(self.umockdev), "--", *cmd]
        if isinstance(input, str):
            input = input.encode()
        proc = subprocess.run(cmd, input=input, capture_output=True, env=self.env, timeout=timeout)
        result = Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))
        assert "Traceback" not in result.stderr, result.stderr
        if check_code is not None:
            assert result.returncode == check_code, (result.returncode, result.stdout, result.stderr)
        return result

    def with_devices(self, records: str, tmp_path: Path) -> "Kmodguard":
        path = tmp_path / f"devices-{len(list(tmp_path.glob('devices-*')))}.umockdev"
        path.write_text(records)
        return Kmodguard(self.env, path)


@pytest.fixture
def kmodguard(world, tmp_path) -> Kmodguard:
    """kmodguard on the synthetic world, with an empty index dir and no devices unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMODGUARD_")}
    env.update({
        "KMODGUARD_MODULES_DIR": str(world.installed),
        "KMODGUARD_INDEX_DIR": str(tmp_path / "index"),
        "KMODGUARD_STATE_DIR": str(tmp_path / "state"),
        "KMODGUARD_RUNTIME_DIR": str(tmp_path / "run"),
        "KMODGUARD_CONFIG_DIR": str(tmp_path / "etc"),
        "KMODGUARD_MODPROBE_DIRS": str(world.modprobe_d),
        "KMODGUARD_FIRMWARE_DIRS": str(world.firmware),
        "PYTHONPATH": str(REPO),
    })
    return Kmodguard(env)


@pytest.fixture
def indexed(kmodguard, world) -> Kmodguard:
    """kmodguard with both synthetic packages indexed for the world's kernel."""
    kver = world.kver
    for name, payload in world.packages.items():
        kmodguard("index", "build", "--kver", kver, "--package", name, "--version", "6.1.0-1.kmg",
                  "--request", f"{name}-uname-r = {kver}", "--from-dir", str(payload), check_code=0)
    return kmodguard


def have(tool: str) -> bool:
    return shutil.which(tool) is not None or os.path.exists(f"/usr/sbin/{tool}") or os.path.exists(f"/sbin/{tool}")


# --- a Fedora-like image and repository for fix tests (dnfimage.py) -------------------------

@pytest.fixture(scope="session")
def rpm_base(tmp_path_factory):
    import rpmbuild

    base = tmp_path_factory.mktemp("fix-rpms")
    yield base
    rpmbuild.cleanup()


@pytest.fixture(scope="session")
def repo(rpm_base):
    """(repo dir, {kver: KernelRpms}, TestKey): signed kernel RPMs of two kernels and what dnf needs."""
    import dnfimage

    return dnfimage.make_repo(rpm_base)


@pytest.fixture(scope="session")
def base_root(repo, tmp_path_factory) -> Path:
    """A cloud image: kernel-core and kernel-modules-core installed (and depmod'ed), nothing else.
    Do not modify: copy it (dnfimage.copy_image)."""
    import dnfimage

    return dnfimage.make_image(tmp_path_factory.mktemp("image") / "root", repo)
