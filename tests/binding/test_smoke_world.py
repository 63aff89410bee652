"""The synthetic world itself is sound: real depmod and modprobe agree on it."""

import subprocess

from synthetic import ALIAS


def modprobe_R(tree, kver, alias, confdir):
    p = subprocess.run(["modprobe", "-C", str(confdir), "-d", str(tree), "-S", kver, "-R", alias],
                       capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else []


def test_world_installed_tree_resolves_with_modprobe(world, tmp_path):
    root = world.installed.parent.parent.parent
    assert modprobe_R(root, world.kver, ALIAS["installed"], tmp_path) == ["kmg_core_nic"]
    assert modprobe_R(root, world.kver, ALIAS["gpu"], tmp_path) == []
