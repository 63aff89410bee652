"""`check`: now (and --apply-policy), a new kernel (--kver), a removal (--removal)."""

from __future__ import annotations

import os
import shlex

from ...errors import ExitCode, InvalidInput
from ..output import emit_json, progress, safe, table
from ._common import _exit_for, make_paths


def check(args) -> int:
    from ...devices import enumerate_devices
    from ...paths import running_kernel

    paths = make_paths(args)
    if args.removal and args.kver and args.kver != running_kernel():
        raise InvalidInput("--removal judges the running kernel's devices; it does not go with --kver")
    if args.apply_policy and (args.removal or (args.kver and args.kver != running_kernel())):
        raise InvalidInput("--apply-policy acts on the machine as it is now: not with --removal or another --kver")
    if args.initramfs and not (args.kver and args.kver != running_kernel()):
        raise InvalidInput("--initramfs names a new kernel's image: it goes with --kver NEW")
    if args.removal:
        return _check_removal(args, paths, enumerate_devices())
    if args.kver and args.kver != running_kernel():
        return _check_kernel(args, paths, enumerate_devices())
    return _check_now(args, paths, enumerate_devices())


def _check_now(args, paths, devices) -> int:
    from ...engine.api import Engine, device_json

    engine = Engine(paths)
    judged = engine.judge(devices)
    plan = engine.plan(judged, boot_critical=False)
    need = [(d, v) for d, v in judged if v.verdict in ("missing", "loadable")]
    applied = _apply_policy(engine, plan, need) if args.apply_policy else None
    if args.json:
        emit_json({"kernel": paths.kver, "mode": engine.policy.mode,
                   "devices": [device_json(d, v) for d, v in need], "applied": applied})
    elif need:
        print(f"kmodguard check: {len(need)} device(s) need a driver on kernel {paths.kver}:")
        print(table([(safe(d.id, 60), v.verdict, safe(v.reason)) for d, v in need]))
        if applied:
            print(f"done: {applied['action']}: {safe(applied['detail'])}")
        else:
            print("next: 'kmodguard fix --dry-run' shows the plan; 'sudo kmodguard fix' carries it out")
    else:
        print(f"kmodguard check: every device with a modalias is served or left alone on purpose ({paths.kver})")
    if applied and applied.get("exit_code") not in (None, 0):
        return applied["exit_code"]
    return _exit_for(v for _, v in need)


def _apply_policy(engine, plan, need) -> dict:
    from ...engine.fixing import apply_mode
    from .. import client

    return apply_mode(engine, plan, need, progress, client.fix)


def _check_kernel(args, paths, devices) -> int:
    from ...engine.api import Engine
    from ...engine.lifecycle import kernel_change

    from ...paths import running_kernel

    now = Engine(paths.with_kver(running_kernel()))
    paths = paths._replace(modules_dir=None)  # KMODGUARD_MODULES_DIR is the running kernel's tree
    new = Engine(paths, now.policy, now.env._replace(
        modules_dir=paths.installed_modules,
        modules_dir_present=(paths.installed_modules / "modules.dep.bin").exists()))
    doc = kernel_change(now, new, devices, args.initramfs)
    _warn_initramfs(doc, args.notify)
    if args.notify:
        _notify_kernel_change(paths, doc)
    if args.json:
        emit_json(doc)
    else:
        _print_kernel_change(doc)
    return ExitCode.ACTION_NEEDED if doc["loses_driver"] or doc["initramfs"]["lacks_driver"] else ExitCode.OK


def _warn_initramfs(doc, notify: bool) -> None:
    """A warning in the journal for each device needed at boot whose driver the new kernel's
    initramfs lacks, naming the device, the module and the kernel (MESSAGE_ID initramfs-lacks-driver).
    Under systemd (JOURNAL_STREAM) through the log; otherwise, with --notify (the kernel-install
    plugin, whose output is the package manager's, not the journal's), sent to the journal
    directly; and always on stderr when there is no journal to take it."""
    import logging

    from ...journal import fields

    init = doc["initramfs"]
    log = logging.getLogger("kmodguard.check")
    for d in init["devices"]:
        if d["id"] not in init["lacks_driver"]:
            continue
        message = (f"the initramfs of kernel {init['kernel']} ({init['image']}) lacks {d['module']}, the driver of "
                   f"{d['id']} ({d['needed_because']}): kernel {init['kernel']} may not mount its root")
        extra = fields("initramfs-lacks-driver", device=d["syspath"], module=d["module"],
                       kmodguard_kernel=init["kernel"], kmodguard_initramfs=init["image"])
        if os.environ.get("JOURNAL_STREAM") or not notify:
            log.warning(message, extra=extra)
            continue
        try:
            from systemd import journal

            journal.send(message, PRIORITY="4", SYSLOG_IDENTIFIER="kmodguard", **extra)
        except (ImportError, OSError):
            log.warning(message, extra=extra)


def _notify_kernel_change(paths, doc) -> None:
    """The journal, and a MOTD fragment of its own (the daemon's is about the running kernel)."""
    import logging

    from ...engine.offer import write_motd

    lost = [d for d in doc["devices"] if d["loses_driver"]]
    path = paths.motd_dir / "kmodguard-kernel"
    init = doc["initramfs"]
    boot = (f"kmodguard: WARNING: the initramfs of kernel {doc['kernel']} ({init['image']}) lacks the driver of "
            f"{', '.join(init['lacks_driver'])}, needed to mount the root: rebuild it before rebooting "
            f"(dracut -f --kver {doc['kernel']}) once the driver is installed for that kernel.\n"
            if init["lacks_driver"] else "")
    if not lost:
        write_motd(path, boot or None)
        return
    log = logging.getLogger("kmodguard.check")
    for d in lost:
        log.warning("under kernel %s, %s would have no driver (%s)", doc["kernel"], d["id"], d["reason_after"],
                    extra={"DEVICE": d["syspath"], "MODALIAS": d["modalias"], "KMODGUARD_KERNEL": doc["kernel"]})
    requests = " ".join(f"'{i['request']}'" for i in doc["install"])
    text = (f"kmodguard: under kernel {doc['kernel']}, {len(lost)} device(s) would have no driver: "
            f"{', '.join(d['id'] for d in lost[:6])}{' ...' if len(lost) > 6 else ''}.\n"
            + (f"Install before rebooting into it: {requests}\n" if requests else
               f"Run 'kmodguard check --kver {doc['kernel']}' for details.\n"))
    write_motd(path, text + boot)


def _print_kernel_change(doc) -> None:
    kver, lost = doc["kernel"], [d for d in doc["devices"] if d["loses_driver"]]
    if not doc["environment"]["modules_dir_present"]:
        print(f"Note: kernel {kver} has no module tree at {doc['environment']['modules_dir']} (not installed yet?): "
              "only built-in drivers and the index can be asked.")
    init = doc["initramfs"]
    for d in init["devices"]:
        if d["id"] in init["lacks_driver"]:
            print(f"WARNING: the initramfs of kernel {kver} ({init['image']}) lacks {safe(d['module'])}, the driver "
                  f"of {safe(d['id'], 60)} ({safe(d['needed_because'])}): kernel {kver} may not mount its root. "
                  f"Install the driver for {kver}, then: dracut -f --kver {kver}")
    if not init["checked"] and init["needed_at_boot"]:
        print(f"Note: the initramfs of kernel {kver} was not checked: {safe(init['reason'])}")
    if not lost:
        print(f"kmodguard check: under kernel {kver}, every device that has a driver now keeps one "
              f"({len(doc['devices'])} checked)")
        return
    print(f"kmodguard check: under kernel {kver}, {len(lost)} device(s) would have no driver:")
    rows = []
    for d in lost:
        now = d["driver"] or (d["installed_modules"][0] if d["installed_modules"] else "-")
        after = (f"{d['candidates_after'][0]['module']} in {d['candidates_after'][0]['package']} "
                 f"{d['candidates_after'][0]['version']} (not installed for it)" if d["candidates_after"]
                 else safe(d["reason_after"]))
        rows.append((safe(d["id"], 60), f"now {safe(now)}", after))
    print(table(rows))
    if doc["install"]:
        print("next: install before rebooting into it: "
              + " ".join(shlex.quote(i["request"]) for i in doc["install"]))


def _check_removal(args, paths, devices) -> int:
    from ...engine.api import Engine
    from ...engine.lifecycle import removal

    engine = Engine(paths)
    doc = removal(engine, devices, args.removal)
    if args.json:
        emit_json(doc)
    elif not doc["loses_driver"]:
        extra = f" ({len(doc['devices'])} would keep another matching module)" if doc["devices"] else ""
        print(f"kmodguard check: removing {' '.join(args.removal)} takes no device's driver{extra}")
    else:
        print(f"kmodguard check: removing {' '.join(args.removal)} would leave {len(doc['loses_driver'])} "
              "device(s) without a driver:")
        print(table([(safe(d["id"], 60), d["verdict"], ", ".join(d["modules_lost"]))
                     for d in doc["devices"] if d["loses_driver"]]))
        print("next: keep the package, or accept that these devices stop working after a reboot or a re-probe")
    return ExitCode.ACTION_NEEDED if doc["loses_driver"] else ExitCode.OK
