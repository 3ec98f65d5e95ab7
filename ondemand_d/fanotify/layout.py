# SPDX-License-Identifier: Apache-2.0
"""Where a mounted image's files live, and the table of what is mounted.

Layout under the cache directory::

    fanotify/<domain>/<blob id>   one file per blob: the bootstrap (filled whole before
                                  mount) and each data blob (sparse, filled on demand)
    fanotify/mounts.json          mountpoint -> image, domain, blob ids (re-adopted at start)

A domain is the share domain: images mounted in one domain use one file per blob,
filled once. Without --domain an image is its own domain. The files must be on a
filesystem that takes pre-content marks (ext4, xfs, btrfs; not tmpfs).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DOMAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=-]{0,127}")
MOUNTS = "mounts.json"


def check_domain(domain: str) -> str:
    """Return `domain` if it can name a directory here, else raise ValueError."""
    if not _DOMAIN.fullmatch(domain):
        msg = (f"bad domain {domain!r}: use 1-128 of A-Z a-z 0-9 _ . : @ + = -, not starting "
               "with '.' or '-'")
        raise ValueError(msg)
    return domain


def root(cache_dir: Path) -> Path:
    return cache_dir / "fanotify"


def blob_path(cache_dir: Path, domain: str, blob_id: str) -> Path:
    return root(cache_dir) / check_domain(domain) / blob_id


def mount_options(devices: list[Path]) -> str:
    """The options of a file-backed EROFS mount: one device= per data blob, in slot order."""
    for path in devices:
        if "," in str(path):
            msg = f"{path}: a device path cannot contain a comma"
            raise ValueError(msg)
    return ",".join(f"device={p}" for p in devices)


#: Mounting on these, or anywhere under them, would shadow the system (or the kernel's
#: own views of it: /proc/PID, /dev, /sys).
SYSTEM_TREES = ("/proc", "/sys", "/dev", "/etc", "/usr", "/boot", "/bin", "/sbin", "/lib",
                "/lib32", "/lib64", "/libx32", "/efi")
#: These themselves are refused; a directory made under them (/run/images/app,
#: /var/lib/app) is a mountpoint like any other. /mnt and /media exist to be mounted on.
SYSTEM_DIRS = ("/", "/run", "/var", "/tmp", "/home", "/root", "/srv", "/opt", "/var/lib",
               "/var/cache", "/var/tmp", "/var/log", "/var/run")


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def refuse_mountpoint(path: str, keep: tuple[Path, ...] = ()) -> str | None:
    """Why the canonical directory `path` must not be mounted on, or None if it may.

    `keep` are the daemon's own directories (cache, store): a mount on them, under them
    or on one of their parents would hide them. Pure: `path` is what the kernel
    resolved once (the O_PATH fd's path), never a path to resolve again.
    """
    for top in SYSTEM_TREES:
        if _within(path, top):
            return f"{path} is a system directory ({top}): mount on a directory you made"
    if path in SYSTEM_DIRS:
        return f"{path} is a system directory: mount on a directory you made under it"
    for own in keep:
        mine = str(own)
        if _within(path, mine) or _within(mine, path):
            return (f"{path} would hide the daemon's own directory {mine}: mount elsewhere")
    return None


@dataclass(frozen=True, slots=True)
class MountRecord:
    """One mount this front end made: `blobs` is the bootstrap first, then the data blobs."""

    mountpoint: str
    image: str
    domain: str
    blobs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"mountpoint": self.mountpoint, "image": self.image, "domain": self.domain,
                "blobs": list(self.blobs)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> MountRecord:
        return cls(str(raw["mountpoint"]), str(raw["image"]), check_domain(str(raw["domain"])),
                   tuple(str(b) for b in raw["blobs"]))


def load_mounts(cache_dir: Path) -> list[MountRecord]:
    """The mounts the last instance recorded; [] when there is no (readable) table."""
    try:
        raw = json.loads((root(cache_dir) / MOUNTS).read_text())
        return [MountRecord.from_json(r) for r in raw["mounts"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def save_mounts(cache_dir: Path, mounts: list[MountRecord]) -> None:
    """Replace the table atomically (no fsync: after a power loss nothing is mounted)."""
    path = root(cache_dir) / MOUNTS
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"mounts": [m.to_json() for m in mounts]}, indent=1))
    os.replace(tmp, path)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted(mountinfo: str) -> dict[str, tuple[str, str]]:
    """mountpoint -> (fstype, source) from the text of /proc/self/mountinfo (the last wins)."""
    out: dict[str, tuple[str, str]] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        out[_unescape(fields[4])] = (rest[0], _unescape(rest[1]))
    return out


def current_mounts() -> dict[str, tuple[str, str]]:
    with open("/proc/self/mountinfo") as f:
        return mounted(f.read())


def mount_flags(mountinfo: str) -> dict[str, str]:
    """mountpoint -> its per-mount options ("ro,nosuid,nodev,relatime") from mountinfo."""
    out: dict[str, str] = {}
    for line in mountinfo.splitlines():
        fields = line.partition(" - ")[0].split()
        if len(fields) >= 6:  # noqa: PLR2004 - mountinfo's sixth field
            out[_unescape(fields[4])] = fields[5]
    return out


def current_flags(mountpoint: str) -> str:
    with open("/proc/self/mountinfo") as f:
        return mount_flags(f.read()).get(mountpoint, "")
