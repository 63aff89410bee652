#!/bin/sh
# PID 1 of the guest after switch_root (the overlay of the guest's layer and the host's root).
# It must never exit: whatever happens, it ends with busybox's poweroff (kept in /run by /init).
# /run/e2e/e2e.env (from the boot initramfs) names the project's path on the host, KMG_PROJECT,
# and its venv's Python, KMG_PYTHON; the project's own share is mounted at that same path, so the
# venv and its editable install resolve as on the host wherever the checkout is.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
. /run/e2e/e2e.env
mkdir -p /run/e2e/out /run/e2e/repo /tmp /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
mkdir -p "$KMG_PROJECT"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose project "$KMG_PROJECT" \
    || echo "KMG-E2E STAGE2-FAILED {\"mount\": \"project\"}"
mount -t tmpfs tmpfs /dev/shm
mount -t devpts devpts /dev/pts
# the results share (read-write) and the package repository (read-only); see harness.py
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /run/e2e/out
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose repo /run/e2e/repo
hostname kmg-e2e
echo "KMG-E2E STAGE2 {}"
# the scenario with the project venv's Python (it sees python3-rpm and the distribution's packages)
"$KMG_PYTHON" "$KMG_PROJECT/tests/e2e/guest/agent.py" /run/e2e/out
echo "KMG-E2E EXIT {\"code\": $?}"
sync
exec /run/busybox poweroff -f
