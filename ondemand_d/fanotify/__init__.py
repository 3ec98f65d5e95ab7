# SPDX-License-Identifier: Apache-2.0
"""The fanotify front end: file-backed EROFS mounts filled through pre-content events.

EROFS over fscache (``/dev/cachefiles``) is gone in Linux 7.2. Its successor mounts
an EROFS image from regular files and lets a daemon fill their holes when the
kernel raises a FAN_PRE_ACCESS event for a range nobody has read yet
(Linux 6.14+). Modules:

* ``uapi``: the event and response records (no I/O);
* ``syscalls``: fanotify_init, fanotify_mark, mount and umount2 through libc;
* ``layout``: where the files of a mounted image live and what is mounted;
* ``frontend``: the group fd, the blob files, the events and the mounts;
* ``control``: the control socket's ``mount``/``umount`` routes and commands.
"""
