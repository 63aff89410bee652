"""Lookups: `kmodguard explain --json -` versus bare libkmod lookups, same modaliases, same run.

Input: N distinct modaliases (default 9000) made from the real tree's alias patterns
(kernel-modules-core + kernel-modules), a seeded sample; about 30 % match an installed (core)
module, the rest only an indexed package.

1. Lookup phase, in process (the fair comparison; goal ratio <= 1.1). Both sides start from
   nothing in an already warm interpreter and end with every answer:
     kmodguard: Diagnoser(paths, config, environment), then diagnoser.explain_all(modaliases)
     baseline:  kmodguard.kmod.Context on the installed tree and on each package index
                (load_resources), then the same lookups (installed; when empty, each package)
   Medians over 2R-1 repeats, the two sides alternating. STATE_DIR is as after one root run
   (a warm-up): it holds the installed modules' firmware lists, which a run then only stats.
2. Whole command: `kmodguard explain --json -` as a fresh process versus a fresh process of
   bench/_bare_lookup.py (the baseline loop, reading stdin and printing JSON); goal ratio <= 1.2.

3. Locale: the bare process in LC_ALL=C.UTF-8 versus LC_ALL=C; goal ratio <= 1.05. kmodguard's
   binding runs each libkmod lookup in the C locale (uselocale), as modprobe does: glibc's
   fnmatch would otherwise take its multibyte path, 1.75 times as slow.

Firmware: kmodguard checks the firmware a candidate names in the kernel's default firmware
directories (/lib/firmware/updates/KVER, /lib/firmware/updates, /lib/firmware/KVER,
/lib/firmware), as the command does on a real machine.
"""

from __future__ import annotations

import cProfile
import io
import json
import locale
import pstats
import random
import sys
import time
from pathlib import Path

from _common import kmodguard_command, median, progress, row, timed
from _common import bench_env as _bench_env

import realtree
from kmodguard import config as config_mod
from kmodguard.engine.diagnosis import Diagnoser
from kmodguard.engine.environment import detect
from kmodguard.paths import Paths

SEED = 20250611
HERE_BARE = str(Path(__file__).resolve().with_name("_bare_lookup.py"))


def bench_env(world) -> dict:
    env = _bench_env(world, isolated=True)
    env.pop("KMODGUARD_FIRMWARE_DIRS", None)  # the kernel's own firmware directories
    # as installed (the package ships STATE_DIR): the repositories' announcements are cached there
    Path(env["KMODGUARD_STATE_DIR"]).mkdir(parents=True, exist_ok=True)
    return env


def modaliases(world, n: int) -> list[str]:
    population, _ = realtree.modalias_population(world, (realtree.CORE, realtree.MODULES))
    pool = sorted(population)
    rng = random.Random(SEED)
    if n <= len(pool):
        return rng.sample(pool, n)
    out = []  # more than there are: repeat the population (kmodguard memoises repeats)
    while len(out) < n:
        out.extend(rng.sample(pool, min(len(pool), n - len(out))))
    return out


def _locale_exists(name: str) -> bool:
    try:
        saved = locale.setlocale(locale.LC_CTYPE)
        locale.setlocale(locale.LC_CTYPE, name)
        locale.setlocale(locale.LC_CTYPE, saved)
        return True
    except locale.Error:
        return False


def package_dirs(world) -> list[str]:
    kdir = world.index / world.kver
    return [str(p) for p in sorted(kdir.iterdir()) if not p.name.startswith(".")]


def run(world, n: int = 9000, repeats: int = 3, profile: bool = False) -> dict:
    import _bare_lookup as bare

    mods = modaliases(world, n)
    env = bench_env(world)
    paths = Paths.from_environment(env=env, kver=world.kver)
    policy = config_mod.load(paths.config_dir)
    environment = detect(paths, env)
    pkgs = package_dirs(world)

    def kmodguard_phase():
        t = time.perf_counter()
        d = Diagnoser(paths, policy, environment)
        t_setup = time.perf_counter() - t
        verdicts = d.explain_all(mods)  # what the command's engine calls
        return time.perf_counter() - t, t_setup, verdicts

    def bare_phase():
        t = time.perf_counter()
        inst, ctxs = bare.open_contexts(str(world.installed), str(world.empty), pkgs)
        t_setup = time.perf_counter() - t
        answers = bare.lookups(inst, ctxs, mods)
        return time.perf_counter() - t, t_setup, answers

    # as on an installed system after one root run: STATE_DIR holds the installed modules'
    # firmware lists (engine/remembered.py), which explain and status then only stat
    warm = Diagnoser(paths, policy, environment)
    warm.explain_all(mods)
    warm.remember()
    del warm

    in_process = max(repeats, 2 * repeats - 1)  # the in-process phases are short: more pairs, a steadier median
    progress(f"lookups: {len(mods)} modaliases, {in_process} repeats in process")
    k_times, k_setup, b_times, b_setup = [], [], [], []
    verdicts = answers = None
    for i in range(in_process):
        order = (kmodguard_phase, bare_phase) if i % 2 == 0 else (bare_phase, kmodguard_phase)
        for fn in order:
            total, setup, out = fn()
            if fn is kmodguard_phase:
                k_times.append(total)
                k_setup.append(setup)
                verdicts = out
            else:
                b_times.append(total)
                b_setup.append(setup)
                answers = out

    # the two must answer alike: installed modules, else every indexed match (usable or blacklisted)
    disagree = 0
    for v, names in zip(verdicts, answers):
        if v.installed_modules:
            same = list(v.installed_modules) == names
        else:
            same = sorted({c.module for c in v.candidates} | set(v.blacklisted)) == sorted(set(names))
        disagree += not same
    counts = {}
    for v in verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1

    top = None
    if profile:
        prof = cProfile.Profile()
        d = Diagnoser(paths, policy, environment)
        prof.enable()
        d.explain_all(mods)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(14)
        top = buf.getvalue()
        print(top, file=sys.stderr)

    progress(f"lookups: whole commands, {repeats} runs each")
    stdin = "".join(f"{m}\n" for m in mods).encode()
    cmd_k = kmodguard_command() + ["explain", "--json", "--kver", world.kver, "-"]
    cmd_b = [sys.executable, HERE_BARE, str(world.installed), str(world.empty), *pkgs]
    w_k, w_b, c_k, c_b = [], [], [], []
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            if which == 0:
                r = timed(cmd_k, env, stdin)
                assert r.returncode in (0, 3), (r.returncode, r.stderr[-1000:])
                assert len(json.loads(r.stdout)["results"]) == len(mods)
                w_k.append(r.wall)
                c_k.append(r.cpu)
            else:
                r = timed(cmd_b, env, stdin)
                assert r.returncode == 0, r.stderr[-1000:]
                w_b.append(r.wall)
                c_b.append(r.cpu)

    # libkmod matches in the C locale whatever the caller's (kmodguard.kmod, uselocale): the bare
    # process in a UTF-8 locale against the same in the C locale (fnmatch's multibyte path costs
    # 1.75 times as much without it)
    utf8 = "C.UTF-8" if _locale_exists("C.UTF-8") else None
    l_u, l_c = [], []
    if utf8:
        progress(f"lookups: the bare process in {utf8} and in C, {repeats} runs each")
        for i in range(repeats):
            for loc in ((utf8, "C") if i % 2 == 0 else ("C", utf8)):
                r = timed(cmd_b, {**env, "LC_ALL": loc}, stdin)
                assert r.returncode == 0, r.stderr[-1000:]
                (l_u if loc == utf8 else l_c).append(r.wall)

    phase_k, phase_b = median(k_times), median(b_times)
    whole_k, whole_b = median(w_k), median(w_b)
    rows = [
        row("lookups", f"lookup phase in process, {len(mods)} modaliases", phase_k, "s", "ratio <= 1.1",
            phase_k / phase_b <= 1.1, phase_b, "bare libkmod loop (kmodguard.kmod.Context)", phase_k / phase_b),
        row("lookups", "  per modalias", phase_k / len(mods) * 1e6, "us", "-", True,
            phase_b / len(mods) * 1e6, "bare libkmod loop", phase_k / phase_b),
        row("lookups", "whole command: kmodguard explain --json -", whole_k, "s", "ratio <= 1.2",
            whole_k / whole_b <= 1.2, whole_b, "python bench/_bare_lookup.py", whole_k / whole_b),
        row("lookups", "  CPU time (user + system, median)", median(c_k), "s", "ratio <= 1.2",
            median(c_k) / median(c_b) <= 1.2, median(c_b), "python bench/_bare_lookup.py", median(c_k) / median(c_b)),
    ]
    if utf8:
        rows.append(row("lookups", f"bare lookups in {utf8} vs in C (libkmod kept in the C locale)", median(l_u), "s",
                        "ratio <= 1.05", median(l_u) / median(l_c) <= 1.05, median(l_c), "the same in LC_ALL=C",
                        median(l_u) / median(l_c)))
    else:
        rows.append(row("lookups", "bare lookups in a UTF-8 locale vs in C: no C.UTF-8 locale here", 0.0, "s",
                        "(reported)", False))
    details = {
        "modaliases": len(mods), "distinct": len(set(mods)), "repeats": repeats, "verdicts": counts,
        "answers_disagreeing_with_bare_libkmod": disagree,
        "kmodguard_phase_s": k_times, "kmodguard_setup_s": k_setup,
        "bare_phase_s": b_times, "bare_setup_s": b_setup,
        "kmodguard_whole_s": w_k, "bare_whole_s": w_b, "kmodguard_whole_cpu_s": c_k, "bare_whole_cpu_s": c_b,
        "firmware_dirs": [str(d) for d in paths.kernel_firmware_dirs],
        "locale_of_the_in_process_phase": locale.setlocale(locale.LC_CTYPE),
        "bare_whole_utf8_s": l_u, "bare_whole_c_s": l_c,
        "profile_top": top,
    }
    return {"rows": rows, "details": details}
