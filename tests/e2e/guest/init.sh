#!/bin/busybox sh
# /init of the boot initramfs (busybox only; harness.py copies this file, stage2.sh and e2e.env
# into the image). It loads the 9p and overlay modules listed in /modules.list (in modprobe's
# order), mounts the host's root (read-only 9p) under the guest's own layer (read-only 9p: the
# installed kernel packages, rpm database, /boot) with a tmpfs on top, and switch_roots into it,
# running stage2.sh from /run/e2e (a tmpfs of the guest's own: no path of the host's is needed).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
echo "KMG-E2E INIT {}"
while read -r m; do
    insmod "/modules/$m" || echo "KMG-E2E INIT-FAILED {\"insmod\": \"$m\"}"
done < /modules.list
mkdir -p /lower /layer /rw /newroot
o=trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose
mount -t 9p -o "$o" hostroot /lower || echo "KMG-E2E INIT-FAILED {\"mount\": \"hostroot\"}"
mount -t 9p -o "$o" layer /layer || echo "KMG-E2E INIT-FAILED {\"mount\": \"layer\"}"
# the full kernel-modules package alone writes 240 MB into the upper layer: allow most of the RAM
mount -t tmpfs -o size=85% tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/layer:/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || echo "KMG-E2E INIT-FAILED {\"mount\": \"overlay\"}"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
cp /bin/busybox /newroot/run/busybox
mkdir -p /newroot/run/e2e
cp /stage2.sh /e2e.env /newroot/run/e2e/
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /run/e2e/stage2.sh
