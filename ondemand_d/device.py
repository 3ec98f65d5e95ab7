# SPDX-License-Identifier: Apache-2.0
"""The I/O edge: /dev/cachefiles itself. Open, set up, read messages, write replies.

Every known way for set-up to fail is turned into one sentence that says what
to do (cachefiles-ondemand.md §1 and §8 list them).
"""
from __future__ import annotations

import errno
import os
import resource
import select
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from ondemand_d import wire
from ondemand_d.errors import CacheDirError, DeviceError

log = structlog.get_logger()

TMPFS_MAGIC = 0x01021994
#: Each open blob holds one anon fd; below this many, mounts start failing with EMFILE.
MIN_NOFILE = 4096


class Device:
    """The cachefiles devnode: one fd, one command per write, one message per read."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: Path) -> Device:
        """Open the devnode read-write, non-blocking and close-on-exec.

        Raises:
            DeviceError: with a sentence naming the cause and the fix.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            msg = (
                f"{path} does not exist: load the cachefiles module (modprobe cachefiles) "
                "on a kernel built with CONFIG_CACHEFILES_ONDEMAND=y and CONFIG_EROFS_FS_ONDEMAND=y "
                "(Debian's stock kernels lack both; see the README for the test kernel)"
            )
            raise DeviceError(msg) from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                msg = (
                    f"{path} is busy: another cachefiles daemon (cachefilesd, nydusd or another "
                    "ondemand-d) holds it, or the last one's blobs are still mounted; stop it "
                    "and unmount its images"
                )
            elif exc.errno in (errno.EPERM, errno.EACCES):
                msg = f"opening {path} needs CAP_SYS_ADMIN: run ondemand-d as root"
            else:
                msg = f"cannot open {path}: {exc.strerror}"
            raise DeviceError(msg) from exc
        try:
            _check_pollable(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def command(self, text: bytes) -> None:
        """Write one command; the whole buffer is the command."""
        n = os.write(self.fd, text)
        if n != len(text):  # pragma: no cover - the kernel takes a command whole or fails
            raise OSError(errno.EIO, f"short write of command {text!r}")

    def bind(self, cache_dir: Path, tag: str) -> None:
        """`dir`, `tag`, `bind ondemand`: make this the on-demand cache daemon.

        Raises:
            DeviceError: with the cause and the fix.
        """
        check_cache_dir(cache_dir)
        for cmd in (f"dir {cache_dir}", f"tag {tag}"):
            try:
                self.command(cmd.encode())
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    msg = f"`{cmd}` failed with EEXIST: this device fd was already set up"
                else:
                    msg = f"`{cmd}` failed: {exc.strerror}"
                raise DeviceError(msg) from exc
        try:
            self.command(b"bind ondemand")
        except OSError as exc:
            # A cache directory on the wrong filesystem is a setting to change, not the device.
            error = CacheDirError if exc.errno in (errno.EOPNOTSUPP, errno.EROFS) else DeviceError
            raise error(_bind_error(exc, cache_dir, tag)) from exc

    def restore(self) -> None:
        """Ask the kernel to resend requests a previous daemon read but never answered."""
        self.command(wire.format_restore())

    def try_restore(self) -> bool:
        """`restore`; False when the kernel does not know the command (before Linux 6.8).

        On a bound on-demand device EOPNOTSUPP can only mean an unknown command. Sent
        before any request was read, it changes nothing: every queued request is new.
        """
        try:
            self.restore()
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                return False
            raise
        return True

    def read_message(self) -> bytes | None:
        """One message, or None when none is queued (the kernel's read returns 0)."""
        try:
            buf = os.read(self.fd, wire.CACHEFILES_MSG_MAX_SIZE)
        except BlockingIOError:
            return None
        return buf or None

    def copen(self, msg_id: int, size_or_errno: int) -> None:
        self.command(wire.format_copen(msg_id, size_or_errno))


TRACEFS_EVENTS = Path("/sys/kernel/tracing/events/cachefiles")
#: Share domains (`domain_id=`) arrived in Linux 6.1; `restore` (failover) in 6.8.
DOMAIN_SINCE = (6, 1)


@dataclass(frozen=True, slots=True)
class KernelFeatures:
    """What the running kernel offers the daemon, as found at start-up."""

    release: str
    restore: bool  # failover: a successor gets the dead daemon's pending requests again
    domain: bool  # share domains, from the release (no probe exists short of a mount)
    tracing: bool  # tracefs is mounted and has the cachefiles_ondemand_* events

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kernel_features(restore: bool, release: str | None = None) -> KernelFeatures:
    release = release or os.uname().release
    return KernelFeatures(
        release=release, restore=restore, domain=_version(release) >= DOMAIN_SINCE,
        tracing=(TRACEFS_EVENTS / "cachefiles_ondemand_read").is_dir(),
    )


def _version(release: str) -> tuple[int, int]:
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _check_pollable(fd: int, path: Path) -> None:
    """The daemon waits for requests with epoll: a file that cannot be polled is not the device."""
    poller = select.epoll()
    try:
        poller.register(fd, select.EPOLLIN)
    except OSError:
        msg = (f"{path} cannot be polled, so it is not the cachefiles device: give its devnode "
               "(--device /dev/cachefiles)")
        raise DeviceError(msg) from None
    finally:
        poller.close()


def _bind_error(exc: OSError, cache_dir: Path, tag: str) -> str:
    if exc.errno == errno.EINVAL:
        return (
            "`bind ondemand` failed with EINVAL: this kernel was built without "
            "CONFIG_CACHEFILES_ONDEMAND=y"
        )
    if exc.errno == errno.EOPNOTSUPP:
        return (
            f"`bind ondemand` failed with EOPNOTSUPP: the filesystem of {cache_dir} lacks "
            "xattrs, O_TMPFILE or sync_fs (tmpfs does): put the cache on ext4, xfs or btrfs"
        )
    if exc.errno == errno.EROFS:
        return f"`bind ondemand` failed: {cache_dir} is on a read-only filesystem"
    if exc.errno == errno.EBUSY:
        return f"`bind ondemand` failed with EBUSY: the cache is bound already (tag {tag!r} in use)"
    if exc.errno == errno.ERANGE:
        return "`bind ondemand` failed with ERANGE: the culling limits are inconsistent"
    return f"`bind ondemand` failed: {exc.strerror}"


def check_cache_dir(cache_dir: Path) -> None:
    """Create the cache directory and refuse filesystems cachefiles rejects."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the cache directory {cache_dir}: {exc.strerror}"
        raise CacheDirError(msg) from exc
    if _fs_type(cache_dir) == TMPFS_MAGIC:
        msg = (
            f"the cache directory {cache_dir} is on tmpfs, which cachefiles rejects "
            "(no sync_fs): put it on ext4, xfs or btrfs"
        )
        raise CacheDirError(msg)


def _fs_type(path: Path) -> int | None:
    """f_type from statfs(2), or None where it cannot be read."""
    try:
        import ctypes  # noqa: PLC0415 - statfs has no os wrapper with f_type

        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(120)
        if libc.statfs(str(path).encode(), buf) != 0:
            return None
        return int.from_bytes(buf.raw[:8], "little")
    except (OSError, AttributeError):  # pragma: no cover - non-glibc systems
        return None


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; warn if that is still low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < MIN_NOFILE:
        log.warning(
            "nofile_limit_low",
            limit=soft,
            hint=f"each open blob needs an fd; raise LimitNOFILE= to at least {MIN_NOFILE}",
        )
    return soft
