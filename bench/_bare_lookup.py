"""The baseline process for the lookup benchmark: bare libkmod lookups, nothing else.

    python bench/_bare_lookup.py INSTALLED_DIR MODPROBE_DIR PACKAGE_INDEX_DIR... < modaliases

Opens the installed tree and each package index with kmodguard.kmod.Context (the same cffi
binding kmodguard uses), looks every modalias up in the installed tree and, when nothing is
installed, in each package, and prints one JSON document: the module names per modalias.
It is what `kmodguard explain --json -` must do at the least, without verdicts or reasons.
"""

import json
import sys
from pathlib import Path

from kmodguard.kmod import Context


def open_contexts(installed: str, modprobe_dir: str, packages: list[str]):
    inst = Context(installed, [modprobe_dir])
    inst.load_resources()
    pkgs = []
    for p in packages:
        conf = Path(p) / "modprobe.d"
        ctx = Context(p, [str(conf)] if conf.is_dir() else [])
        ctx.load_resources()
        pkgs.append(ctx)
    return inst, pkgs


def lookups(inst, pkgs, modaliases):
    out = []
    for m in modaliases:
        found = [n for n, _ in inst.lookup_paths(m)]
        if not found:
            found = [n for ctx in pkgs for n in ctx.lookup(m)]
        out.append(found)
    return out


def main(argv):
    installed, modprobe_dir, *packages = argv
    modaliases = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
    inst, pkgs = open_contexts(installed, modprobe_dir, packages)
    results = lookups(inst, pkgs, modaliases)
    json.dump({"results": [{"modalias": m, "modules": r} for m, r in zip(modaliases, results)]}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
