#!/bin/sh
# PID 1 of the guest after switch_root (the overlay of the guest's layer and the host's root).
# It must never exit: whatever happens, it ends with busybox's poweroff (kept in /run by /init).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mkdir -p /run/e2e/out /run/e2e/repo /tmp /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mount -t devpts devpts /dev/pts
# the results share (read-write) and the package repository (read-only); see harness.py
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /run/e2e/out
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose repo /run/e2e/repo
hostname kmg-e2e
echo "KMG-E2E STAGE2 {}"
# the scenario (guest/agent.py next to this file) with the project venv's Python (it sees python3-rpm);
# kmg_python comes from the kernel command line (harness.py), whose KEY=VALUE words are PID 1's environment
"${kmg_python:-/work/main/.venv/bin/python}" "$(dirname "$0")/agent.py" /run/e2e/out
echo "KMG-E2E EXIT {\"code\": $?}"
sync
exec /run/busybox poweroff -f
