# SPDX-License-Identifier: Apache-2.0
"""Build one image into the store: place data, write at most one blob, then the bootstrap.

The whole build runs inside `store.transaction()`, and the image record (the
commit point) is written last, so a failed build leaves the store as it was.
"""
from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from ondemand_d.errors import ImageError, StoreError, UnknownName
from ondemand_d.image.blobwriter import BlobWriter, put_bytes, store_chunk_for
from ondemand_d.image.chunking import DEFAULT_BASE_CHUNK, ChunkPlanner, FileChunks, check_base_chunk
from ondemand_d.image.dedup import NEW_BLOB, ChunkDictionary
from ondemand_d.image.fingerprint import value as fingerprint_value
from ondemand_d.image.format import BLOCK
from ondemand_d.image.layout import Device, build_bootstrap
from ondemand_d.image.report import BuildReport
from ondemand_d.image.tree import Node, validate, walk
from ondemand_d.image.xattrs import FingerprintPrefix
from ondemand_d.store import Blob, Image, LocalStore
from ondemand_d.store.locations import local_only
from ondemand_d.store.model import check_name

#: Regular files up to this size live inline in the bootstrap, not in a blob:
#: a 4 KiB block per tiny file would cost more than it could ever save.
DEFAULT_INLINE_MAX = 512

#: Progress callback: (bytes placed so far, total bytes).
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class BuildOptions:
    base_chunk: int = DEFAULT_BASE_CHUNK
    inline_max: int = DEFAULT_INLINE_MAX
    fingerprint: FingerprintPrefix | None = None
    replace: bool = False
    #: (seconds, ns) for compact inodes; None = SOURCE_DATE_EPOCH or the newest mtime.
    epoch: tuple[int, int] | None = None


def build_image(
    root: Node,
    store: LocalStore,
    name: str,
    options: BuildOptions = BuildOptions(),  # frozen, so sharing the default is safe
    progress: Progress | None = None,
) -> BuildReport:
    """Build `root` as image `name`; return the report.

    Raises:
        ImageError: bad input, a name clash, or a store failure (e.g. full);
            the store is then unchanged.
    """
    started = time.monotonic()
    try:
        check_name(name)
        check_base_chunk(options.base_chunk)
    except (StoreError, ValueError) as exc:
        raise ImageError(str(exc)) from None
    validate(root)
    if not options.replace and _image_exists(store, name):
        msg = f"an image named {name!r} exists; pass --replace or pick another name"
        raise ImageError(msg)
    report = BuildReport(name)
    try:
        with store.transaction():
            _build(root, store, name, options=options, report=report, progress=progress)
    except StoreError as exc:
        msg = f"building {name!r} failed and the store was left unchanged: {exc}"
        raise ImageError(msg) from exc
    except OSError as exc:
        msg = f"building {name!r} failed and the store was left unchanged: {exc}"
        raise ImageError(msg) from exc
    report.seconds = time.monotonic() - started
    return report


def _build(
    root: Node,
    store: LocalStore,
    name: str,
    *,
    options: BuildOptions,
    report: BuildReport,
    progress: Progress | None,
) -> None:
    files = _regular_files(root)
    total = sum(n.size for n in files)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    writer = BlobWriter(store, store_chunk_for(options.base_chunk))
    planner = ChunkPlanner(
        ChunkDictionary.from_store(store), writer, options.base_chunk, on_bytes,
    )
    placements: dict[int, FileChunks | bytes] = {}
    for node in files:
        if node.content is None or node.size == 0:
            continue
        if node.size <= options.inline_max:
            placements[id(node)] = node.content.read(0, node.size)
            report.inline_files += 1
            on_bytes(node.size)
        else:
            placements[id(node)] = planner.place(node.content)
    new_blob = writer.finish({"kind": "erofs-data"})
    if new_blob is not None:  # extents hashed here, over the bytes just written
        store.put_dedup(new_blob.blob_id, writer.extents)

    order = _device_order(placements, new_blob.blob_id if new_blob else None)
    device_of = {blob_id: i + 1 for i, blob_id in enumerate(order)}
    if new_blob is not None:
        device_of[NEW_BLOB] = device_of[new_blob.blob_id]
    devices = [Device(b, store.get_blob(b).size // BLOCK) for b in order]
    fingerprints = (
        _fingerprints(store, files, placements, new_blob) if options.fingerprint is not None else None
    )
    bootstrap, stats = build_bootstrap(
        root,
        placements=placements,
        devices=devices,
        device_of=device_of,
        epoch=options.epoch or default_epoch(root),
        fingerprint=options.fingerprint,
        fingerprints=fingerprints,
    )
    boot = put_bytes(store, bootstrap, {"kind": "erofs-bootstrap"})
    # tag = blob id; local_only: a blob `add` recorded first is never fetched from its registry
    image = Image(name, boot.blob_id, tuple((b, b) for b in order), local_only())
    store.put_image(image, replace=options.replace)  # the commit point: last

    s = planner.stats
    report.bootstrap = boot.blob_id
    report.new_blob = new_blob.blob_id if new_blob else None
    report.new_blob_bytes = new_blob.size if new_blob else 0
    report.blobs = order
    report.inodes = stats.inodes
    report.files = len(files)
    report.bytes = total
    report.chunks_total, report.chunks_new, report.chunks_reused = s.total, s.new, s.reused
    report.holes, report.zero_chunks = s.holes, s.zero_chunks
    report.bytes_new, report.bytes_saved = s.bytes_new, s.bytes_saved
    report.bootstrap_bytes = stats.bootstrap_bytes
    report.xattrs_dropped = stats.xattrs_dropped


def _fingerprints(
    store: LocalStore,
    files: list[Node],
    placements: dict[int, FileChunks | bytes],
    new_blob: Blob | None,
) -> dict[int, bytes]:
    """Each chunk-based file's fingerprint (fingerprint.py), from the blobs' chunk tables."""
    blobs: dict[str, Blob] = {}
    if new_blob is not None:
        blobs[NEW_BLOB] = new_blob

    def blob(blob_id: str) -> Blob:
        if blob_id not in blobs:
            blobs[blob_id] = store.get_blob(blob_id)
        return blobs[blob_id]

    out: dict[int, bytes] = {}
    for node in files:
        placed = placements.get(id(node))
        if isinstance(placed, FileChunks):
            pieces = [None if r is None else (blob(r.blob_id), r.offset) for r in placed.refs]
            out[id(node)] = fingerprint_value(node.size, placed.chunkbits, pieces)
    return out


def _device_order(placements: dict[int, FileChunks | bytes], new_id: str | None) -> list[str]:
    """Data blobs in device-slot order: stored ones by first use, then the new one.

    Slots are then reproducible, and a base layer keeps its slot as images grow.
    """
    order: list[str] = []
    for placed in placements.values():
        if isinstance(placed, FileChunks):
            for ref in placed.refs:
                if ref is not None and ref.blob_id not in order:
                    order.append(ref.blob_id)
    if NEW_BLOB in order:
        order.remove(NEW_BLOB)
        assert new_id is not None
        if new_id not in order:  # equal bytes may already be stored under that id
            order.append(new_id)
    return order


def _regular_files(root: Node) -> list[Node]:
    """Each regular file once (hard links share a node), in tree order."""
    seen: set[int] = set()
    out: list[Node] = []
    for _, node in walk(root):
        if node.fmt == stat.S_IFREG and id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out


def default_epoch(root: Node) -> tuple[int, int]:
    """SOURCE_DATE_EPOCH if set, else the newest mtime in the tree: never the clock."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env is not None:
        try:
            return int(env), 0
        except ValueError:
            msg = f"SOURCE_DATE_EPOCH={env!r} is not a whole number of seconds"
            raise ImageError(msg) from None
    newest = max(node.mtime_ns for _, node in walk(root))
    return divmod(newest, 1_000_000_000)


def _image_exists(store: LocalStore, name: str) -> bool:
    try:
        store.get_image(name)
    except UnknownName:
        return False
    return True
