# SPDX-License-Identifier: Apache-2.0
"""The /etc layer of the systemd test guest (spec/systemd-guest.md), built on the host.

``init-systemd.sh`` copies this tree over the guest's overlay root and execs systemd. The layer:

* masks every generator and the units that wait for devices udev would announce (there is
  no udev), that cost boot time, or that the host enabled for itself (database servers,
  registries, timers): the guest boots to ``multi-user.target`` in about 10 s under TCG;
* keeps ``/tmp`` as it is (Debian's ``D /tmp`` would empty the host's /tmp over 9p);
* makes ``default.target`` pull ``multi-user.target`` and ``odg-test.service``, a oneshot that
  mounts the ext4 cache disk, runs the command (``.guest/cmd.sh``), records its status and
  reboots the guest (which ends QEMU);
* installs ``/usr/bin/ondemand-d``, the console script the shipped unit's ``ExecStart=`` runs,
  as this interpreter's ``-m ondemand_d`` (so the guest runs the checkout under test). The
  unit has ``ProtectHome=yes`` and ``PrivateTmp=yes``: an interpreter under /root (pyenv) or
  a checkout in /tmp is invisible to it, so ``odg-test.service`` bind-mounts what is hidden
  under ``/opt/odg-python*`` and the script runs it from there (``_shim``).

The shipped unit and config (``systemd/``) are *not* in the layer: the tests install them as
the README says, with ``install`` and ``systemctl daemon-reload``.
"""
from __future__ import annotations

import os
import shlex
import site
import sys
from pathlib import Path

#: Units no test guest needs; each is masked (a link to /dev/null) if the host has it.
MASKED = (
    "getty.target", "getty@tty1.service", "getty-static.service", "serial-getty@ttyS0.service",
    "console-getty.service", "systemd-logind.service", "dbus.service", "dbus.socket",
    "timers.target", "systemd-journal-flush.service", "systemd-remount-fs.service",
    "systemd-random-seed.service", "systemd-machine-id-commit.service",
    "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service",
    "systemd-firstboot.service", "systemd-sysusers.service", "systemd-hwdb-update.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "systemd-user-sessions.service",
    "systemd-ask-password-wall.path", "systemd-ask-password-console.path",
    "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-udevd-control.socket", "systemd-udevd-kernel.socket", "systemd-pstore.service",
    "systemd-timesyncd.service", "systemd-repart.service", "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service", "dev-hugepages.mount", "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount", "sys-kernel-debug.mount", "systemd-modules-load.service",
    "e2scrub_reap.service", "ldconfig.service", "systemd-networkd.service",
    "systemd-resolved.service", "networking.service", "ssh.service", "cron.service",
)
GENERATORS = Path("/lib/systemd/system-generators")
HOST_UNITS = Path("/etc/systemd/system")
#: Where the interpreter's installation appears in the guest when ProtectHome= would hide it.
PYTHON_MOUNT = "/opt/odg-python"

TEST_UNIT = """\
[Unit]
Description=ondemand-d guest test command
After=multi-user.target

[Service]
Type=oneshot
EnvironmentFile=/etc/guest.env
ExecStart=/bin/sh /etc/odg/run.sh
TimeoutStartSec=infinity
StandardOutput=journal+console
"""

DEFAULT_TARGET = """\
[Unit]
Description=ondemand-d test guest
Requires=multi-user.target odg-test.service
After=multi-user.target
AllowIsolate=yes
"""

RUN_SCRIPT = """\
# odg-test.service: run the command as init.sh does, then reboot (QEMU runs -no-reboot).
G="$ODG_RESULTS/.guest"
while IFS="$(printf '\t')" read -r src dst; do
    mkdir -p "$dst" && mount --bind -o ro "$src" "$dst"
done < /etc/odg/binds
mkdir -p "$ODG_CACHE" && mount -t ext4 /dev/vda "$ODG_CACHE" 2> "$G/mount.err"
read -r up _ < /proc/uptime && echo "$up" > "$G/booted"
echo odg-guest > /proc/sys/kernel/hostname
export HOME=/tmp ODG_RESULTS ODG_CACHE
sh "$G/cmd.sh" > "$G/stdout" 2> "$G/stderr" < /dev/null
echo $? > "$G/status"
read -r up _ < /proc/uptime && echo "$up" > "$G/ended"
if [ "$ODG_KEEP_CACHE" = 1 ]; then systemctl stop ondemand-d.service; umount -R "$ODG_CACHE"; fi
echo b > /proc/sysrq-trigger
""".replace("{mount}", PYTHON_MOUNT)


def _mask(units: Path, name: str) -> None:
    link = units / name
    if not link.is_symlink() and not link.exists():
        link.symlink_to("/dev/null")


#: What the shipped unit's sandbox hides: ProtectHome=yes and PrivateTmp=yes.
HIDDEN_TOPS = ("/root", "/home", "/run/user", "/tmp", "/var/tmp")


def _hidden_from_unit(path: str) -> bool:
    return any(path == top or path.startswith(top + "/") for top in HIDDEN_TOPS)


def _shim(package_root: Path, odg: Path) -> str:
    """/usr/bin/ondemand-d: run ``python -m ondemand_d`` where the unit's sandbox can see it.

    A checkout, virtualenv or interpreter under a hidden path (a clone in /tmp, pyenv under
    /root) is bind-mounted read-only under /opt by ``odg-test.service`` (``/etc/odg/binds``),
    and the script runs the base interpreter with the checkout and the virtualenv's
    site-packages on ``PYTHONPATH``.
    """
    binds: list[tuple[str, str]] = []

    def visible(path: str, name: str) -> str:
        real = os.path.realpath(path)
        if not _hidden_from_unit(real):
            return real
        binds.append((real, f"{PYTHON_MOUNT}-{name}" if name else PYTHON_MOUNT))
        return binds[-1][1]

    lines = ["#!/bin/sh", "# the checkout under test, as the installed console script"]
    path = [visible(str(package_root), "project")]
    if sys.prefix != sys.base_prefix:
        path += [visible(p, f"site{i}") for i, p in enumerate(site.getsitepackages())]
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.basename(os.path.realpath(sys.executable))
    seen_prefix = visible(prefix, "")
    if seen_prefix != prefix:
        lines.append(f"export LD_LIBRARY_PATH={seen_prefix}/lib")
    python = f"{seen_prefix}/bin/{exe}"
    (odg / "binds").write_text("".join(f"{src}\t{dst}\n" for src, dst in binds))
    lines.append("export PYTHONPATH=" + shlex.quote(":".join(path)))
    lines.append(f'exec {shlex.quote(python)} -m ondemand_d "$@"')
    return "\n".join(lines) + "\n"


def build_layer(layer: Path, *, package_root: Path) -> Path:
    """Write the /etc layer (and /usr/bin/ondemand-d) under ``layer``; return it."""
    units = layer / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    (layer / "etc" / "fstab").write_text("")
    generators = layer / "etc" / "systemd" / "system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    for gen in sorted(GENERATORS.iterdir()) if GENERATORS.is_dir() else []:
        _mask(generators, gen.name)
    for name in MASKED:
        _mask(units, name)
    # Whatever the host enabled for itself (registries, databases, timers) stays off.
    for wants in sorted(HOST_UNITS.glob("*.wants")) if HOST_UNITS.is_dir() else []:
        for unit in sorted(wants.iterdir()):
            _mask(units, unit.name)
    tmpfiles = layer / "etc" / "tmpfiles.d"
    tmpfiles.mkdir(parents=True, exist_ok=True)
    (tmpfiles / "tmp.conf").write_text("d /tmp 1777 root root -\n")
    (units / "odg-test.service").write_text(TEST_UNIT)
    (units / "default.target").write_text(DEFAULT_TARGET)
    odg = layer / "etc" / "odg"
    odg.mkdir(parents=True, exist_ok=True)
    (odg / "run.sh").write_text(RUN_SCRIPT)
    usr_bin = layer / "usr" / "bin"
    usr_bin.mkdir(parents=True, exist_ok=True)
    shim = usr_bin / "ondemand-d"
    shim.write_text(_shim(package_root, odg))
    os.chmod(shim, 0o755)
    return layer
