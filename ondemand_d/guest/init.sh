#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# PID 1 of the ondemand-d test guest (booted by ondemand_d/guest/runner.py as
# `init=/bin/sh -- <this file>`). The root filesystem is the host's, read-only over 9p.
#
# Kernel command line parameters that arrive here as environment variables:
#   ODG_RESULTS  host path of the results share; mounted at the same path in the guest
#                (and linked from /mnt/results) so host and guest paths agree
#   ODG_CACHE    where to mount the ext4 cache disk /dev/vda (default /mnt/cache)
#   PATH         the command's PATH
# The command itself is $ODG_RESULTS/.guest/cmd.sh (written by the runner: cd, exports, exec).
# Its stdout/stderr go to .guest/stdout and .guest/stderr, its exit status to .guest/status.
export PATH="${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}"
say() { echo "odg-init: $*" > /dev/console 2>/dev/null || echo "odg-init: $*"; }
finish() {
    sync
    echo b > /proc/sysrq-trigger  # QEMU runs with -no-reboot: a reboot ends it
    exit 1                        # without sysrq, PID 1 exiting panics; panic=-1 reboots
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q '^[^ ]* /dev devtmpfs' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /run
# A writable /tmp, but what the host keeps under /tmp (a checkout, its venv, test
# results) must stay visible: bind each host entry back in, read-only like the root.
mkdir -p /run/host-tmp && mount --bind /tmp /run/host-tmp
mount -t tmpfs -o mode=1777 tmpfs /tmp
for e in /run/host-tmp/* /run/host-tmp/.[!.]*; do
    [ -d "$e" ] && [ ! -L "$e" ] || continue
    n="/tmp/${e#/run/host-tmp/}"
    mkdir -p "$n" && mount --bind "$e" "$n"
done
mount -t tmpfs -o mode=1777 tmpfs /mnt
mkdir -p /dev/shm /dev/pts /mnt/cache "${ODG_RESULTS:=/mnt/results}"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none results "$ODG_RESULTS" \
    || { say "cannot mount the results share at $ODG_RESULTS"; finish; }
[ "$ODG_RESULTS" = /mnt/results ] || ln -s "$ODG_RESULTS" /mnt/results
G="$ODG_RESULTS/.guest"
cut -d' ' -f1 /proc/uptime > "$G/booted"
mount -t ext4 /dev/vda "${ODG_CACHE:=/mnt/cache}" 2>"$G/cache-mount.err" \
    || say "cannot mount the cache disk: $(cat "$G/cache-mount.err")"
command -v ip >/dev/null 2>&1 && ip link set lo up 2>/dev/null
hostname odg-guest 2>/dev/null
export HOME=/tmp/home ODG_RESULTS ODG_CACHE
mkdir -p "$HOME"
unset ODG_INIT

sh "$G/cmd.sh" > "$G/stdout" 2> "$G/stderr" < /dev/null
echo $? > "$G/status.tmp"
mv "$G/status.tmp" "$G/status"
cut -d' ' -f1 /proc/uptime > "$G/ended"
umount "$ODG_CACHE" 2>/dev/null
finish
