# SPDX-License-Identifier: Apache-2.0
"""Whether a fanotify mount shares page cache (`inode_share,domain_id=`), and why not.

Linux 7.0+ (`CONFIG_EROFS_FS_PAGE_CACHE_SHARE`, fs/erofs/ishare.c) lets the files
of one domain whose fingerprint xattrs are equal share one page cache, and reads a
shared file through any one of them. The kernel believes whatever fingerprint an
image carries, so a mount shares only when all of these hold:

1. the kernel has the option (`kernel_lacks`, probed once per process);
2. the mount names its domain (`--domain`): sharing is something asked for;
3. the image has fingerprints and every one checks out against the image's own
   chunk tables (image/fingerprint.py), so nothing one image brings can change what
   another reads. The verdict depends only on the bootstrap and the data blobs, all
   content-addressed, so it is kept per process by their ids.

Otherwise the mount is made without the options, and says why ("off: <reason>").
After the mount, `confirm` reads the super options back: the kernel itself turns
`inode_share` off for an image without the ishare feature bit.
"""
from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from ondemand_d.fanotify import syscalls
from ondemand_d.image.fingerprint import Verdict, check_image
from ondemand_d.store import Blob
from ondemand_d.store.fetch import ChunkFetcher

log = structlog.stdlib.get_logger()

KERNEL_MISSING = "kernel option missing (CONFIG_EROFS_FS_PAGE_CACHE_SHARE, Linux 7.0+)"
NO_DOMAIN = "no domain (mount with --domain to share page cache)"
#: Of a mount an earlier instance made (its options were not recorded).
UNKNOWN = "unknown: mounted by an earlier instance"


@dataclass(frozen=True, slots=True)
class Sharing:
    """The verdict for one mount and the fsconfig options it implies."""

    on: bool
    reason: str = ""  # why not, when off
    options: tuple[tuple[str, str | None], ...] = ()

    @property
    def status(self) -> str:
        return "on" if self.on else f"off: {self.reason}"


_kernel: list[str | None] = []  # the cached probe: [] not asked yet, [None] supported
_verdicts: dict[tuple[str, ...], Verdict] = {}


def kernel_lacks() -> str | None:
    """Why this kernel cannot share EROFS page cache, or None if it can (cached)."""
    if not _kernel:
        ok = syscalls.erofs_takes("inode_share")
        if ok is None:  # could not ask (no new mount API, no CAP_SYS_ADMIN): sharing off
            log.warning("inode_share_probe_failed", consequence="page-cache sharing off")
        _kernel.append(None if ok else KERNEL_MISSING)
    return _kernel[0]


async def decide(fetcher: ChunkFetcher, bootstrap: Blob, data: Sequence[Blob],
                 domain: str | None) -> Sharing:
    """Whether to mount with `inode_share,domain_id=domain`; `domain` None: not asked for.

    Runs after the bootstrap's metadata is filled; reads the bootstrap through `fetcher`
    (verified chunks) and checks it in a thread. Never raises: any failure is "off".
    """
    lacks = kernel_lacks()
    if lacks is not None:
        return Sharing(on=False, reason=lacks)
    if domain is None:
        return Sharing(on=False, reason=NO_DOMAIN)
    key = (bootstrap.blob_id, *(b.blob_id for b in data))
    verdict = _verdicts.get(key)
    if verdict is None:
        try:
            parts, _ = await fetcher.get(bootstrap, bootstrap.chunks)
            primary = b"".join(parts)
            verdict = await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(check_image, primary, tuple(data)))
        except Exception as exc:  # noqa: BLE001 - any failure means: do not share
            return Sharing(on=False, reason=f"fingerprints not verified: {exc}")
        _verdicts[key] = verdict
    if not verdict.safe:
        return Sharing(on=False, reason=verdict.reason)
    return Sharing(on=True, options=(("inode_share", None), ("domain_id", domain)))


def confirm(sharing: Sharing, mountpoint: str) -> Sharing:
    """The verdict as the kernel has it: off if `inode_share` is not in the super options."""
    if not sharing.on:
        return sharing
    try:
        options = super_options(mountpoint)
    except OSError as exc:
        return Sharing(on=False, reason=f"unknown: mountinfo unreadable ({exc.strerror})")
    if "inode_share" not in options.split(","):
        return Sharing(on=False, reason="the kernel turned inode_share off (see dmesg)")
    return sharing


def super_options(mountpoint: str) -> str:
    """The superblock options mountinfo shows for `mountpoint`."""
    with open("/proc/self/mountinfo") as f:
        found = parse_super_options(f.read(), mountpoint)
    if found is None:
        raise OSError(errno.ENOENT, f"{mountpoint} is not in mountinfo")
    return found


def parse_super_options(mountinfo: str, mountpoint: str) -> str | None:
    """The super options (after " - fstype source") of the top mount on `mountpoint`."""
    found = None
    for line in mountinfo.splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) >= 5 and _unescape(fields[4]) == mountpoint and len(rest) >= 3:  # noqa: PLR2004
            found = rest[2]  # the last mount on that point is the visible one
    return found


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def reset() -> None:
    """Forget the cached probe and verdicts (tests)."""
    _kernel.clear()
    _verdicts.clear()

