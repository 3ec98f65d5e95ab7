# SPDX-License-Identifier: Apache-2.0
"""The project's real-kernel test guest: a kernel builder and a QEMU runner.

* :mod:`ondemand_d.guest.kernel` builds (once per machine) a small kernel with
  ``CACHEFILES_ONDEMAND`` and ``EROFS_FS_ONDEMAND`` from Debian's ``linux-source-6.12``.
* :mod:`ondemand_d.guest.runner` boots it under QEMU with the host root shared
  read-only and runs one command in it as root (``run_in_guest``).
"""
