"""kmodguard on Debian's real kernel tree, split the way Fedora splits it, against modprobe itself.

The world (tests/helpers/realtree.py): kernel-modules-core installed and depmod'ed, kernel-modules and
kernel-modules-extra indexed with `kmodguard index build --from-dir`. Every alias pattern of the
core and kernel-modules modules becomes one concrete modalias; a seeded sample of them goes
through ONE `kmodguard explain --json -`, and each answer is compared with
`modprobe -C EMPTY -d ROOT -S KVER -R MODALIAS` on the installed tree and, for what is not
installed, on a depmod'ed tree of kernel-modules + kernel-modules-extra.

The tree is downloaded once and cached; when it cannot be had the tests fail, they never skip.
KMODGUARD_REALTREE_SAMPLE=N (or "all") widens the sample (default 3000).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import realtree
from kmodguard.config import Ignore
from realtree import CORE, EXTRA, MODULES

pytestmark = pytest.mark.realtree

SEED = 20250611
DEFAULT_SAMPLE = 3000


@pytest.fixture(scope="session")
def real_world(tmp_path_factory) -> realtree.World:
    """The split world on the real tree, built once per session (symlinks to the cache, no copies)."""
    try:
        tree = realtree.ensure_tree()
        return realtree.build_world(tree, tmp_path_factory.mktemp("realtree"))
    except realtree.RealTreeUnavailable as exc:
        problem = str(exc)
    pytest.fail(f"the real kernel tree is needed and unavailable (a failure, never a skip):\n{problem}", pytrace=False)


def explain(world: realtree.World, modaliases: list[str]) -> tuple[int, list[dict]]:
    proc = realtree.run_kmodguard(world.env(), "explain", "--json", "--kver", world.kver, "-",
                                  input="".join(f"{m}\n" for m in modaliases).encode())
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert proc.returncode in (0, 3), (proc.returncode, proc.stdout[-2000:], stderr)
    doc = json.loads(proc.stdout)
    assert doc["kernel"] == world.kver
    results = doc["results"]
    assert [r["modalias"] for r in results] == modaliases
    return proc.returncode, results


def sample_size(population: int) -> int:
    wanted = os.environ.get("KMODGUARD_REALTREE_SAMPLE", "")
    if wanted == "all":
        return population
    return min(population, int(wanted) if wanted else DEFAULT_SAMPLE)


POLICY_IGNORED = set(Ignore().modules)  # the default policy's ignore.modules: never offered


def test_every_sampled_alias_agrees_with_modprobe(real_world, capsys):
    world = real_world
    population, counts = realtree.modalias_population(world, (CORE, MODULES))
    n = sample_size(len(population))
    assert n >= min(DEFAULT_SAMPLE, len(population)) and len(population) > 20000, counts
    sample = random.Random(SEED).sample(sorted(population), n)

    t0 = time.perf_counter()
    code, results = explain(world, sample)
    t_explain = time.perf_counter() - t0

    t0 = time.perf_counter()
    installed = realtree.oracle_pool(lambda m: world.modprobe(world.installed_root, m), sample)
    not_installed = [m for m, answer in zip(sample, installed) if not answer]
    packaged = dict(zip(not_installed, realtree.oracle_pool(lambda m: world.modprobe(world.oracle_root, m),
                                                            not_installed)))
    t_oracle = time.perf_counter() - t0

    disagreements, verdicts = [], {}
    for m, result, inst in zip(sample, results, installed):
        verdicts[result["verdict"]] = verdicts.get(result["verdict"], 0) + 1
        problems = []
        if result["installed_modules"] != inst:
            problems.append(f"installed_modules {result['installed_modules']} != modprobe {inst}")
        got = {(c["module"], c["package"]) for c in result["candidates"]}
        if inst:
            expected_verdict, want = "loadable", set()
        else:
            answer = packaged[m]
            want = {(mod, world.package_of[mod]) for mod in answer
                    if not (world.package_of[mod] == EXTRA and mod in world.extra_blacklist)
                    and mod not in POLICY_IGNORED}
            expected_verdict = "missing" if want else "ignored" if answer else "unknown"
        if result["verdict"] != expected_verdict:
            problems.append(f"verdict {result['verdict']} != {expected_verdict}")
        if got != want:
            problems.append(f"candidates {sorted(got)} != modprobe {sorted(want)}")
        if problems:
            disagreements.append(f"{m} (from {population[m]}): " + "; ".join(problems))

    with capsys.disabled():
        print(f"\nrealtree: {len(sample)} of {len(population)} modaliases (from {counts['patterns']} alias patterns "
              f"of {CORE} + {MODULES}; {counts['not_modalias']} non-modalias patterns left out) compared with "
              f"modprobe -R: {len(disagreements)} disagree; verdicts {dict(sorted(verdicts.items()))}; "
              f"explain {t_explain:.1f} s, {len(sample) + len(not_installed)} modprobe calls {t_oracle:.1f} s; "
              f"world built in {world.timings['total_s']:.1f} s")
    assert code == 3  # some answer is missing or loadable
    assert verdicts.get("loadable") and verdicts.get("missing"), verdicts
    assert not disagreements, f"{len(disagreements)} of {len(sample)} disagree with modprobe:\n" + \
        "\n".join(disagreements[:25])


def one(world, modalias: str) -> dict:
    _, results = explain(world, [modalias])
    return results[0]


def candidates(result: dict) -> list[tuple[str, str]]:
    return [(c["module"], c["package"]) for c in result["candidates"]]


def test_nvidia_gpu_is_missing_and_nouveau_in_kernel_modules(real_world):
    r = one(real_world, "pci:v000010DEd00001EB8sv000010DEsd000012A2bc03sc00i00")  # Tesla T4
    assert r["verdict"] == "missing", r
    assert r["installed_modules"] == []
    assert candidates(r) == [("nouveau", MODULES)]
    assert r["candidates"][0]["request"] == f"{MODULES}-uname-r = {real_world.kver}"


def test_mpt3sas_hba_resolves_to_mpt3sas(real_world):
    r = one(real_world, "pci:v00001000d00000097sv00001000sd00003090bc01sc07i00")  # SAS3008
    assert r["verdict"] == "missing", r
    assert candidates(r) == [("mpt3sas", MODULES)]
    assert real_world.modprobe(real_world.oracle_root, r["modalias"]) == ["mpt3sas"]


def test_virtio_net_is_in_core(real_world):
    assert real_world.package_of["virtio_net"] == CORE
    r = one(real_world, "virtio:d00000001v00001AF4")
    assert r["verdict"] in ("loadable", "bound"), r
    assert r["installed_modules"] == ["virtio_net"]
    assert r["builtin"] is False and r["candidates"] == []


def test_builtin_driver_is_loadable_builtin(real_world):
    r = one(real_world, "xen:vfb")  # xen_fbfront is built into Debian's vmlinuz
    assert r["verdict"] == "loadable" and r["builtin"] is True, r
    assert r["installed_modules"] == real_world.modprobe(real_world.installed_root, "xen:vfb") == ["xen_fbfront"]


def test_floppy_is_blacklisted_by_kernel_modules_extra(real_world):
    # Fedora's mod-blacklist.sh blacklists floppy in kernel-modules-extra's own modprobe.d
    assert real_world.package_of["floppy"] == EXTRA and "floppy" in real_world.extra_blacklist
    r = one(real_world, "pnp:dPNP0700")
    assert r["verdict"] == "ignored", r
    assert r["candidates"] == [] and r["blacklisted"] == ["floppy"]


def test_host_bridge_has_no_driver_anywhere(real_world):
    alias = "pci:v00008086d00001237sv00001AF4sd00001100bc06sc00i00"  # i440FX host bridge
    r = one(real_world, alias)
    assert r["verdict"] == "unknown", r
    assert real_world.modprobe(real_world.installed_root, alias) == []
    assert real_world.modprobe(real_world.oracle_root, alias) == []


def test_q35_chipset_helpers_are_ignored_by_default(real_world):
    """Every q35 VM has an ICH9 LPC bridge (lpc_ich, in kernel-modules) and a PC speaker (pcspkr,
    in kernel-modules-extra): the default policy leaves them alone instead of offering a package."""
    lpc = one(real_world, "pci:v00008086d00002918sv00001AF4sd00001100bc06sc01i00")  # ICH9 LPC (QEMU q35)
    assert lpc["verdict"] == "ignored" and "lpc_ich (excluded by policy (ignore.modules))" in lpc["reason"], lpc
    assert real_world.modprobe(real_world.oracle_root, "pci:v00008086d00002918sv00001AF4sd00001100bc06sc01i00") \
        == ["lpc_ich"]  # it is there to be had: the policy, not the index, decides
    spk = one(real_world, "platform:pcspkr")
    assert spk["verdict"] == "ignored", spk


# --- the kernels: chosen from what the archive serves, split by path ---------------------------

def test_the_fedora_split_applies_by_path_to_a_build_it_was_not_made_from(tmp_path):
    """tests/data/fedora-split was made from one build; the suite runs on whatever Debian serves.
    On another build every path the table names keeps its package, a path it does not name goes to
    kernel-modules, and the split keeps Fedora's shape (cloud NIC/VF and storage drivers in core,
    GPU drivers in kernel-modules)."""
    current, older = realtree.ensure_kernels()
    assert current.kver != older.kver and current.kver.endswith("-amd64") and older.kver.endswith("-amd64")
    tree = next(t for t in (current, older) if not t.is_table_build)  # the current one is never the table's
    table = realtree.split_table()
    split = realtree.assign(tree)
    assert all(pkg == table.get(realtree._as_ko(rel), MODULES) for rel, pkg in split.items())
    by_name = {realtree.module_name(rel): pkg for rel, pkg in split.items()}
    for m in ("virtio_net", "virtio_blk", "ena", "gve", "hv_netvsc", "mlx5_core", "ixgbevf", "iavf", "nvme"):
        assert by_name[m] == CORE, m
    for m in ("amdgpu", "nouveau", "i915", "ast", "snd_hda_intel", "megaraid_sas"):
        assert by_name[m] == MODULES, m
    counts = {pkg: list(split.values()).count(pkg) for pkg in (CORE, MODULES, EXTRA)}
    assert counts[CORE] > 1500 and counts[MODULES] > 1500 and counts[EXTRA] > 50, counts
    # a module at a path no row names (a driver new in this build): kernel-modules
    fake = tmp_path / "tree"
    mdir = fake / "lib" / "modules" / tree.kver
    moved = {"kernel/drivers/net/virtio_net.ko": CORE, "kernel/drivers/kmg/new_in_this_build.ko": MODULES}
    for rel in moved:
        (mdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (mdir / rel).write_bytes(b"")
    (mdir / "modules.order").write_text("")
    fake_tree = realtree.Tree(fake, tree.kver, tree.package, tree.version)
    assert realtree.assign(fake_tree) == moved
    assert realtree.unknown_paths(fake_tree) == ["kernel/drivers/kmg/new_in_this_build.ko"]


def test_an_archive_that_serves_no_kernel_is_a_clear_failure_naming_the_command(tmp_path):
    """A machine whose apt lists name no linux-image-*-amd64 (never updated, or no Debian 12 archive):
    the failure says what to run, never a skip."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "apt-cache").write_text("#!/bin/sh\nexit 0\n")  # apt with empty package lists answers nothing
    (stub / "apt-cache").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "KMODGUARD_TEST_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", "import realtree; realtree.ensure_kernels()"], env=env,
                          cwd=Path(realtree.__file__).parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "RealTreeUnavailable" in proc.stderr and "names no linux-image-*-amd64 package" in proc.stderr
    assert "run 'apt-get update'" in proc.stderr and "KMODGUARD_TEST_CACHE" in proc.stderr
