#!/bin/busybox sh
# /init of the boot initramfs (busybox only; harness.py copies this file, stage2.sh, e2e.env and,
# for the systemd guest, kmg-e2e.service into the image). It loads the modules listed in
# /modules.list (9p, overlay, virtio-blk, ext4, in modprobe's order), mounts the host's root
# (read-only 9p) under the guest's own layer (read-only 9p: the installed kernel packages, rpm
# database, /boot) with a writable upper layer on top, and switch_roots into it.
#
# Two guests, chosen on the kernel command line:
#   (default)       the upper layer is a tmpfs; PID 1 is stage2.sh (from /run/e2e, a tmpfs of the
#                   guest's own), which runs guest/agent.py
#   kmg_init=systemd  PID 1 is the real systemd. With kmg_disk, the upper layer is the ext4 file
#                   system of the virtio-blk disk /dev/vda, so that a reboot keeps the root. The
#                   host's own state (dnf, kmodguard, logs, cloud-init) is hidden behind private
#                   directories of the upper file system, bind-mounted over it; the shares are
#                   mounted under /run/e2e; kmg-e2e.service (the agent) is a runtime unit.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
echo "KMG-E2E INIT {}"
while read -r m; do
    insmod "/modules/$m" || echo "KMG-E2E INIT-FAILED {\"insmod\": \"$m\"}"
done < /modules.list
INIT=script DISK=
for word in $(cat /proc/cmdline); do
    case "$word" in
        kmg_init=systemd) INIT=systemd ;;
        kmg_disk) DISK=/dev/vda ;;
    esac
done
mkdir -p /lower /layer /rw /newroot
o=trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose
mount -t 9p -o "$o" hostroot /lower || echo "KMG-E2E INIT-FAILED {\"mount\": \"hostroot\"}"
mount -t 9p -o "$o" layer /layer || echo "KMG-E2E INIT-FAILED {\"mount\": \"layer\"}"
if [ -n "$DISK" ]; then
    mount -t ext4 "$DISK" /rw || echo "KMG-E2E INIT-FAILED {\"mount\": \"disk\"}"
else
    # the full kernel-modules package alone writes 240 MB into the upper layer: allow most of the RAM
    mount -t tmpfs -o size=85% tmpfs /rw
fi
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/layer:/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || echo "KMG-E2E INIT-FAILED {\"mount\": \"overlay\"}"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
cp /bin/busybox /newroot/run/busybox
mkdir -p /newroot/run/e2e
cp /stage2.sh /e2e.env /newroot/run/e2e/
if [ "$INIT" = systemd ]; then
    # without a /tmp of its own, systemd-tmpfiles-setup would empty the host's /tmp through the overlay
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp
    # the host's state shows through the lower layer and changes under the guest: hide it
    for d in /var/lib/dnf /var/cache/dnf /var/lib/kmodguard /etc/kmodguard /var/lib/rpm-state /var/log \
             /var/lib/cloud /etc/polkit-1/rules.d; do
        mkdir -p "/rw/private$d" "/newroot$d"
        mount -o bind "/rw/private$d" "/newroot$d"
    done
    mkdir -p /newroot/var/log/journal  # a persistent journal: the scenarios read earlier boots' too
    # the host may run in a container (docker's marker): this guest is a virtual machine; and the
    # host may have turned cloud-init off, which a cloud image does not (its units are masked on
    # the command line of every boot that is not a cloud instance's)
    rm -f /newroot/.dockerenv /newroot/etc/cloud/cloud-init.disabled
    for share in out:rw repo:ro project:ro; do
        tag=${share%:*}
        mkdir -p "/newroot/run/e2e/$tag"
        if [ "${share#*:}" = ro ]; then opts=$o; else opts=trans=virtio,version=9p2000.L,msize=512000; fi
        mount -t 9p -o "$opts" "$tag" "/newroot/run/e2e/$tag" || echo "KMG-E2E INIT-FAILED {\"mount\": \"$tag\"}"
    done
    mkdir -p /newroot/run/systemd/system/multi-user.target.wants
    cp /kmg-e2e.service /newroot/run/systemd/system/
    ln -s ../kmg-e2e.service /newroot/run/systemd/system/multi-user.target.wants/kmg-e2e.service
fi
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
if [ "$INIT" = systemd ]; then
    exec switch_root /newroot /lib/systemd/systemd
fi
exec switch_root /newroot /run/e2e/stage2.sh
