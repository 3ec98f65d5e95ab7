# SPDX-License-Identifier: Apache-2.0
"""The fanotify front end: file-backed EROFS mounts filled through pre-content events.

EROFS over fscache (``/dev/cachefiles``) is gone in Linux 7.2. Its successor mounts
an EROFS image from regular files and lets a daemon fill their holes when the
kernel raises a FAN_PRE_ACCESS event for a range nobody has read yet
(Linux 6.14+). Modules:

* ``uapi``: the event and response records (no I/O);
* ``syscalls``: fanotify_init, fanotify_mark, openat2, the new mount API (nosuid,nodev
  on an O_PATH fd) and umount2 through libc;
* ``probe``: whether pre-content events work here (serve's start-up check);
* ``layout``: where the files of a mounted image live and what is mounted;
* ``blobfile``: one blob's file (fill fd, filled chunks) and the writes into it;
* ``files``: the blob files of one group: laid out, released, removed, culled, room made;
* ``fdstore``: where the group and fill fds outlive a crash (systemd), and their names;
* ``adoption``: what a successor takes over, and the mounts it denies (fail closed);
* ``mountpoint``: the directory a mount goes on: opened without symlinks, checked;
* ``frontend``: the group fd, the events and the mounts;
* ``holder``: the fd holder that keeps the group across a crash when there is no systemd;
* ``serving``: the daemon's hooks; ``demo``: `ondemand-d demo` through this front end;
* ``control``: the control socket's ``mount``/``umount`` routes and commands.
"""
