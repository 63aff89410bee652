"""The journal's side of kmodguard's events: each kind's MESSAGE_ID (README.md documents them;
`journalctl MESSAGE_ID=...` finds every entry of a kind) and the fields that go with it. One
place for the daemon and the CLI (`check --apply-policy`, `check --kver --notify`) alike.
"""

from __future__ import annotations

# MESSAGE_ID= of each kind of journal event (journalctl MESSAGE_ID=... finds them all).
MESSAGE_IDS = {
    "needs-driver": "c167d616d03446fb8fe127f7a6b46fa6",  # a device needs a package or a module
    "resolved": "0d56fb3196074acfb06230fc845abecb",  # a device no longer needs one (bound, gone, ignored)
    "fix-started": "9c94234644bc400cbdf097810b10c56b",
    "fix-finished": "d122649fd7854f629fea458b7bce3c1e",
    "started": "e9a8c2903ea14b54998876412b60905f",  # the daemon judged the devices at start (coldplug)
    "unindexed": "5286700606504ef88575b02c65f313d2",  # a device kmodguard cannot judge: no index
    # a new kernel's initramfs lacks the driver of a device needed to mount the root (check --kver)
    "initramfs-lacks-driver": "1e8150f94bc64906ac691f12b369fc7f",
}


def fields(kind: str, **values) -> dict:
    """The `extra=` of a log call: MESSAGE_ID for the kind and the given fields, upper-cased
    (systemd's JournalHandler sends them as journal fields; stderr ignores them)."""
    out = {"MESSAGE_ID": MESSAGE_IDS[kind], "KMODGUARD_EVENT": kind}
    out.update({key.upper(): str(value) for key, value in values.items() if value is not None})
    return out
