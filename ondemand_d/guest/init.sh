#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# PID 1 of the ondemand-d test guest (booted by ondemand_d/guest/runner.py as
# `init=/bin/sh -- <this file>`). The root filesystem is the host's, read-only over 9p.
#
# Kernel command line parameters that arrive here as environment variables:
#   ODG_RESULTS  host path of the results share; mounted at the same path in the guest
#                (and at /mnt/results) so host and guest paths agree
#   ODG_CACHE    where to mount the ext4 cache disk /dev/vda (default /mnt/cache)
#   ODG_KEEP_CACHE=1  the cache disk outlives this boot: unmount it cleanly at the end
#   PATH         the command's PATH
# The command itself is $ODG_RESULTS/.guest/cmd.sh (written by the runner: cd, exports, exec).
# Its stdout/stderr go to .guest/stdout and .guest/stderr, its exit status to .guest/status.
#
# Every process started here costs ~0.3 s under TCG (dynamic loading over 9p), so this
# script uses shell builtins and mounts the rest with one `mount -a` of a generated fstab
# (X-mount.mkdir creates the mount points inside the tmpfs mounts made before them).
export PATH="${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}"
: "${ODG_RESULTS:=/mnt/results}" "${ODG_CACHE:=/mnt/cache}"
G="$ODG_RESULTS/.guest"
P9="trans=virtio,version=9p2000.L,msize=512000,cache=none"

# /proc first: `mount -a` (util-linux 2.38) ignores every fstab entry when it cannot read a
# mount table, and the 7.2 kernel's 9p root shows the host's /proc with a dangling `self`.
mount -t proc proc /proc
mount -t tmpfs -o mode=0755 tmpfs /run
# /tmp: writable, yet what the host keeps there (a CI checkout, its venv, test inputs)
# stays visible: an overlay whose lower layer is the host's /tmp, upper layer on /run.
mkdir -m 1777 /run/tmp-upper /run/tmp-work
{
    printf '%s\n' "sysfs /sys sysfs defaults 0 0"
    printf '%s\n' "devtmpfs /dev devtmpfs defaults 0 0"
    printf '%s\n' "overlay /tmp overlay lowerdir=/tmp,upperdir=/run/tmp-upper,workdir=/run/tmp-work 0 0"
    printf '%s\n' "tmpfs /mnt tmpfs mode=0755 0 0"
    printf '%s\n' "tmpfs /dev/shm tmpfs mode=1777,X-mount.mkdir 0 0"
    printf '%s\n' "devpts /dev/pts devpts X-mount.mkdir 0 0"
    printf '%s\n' "results $ODG_RESULTS 9p $P9,X-mount.mkdir 0 0"
    [ "$ODG_RESULTS" = /mnt/results ] ||
        printf '%s\n' "$ODG_RESULTS /mnt/results none bind,X-mount.mkdir 0 0"
    printf '%s\n' "/dev/vda $ODG_CACHE ext4 X-mount.mkdir 0 0"
} > /run/fstab
mount -a -T /run/fstab 2> /run/mount.err
if [ -d "$G" ]; then
    read -r up _ < /proc/uptime && echo "$up" > "$G/booted"
    [ -s /run/mount.err ] && while read -r line; do echo "$line"; done < /run/mount.err > "$G/mount.err"
    echo odg-guest > /proc/sys/kernel/hostname
    export HOME=/tmp ODG_RESULTS ODG_CACHE
    sh "$G/cmd.sh" > "$G/stdout" 2> "$G/stderr" < /dev/null
    echo $? > "$G/status"
    read -r up _ < /proc/uptime && echo "$up" > "$G/ended"
else
    echo "odg-init: results share not mounted at $ODG_RESULTS:" > /dev/console
    while read -r line; do echo "$line"; done < /run/mount.err > /dev/console
fi
[ "$ODG_KEEP_CACHE" = 1 ] && umount "$ODG_CACHE"
echo b > /proc/sysrq-trigger  # QEMU runs with -no-reboot: a reboot ends it
exit 1                        # without sysrq, PID 1 exiting panics; panic=-1 reboots
