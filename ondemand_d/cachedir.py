# SPDX-License-Identifier: Apache-2.0
"""The cachefiles cache directory as the kernel lays it out: what is cached, and culling it.

Layout (fs/cachefiles, cachefiles-ondemand.md §2.4)::

    <dir>/cache/I<volume key>/@<xx>/D<cookie key>   one file per object (blob)
    <dir>/graveyard/                                 culled files, for the daemon to delete

Bytes cached are the data extents of a file (SEEK_DATA/SEEK_HOLE): the kernel treats a
hole as "not cached" and a READ fills it. Files are culled only through the kernel's
`inuse`/`cull` commands, which refuse files an object holds; this module never unlinks
a file under `cache/`.
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class CacheFile:
    path: Path
    volume: str  # the volume key, "erofs,<domain or fsid>"
    key: str | None  # the cookie key when the kernel stored it readable ("D" names)

    @property
    def domain(self) -> str:
        return self.volume.partition(",")[2] or self.volume


def data_ranges(fd: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """The data extents of the open file `fd` within [start, end), from SEEK_DATA/SEEK_HOLE.

    The kernel's anon fds forward lseek to the cache file, so this is what the
    cache holds of an object: a hole is "not cached", and a READ fills it.
    """
    # Not fstat: on the kernel's anon fd it describes the anon inode (size 0); lseek
    # is forwarded to the cache file, so SEEK_END gives the cache file's size.
    size = os.lseek(fd, 0, os.SEEK_END)
    end = size if end is None else min(end, size)
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from here to the end
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        out.append((data, hole))
        pos = hole
    return out


def holes(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) of `fd` that hold no data (past the file's end included)."""
    out: list[tuple[int, int]] = []
    pos = start
    for data, data_end in data_ranges(fd, start, end):
        if data > pos:
            out.append((pos, data))
        pos = data_end
    if pos < end:
        out.append((pos, end))
    return out


def data_bytes(fd: int) -> int:
    """Bytes of data (not holes) in the open file `fd`: what the cache holds of it."""
    return sum(e - s for s, e in data_ranges(fd))


def file_data_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return data_bytes(fd)
    finally:
        os.close(fd)


def cache_files(cache_dir: Path) -> Iterator[CacheFile]:
    """Every object file under `<cache_dir>/cache`, in no particular order."""
    root = cache_dir / "cache"
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for volume in os.scandir(root):
            if not volume.name.startswith("I") or not volume.is_dir(follow_symlinks=False):
                continue
            for fan in os.scandir(volume.path):
                if not fan.name.startswith("@") or not fan.is_dir(follow_symlinks=False):
                    continue
                for obj in os.scandir(fan.path):
                    if obj.is_file(follow_symlinks=False):
                        key = obj.name[1:] if obj.name.startswith("D") else None
                        yield CacheFile(Path(obj.path), volume.name[1:], key)


@dataclass(frozen=True, slots=True)
class CullResult:
    path: Path
    key: str | None
    outcome: str  # "culled", "in_use" or "gone"
    bytes: int  # disk bytes the file held (freed when culled)


Command = Callable[[bytes], None]


def cull(command: Command, cache_dir: Path, files: list[CacheFile]) -> list[CullResult]:
    """Ask the kernel to cull each file, then empty the graveyard; what happened to each.

    `command` writes one command to the bound device. `inuse` and `cull` name a file
    relative to the process's working directory (cachefiles' protocol), so this changes
    it per fan-out directory and restores it; call it from the thread that owns the cwd.
    """
    results: list[CullResult] = []
    home = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for f in files:
            try:
                held = os.stat(f.path).st_blocks * 512
            except FileNotFoundError:
                results.append(CullResult(f.path, f.key, "gone", 0))
                continue
            os.chdir(f.path.parent)
            name = f.path.name.encode()
            try:
                command(b"inuse " + name)
                command(b"cull " + name)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    results.append(CullResult(f.path, f.key, "in_use", held))
                elif exc.errno in (errno.ENOENT, errno.ESTALE):
                    results.append(CullResult(f.path, f.key, "gone", 0))
                else:
                    raise
            else:
                results.append(CullResult(f.path, f.key, "culled", held))
    finally:
        os.fchdir(home)
        os.close(home)
    empty_graveyard(cache_dir)
    return results


def empty_graveyard(cache_dir: Path) -> int:
    """Delete what the kernel moved to the graveyard (no object refers to it any more)."""
    removed = 0
    graveyard = cache_dir / "graveyard"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(graveyard):
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree(path)
                else:
                    path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("graveyard_remove_failed", path=str(path), error=exc.strerror)
    return removed


def _remove_tree(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(path)
