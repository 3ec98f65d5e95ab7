# SPDX-License-Identifier: Apache-2.0
"""The fanotify front end's cache size limit: what its blob files hold, and what may go.

Bytes are counted as allocated (st_blocks), since a blob file is sparse until read. Files of
no current mount are removed least recently used first (the later of their last fill and
last read) when a fill would pass the limit.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class CacheFile:
    path: Path
    allocated: int
    last_used: float


def scan(root: Path) -> list[CacheFile]:
    """Every blob file under `root` (fanotify/<domain>/<blob id>); [] if there is none."""
    out = []
    try:
        domains = list(os.scandir(root))
    except FileNotFoundError:
        return out
    for domain in domains:
        if not domain.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(domain.path):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_file(follow_symlinks=False):
                out.append(CacheFile(Path(entry.path), st.st_blocks * 512,
                                     max(st.st_mtime, st.st_atime)))
    return out


def victims(files: Iterable[CacheFile], busy: set[Path], to_free: int) -> list[CacheFile]:
    """Files not in `busy`, least recently used first, until they add up to `to_free`."""
    out: list[CacheFile] = []
    freed = 0
    for file in sorted((f for f in files if f.path not in busy), key=lambda f: f.last_used):
        if freed >= to_free:
            break
        out.append(file)
        freed += file.allocated
    return out
