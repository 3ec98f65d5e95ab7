# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d rm` and `ondemand-d gc`: unregister images, free what nothing uses.

gc marks every blob an image record names or a live daemon lease holds, and
every chunk of those blobs, and every location an image record names;
everything else is removed, records before chunks (and, given the cache
directory, the fanotify blob files of the blobs not kept):

1. with the writer lock (no build, import or add runs) and gc.lock exclusive
   (no daemon is between resolving a key and leasing its blob): mark; remove
   the dead blobs' dedup and blob records and the locations no image names
   (a running daemon keeps the located blobs it opened in memory); fsync
   their directories;
2. still under the writer lock: remove unmarked chunk files and stale tmp files.

A crash anywhere leaves only garbage that the next gc removes: no record that
survives can name a chunk that was removed, because records go first and are
durable before any chunk is touched. Refused while an image record is damaged
(its blobs could not be marked): `fsck --repair` first.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ondemand_d.errors import StoreError
from ondemand_d.fanotify import cachelimit
from ondemand_d.fanotify import layout as fanotify_layout
from ondemand_d.store import durable
from ondemand_d.store.lease import gc_lock, leased_blobs
from ondemand_d.store.local import LocalStore
from ondemand_d.store.locations import LOCATIONS
from ondemand_d.store.model import Image


@dataclass
class GcReport:
    dry_run: bool
    blobs: int = 0  # blob records removed
    blob_bytes: int = 0  # their declared sizes
    chunks: int = 0  # chunk files removed
    bytes: int = 0  # chunk file bytes freed
    tmp_files: int = 0
    kept_for_leases: int = 0  # blobs no image names that a running daemon has open
    locations: int = 0  # location records removed (their images are gone)
    images: int = 0  # image records marked from
    cache_files: int = 0  # fanotify blob files removed (their blobs are gone)
    cache_bytes: int = 0  # their allocated bytes


@dataclass
class RmReport:
    removed: list[str] = field(default_factory=list)
    unshared: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (chunks, bytes)


def _chunk_sets(store: LocalStore, images: Iterable[Image]) -> dict[str, set[str]]:
    """Image name -> the digests of every chunk its blobs use."""
    out: dict[str, set[str]] = {}
    for image in images:
        digests: set[str] = set()
        for blob_id in image.blob_ids:
            digests.update(c.digest for c in store.get_blob(blob_id).chunks)
        out[image.name] = digests
    return out


def rm(store: LocalStore, names: list[str]) -> RmReport:
    """Unregister images; report, per image, the chunks and bytes no other image uses.

    Raises:
        UnknownName: one of `names` is not an image (nothing is removed then).
    """
    report = RmReport()
    with store.writer_lock():
        for name in names:
            store.get_image(name) if store.has_image(name) else store.get_image(name)
        images, _ = store.scan_images()
        sets = _chunk_sets(store, (i for i in images))
        kept: set[str] = set()
        for image_name, digests in sets.items():
            if image_name not in names:
                kept |= digests
        for name in names:
            own = sets.get(name, set()) - kept
            report.unshared[name] = (len(own), sum(_size(store.chunk_path(d)) for d in own))
            store.remove_image(name)
            report.removed.append(name)
    return report


def gc(store: LocalStore, *, dry_run: bool = False, cache_dir: Path | None = None,
       progress: Callable[[str], None] | None = None) -> GcReport:
    """Remove unreferenced blobs and chunks (nothing, with `dry_run`); report what is freed.

    With `cache_dir`, also the fanotify front end's blob files of blobs no longer live.
    """
    say = progress or (lambda _msg: None)
    report = GcReport(dry_run)
    with store.writer_lock():
        with gc_lock(store.root, exclusive=True):
            images, damaged = store.scan_images()
            if damaged:
                names = ", ".join(d.path.name for d in damaged)
                msg = (f"image record(s) {names} are damaged, so their blobs cannot be told "
                       "apart from garbage; run 'ondemand-d fsck --repair' first (nothing removed)")
                raise StoreError(msg)
            report.images = len(images)
            named = {b for image in images for b in image.blob_ids}
            present = set(store.blob_ids())
            leased = leased_blobs(store.root, remove_stale=not dry_run) & present
            report.kept_for_leases = len(leased - named)
            live = (named | leased) & present
            say(f"marking {len(live)} blob(s) of {len(images)} image(s)")
            live_chunks: set[str] = set()
            for blob_id in sorted(live):
                try:
                    live_chunks.update(c.digest for c in store.get_blob(blob_id).chunks)
                except StoreError as exc:
                    msg = (f"{exc}; its chunks cannot be marked: run 'ondemand-d fsck --repair' "
                           "first (nothing removed)")
                    raise StoreError(msg) from None
            dead = sorted(present - live)
            for blob_id in dead:
                report.blobs += 1
                with contextlib.suppress(StoreError):
                    report.blob_bytes += store.get_blob(blob_id).size
                if not dry_run:
                    durable.unlink(store.root / "dedup" / f"{blob_id}.json")
                    durable.unlink(store.blob_path(blob_id))
            if dead and not dry_run:
                durable.fsync_dir(store.root / "dedup")
                durable.fsync_dir(store.root / "blobs")
            _sweep_locations(store, images, report)
            if cache_dir is not None:  # under gc.lock: no mount is resolving a blob now
                _sweep_fanotify(cache_dir, live, report)
        say(f"{report.blobs} dead blob record(s){'' if not dry_run else ' (dry run)'}; "
            "sweeping chunks")
        _sweep_chunks(store, live_chunks, report)
        _sweep_tmp(store, report)
        if not dry_run:
            _sweep_keys(store)
    return report


def _sweep_locations(store: LocalStore, images: list[Image], report: GcReport) -> None:
    """Remove the location records no image names (an image's are its own: rm + gc)."""
    named: set[str] = set()
    for image in images:
        locations = image.extra.get(LOCATIONS)
        if isinstance(locations, dict):
            named.update(str(v) for v in locations.values())
    dead = [loc for loc in store.location_ids() if loc not in named]
    report.locations = len(dead)
    if dead and not report.dry_run:
        for location_id in dead:
            durable.unlink(store.root / "locations" / f"{location_id}.json")
        durable.fsync_dir(store.root / "locations")


def _sweep_fanotify(cache_dir: Path, live: set[str], report: GcReport) -> None:
    """Remove the fanotify blob files of blobs gc does not keep.

    A running daemon leases every blob its mounts use, so those are live. A file a
    recorded mount names (fanotify/mounts.json) is kept even when no daemon runs: its
    fill fd may wait in the fd holder or systemd's fd store for a successor to adopt it.
    """
    recorded = {(m.domain, b) for m in fanotify_layout.load_mounts(cache_dir) for b in m.blobs}
    for file in cachelimit.scan(fanotify_layout.root(cache_dir)):
        if file.path.name in live or (file.path.parent.name, file.path.name) in recorded:
            continue
        report.cache_files += 1
        report.cache_bytes += file.allocated
        if not report.dry_run:
            with contextlib.suppress(FileNotFoundError):
                file.path.unlink()


def _sweep_chunks(store: LocalStore, live: set[str], report: GcReport) -> None:
    """Remove unmarked chunk files. No record names them any more, so a removal a power
    loss undoes only brings back garbage: one syncfs at the end, not an fsync per directory."""
    touched = False
    for sub in sorted((store.root / "chunks").iterdir()):
        for path in sorted(sub.iterdir()):
            if path.name in live:
                continue
            report.chunks += 1
            report.bytes += _size(path)
            if not report.dry_run:
                touched = durable.unlink(path) or touched
    if touched:
        durable.syncfs(store.root)


def _sweep_tmp(store: LocalStore, report: GcReport) -> None:
    """Staging files of processes that are gone (killed mid-write)."""
    for path in (store.root / "tmp").iterdir():
        pid = _pid_of(path.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            report.tmp_files += 1
            if not report.dry_run:
                durable.unlink(path)


def _sweep_keys(store: LocalStore) -> None:
    """Key entries whose image is gone or no longer lists the key (left by a crash)."""
    for key_dir in (store.root / "keys").iterdir():
        for entry in key_dir.iterdir():
            key = store.key_entry_key(entry)
            try:
                image = store.get_image(entry.name)
            except StoreError:
                image = None
            if key is None or image is None or image.blob_for(key) is None:
                durable.unlink(entry)
        with contextlib.suppress(OSError):
            key_dir.rmdir()


def _pid_of(name: str) -> int | None:
    parts = name.rsplit(".", 2)
    try:
        return int(parts[-2]) if len(parts) == 3 else None  # noqa: PLR2004 - name.pid.n
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
