#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Stage 0 of the systemd test guest (spec/systemd-guest.md), booted by
# ondemand_d/guest/runner.py as `init=/bin/sh -- <this file>` when run_in_guest(systemd=True):
# it builds a writable root (an overlay over the read-only 9p root, /etc layer prepared by the
# host in <results>/.guest/layer, see ondemand_d/guest/sysboot.py), pivots into it and execs
# systemd as PID 1. systemd's default.target then runs odg-test.service, which runs the
# command exactly as init.sh does (status, stdout, stderr in <results>/.guest/) and reboots.
#
# Every process costs ~0.3 s under TCG: builtins where possible, one `cp` for the layer.
export PATH="${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}"
: "${ODG_RESULTS:=/mnt/results}" "${ODG_CACHE:=/mnt/cache}"
P9="trans=virtio,version=9p2000.L,msize=512000,cache=none"
fail() {
    echo "odg-init-systemd: $*" > /dev/console
    echo b > /proc/sysrq-trigger
    exit 1
}
mount -t proc proc /proc
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/ovl/upper /run/ovl/work /run/ovl/root /run/results
mount -t 9p -o "$P9" results /run/results || fail "results share not mounted"
cp -a /run/results/.guest/layer/. /run/ovl/upper/ || fail "cannot copy the /etc layer"
# The host root has /.dockerenv: systemd would believe it runs in a container.
mknod /run/ovl/upper/.dockerenv c 0 0
# systemd passes PID 1's environment to no service: odg-test.service reads this file.
{
    echo "ODG_RESULTS=$ODG_RESULTS"
    echo "ODG_CACHE=$ODG_CACHE"
    echo "ODG_KEEP_CACHE=${ODG_KEEP_CACHE:-0}"
    echo "PATH=$PATH"
} > /run/ovl/upper/etc/guest.env
mount -t overlay overlay \
    -o lowerdir=/,upperdir=/run/ovl/upper,workdir=/run/ovl/work /run/ovl/root ||
    fail "overlay over / failed"
R=/run/ovl/root
mkdir -p "$R$ODG_RESULTS" "$R/oldroot"
mount --move /run/results "$R$ODG_RESULTS"
# Without these systemd prints nothing and a hang is invisible.
mount --move /dev "$R/dev"
mount --move /proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
cd "$R" || fail "no new root"
pivot_root . oldroot || fail "pivot_root failed"
umount -l /oldroot
exec /lib/systemd/systemd
