# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d import`: ingest EROFS images made by other tools (mkfs.erofs).

A plain image becomes one bootstrap blob. A metadata image made with
`--blobdev` names its data blobs in its device table; each is ingested and
owned by the image under the cookie key the kernel will send for it: the
slot's tag, or the `device=` string given at mount time. A key another image
already owns is refused (give `--blob PATH=KEY`), never rebound.
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ondemand_d.errors import ImageError, StoreError
from ondemand_d.store.limits import DEFAULT_MAX_CHUNK, ImageBudget, check_chunk_size
from ondemand_d.store.local import DEFAULT_CHUNK_SIZE, LocalStore
from ondemand_d.store.locations import local_only
from ondemand_d.store.model import PAGE, Image, check_key, check_name

EROFS_MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024
FSCACHE_BLKSZBITS = 12  # fscache mode needs the block size to equal the 4 KiB page


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """struct erofs_deviceslot (fs/erofs/erofs_fs.h): tag[64], blocks, mapped_blkaddr."""

    tag: str | None  # None: not UTF-8
    blocks: int
    mapped_blkaddr: int


def read_device_table(path: Path) -> list[DeviceSlot]:
    """Check that `path` is an EROFS image fscache mode can mount; return its device slots.

    Raises:
        ImageError: not a readable file, not EROFS, wrong block size, shorter than its
            superblock's block count, or a truncated device table.
    """
    size = _regular_file_size(path, "image", "the image file mkfs.erofs wrote")
    try:
        with path.open("rb") as f:
            head = f.read(SB_OFFSET + 128)
            if len(head) < SB_OFFSET + 128:
                raise ImageError(f"{path} is too short to hold an EROFS superblock")
            magic, = struct.unpack_from("<I", head, SB_OFFSET)
            if magic != EROFS_MAGIC:
                raise ImageError(f"{path} is not an EROFS image (magic {magic:#010x})")
            blkszbits = head[SB_OFFSET + 12]
            if blkszbits != FSCACHE_BLKSZBITS:
                raise ImageError(
                    f"{path} uses {1 << min(blkszbits, 63)}-byte blocks; fscache mode needs "
                    "4096 (mkfs.erofs -b 4096)"
                )
            blocks, = struct.unpack_from("<I", head, SB_OFFSET + 36)
            if size < blocks << FSCACHE_BLKSZBITS:
                raise ImageError(
                    f"{path} is truncated: its superblock counts {blocks} blocks "
                    f"({blocks << FSCACHE_BLKSZBITS} bytes) but the file has {size} bytes; "
                    "copy the whole image again"
                )
            extra, slotoff = struct.unpack_from("<HH", head, SB_OFFSET + 86)
            f.seek(slotoff * 128)
            table = f.read(extra * 128)
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
    if len(table) != extra * 128:
        raise ImageError(f"{path}: device table of {extra} slots is truncated")
    slots = []
    for i in range(extra):
        tag, blocks, mapped = struct.unpack_from("<64sII", table, i * 128)
        try:
            text = tag.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            text = None  # usable only with an explicit key (check_inputs says so)
        slots.append(DeviceSlot(text, blocks, mapped))
    return slots


def check_inputs(name: str, image_path: Path, blobs: list[tuple[Path, str | None]],
                 budget: ImageBudget = ImageBudget()) -> list[DeviceSlot]:  # noqa: B008 - frozen
    """Check an import's inputs before the store is touched; return the image's device slots.

    Each blob must be a regular file the size its slot says (when the slot has a block count)
    and at least as long as the image's chunk indexes reach into it; a slot whose tag is not
    UTF-8 needs an explicit KEY. The image file (the bootstrap) and the total are held to
    `budget` before a byte is read into the store.

    Raises:
        ImageError: with the blob or image at fault and what to give instead.
        StoreError: a bad name or key.
    """
    check_name(name)
    slots = read_device_table(image_path)
    if len(blobs) != len(slots):
        raise ImageError(
            f"{image_path} has {len(slots)} extra device(s) in its device table but "
            f"{len(blobs)} --blob given; give one --blob PATH[=KEY] per device, in order"
        )
    total = _regular_file_size(image_path, "image", "the image file mkfs.erofs wrote")
    budget.check(name, total, total + sum(
        _regular_file_size(p, "blob", "the data blob mkfs.erofs wrote with --blobdev")
        for p, _ in blobs))
    needed = _device_extents(image_path) if slots else {}
    for index, ((path, key), slot) in enumerate(zip(blobs, slots, strict=True), start=1):
        size = _regular_file_size(path, "blob", "the data blob mkfs.erofs wrote with --blobdev")
        blocks = -(-size // PAGE)
        if slot.blocks and blocks != slot.blocks:
            raise ImageError(
                f"blob {path} has {blocks} blocks but device {index} of {image_path} has "
                f"{slot.blocks}: give the blob mkfs.erofs wrote for this image"
            )
        if size < needed.get(index, 0):
            raise ImageError(
                f"blob {path} has {size} bytes but {image_path} reads device {index} up to "
                f"byte {needed[index]}: give the blob mkfs.erofs wrote for this image"
            )
        if key is None and slot.tag is None:
            raise ImageError(
                f"device {index} of {image_path} has a tag that is not UTF-8, which no mount "
                f"can name: give its key with --blob {path}=KEY"
            )
        if key is not None:
            check_key(key.encode())
    return slots


def _regular_file_size(path: Path, what: str, hint: str) -> int:
    try:
        info = path.stat()
    except OSError as exc:
        raise ImageError(f"{what} {path}: {exc.strerror.lower()}; give {hint}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ImageError(f"{what} {path} is {kind}; give {hint}")
    if not info.st_size:
        raise ImageError(f"{what} {path} is empty; give {hint}")
    return info.st_size


def _device_extents(image_path: Path) -> dict[int, int]:
    """device id -> bytes the image's chunk indexes reach into that device.

    The image is untrusted: directories are visited once and anything malformed is an error.
    """
    from ondemand_d.image import format as fmt  # noqa: PLC0415 - only --blobdev images
    from ondemand_d.image.reader import ImageReader  # noqa: PLC0415

    primary = image_path.read_bytes()
    try:
        reader = ImageReader(primary, [_no_read] * len(read_device_table(image_path)))
        reach: dict[int, int] = {}
        seen: set[int] = set()
        pending = [reader.sb.root_nid]
        while pending:
            nid = pending.pop()
            if nid in seen:
                continue
            seen.add(nid)
            ino = reader.inode(nid)
            if ino.is_dir:
                pending += [child for name, child, _ in reader.listdir(ino)
                            if name not in (b".", b"..")]
            elif ino.header.datalayout == fmt.LAYOUT_CHUNK_BASED and ino.size:
                chunkbits, entries = reader.chunk_map(ino)
                for k, (device, blkaddr) in enumerate(entries):
                    if blkaddr != fmt.NULL_ADDR:
                        end = (blkaddr << FSCACHE_BLKSZBITS) + min(
                            1 << chunkbits, ino.size - (k << chunkbits))
                        reach[device] = max(reach.get(device, 0), end)
    except (ValueError, IndexError, struct.error, KeyError) as exc:
        raise ImageError(f"{image_path} is not a valid EROFS image ({exc}): rebuild it") from None
    return reach


def _no_read(offset: int, length: int) -> bytes:  # pragma: no cover - never called
    raise AssertionError("_device_extents reads no data")


def import_image(
    store: LocalStore,
    name: str,
    image_path: Path,
    blobs: list[tuple[Path, str | None]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    replace: bool = False,
    max_chunk: int = DEFAULT_MAX_CHUNK,
    budget: ImageBudget = ImageBudget(),  # noqa: B008 - frozen, so one shared default is safe
) -> Image:
    """Ingest an image and its data blobs under `name` (the fsid to mount with).

    Args:
        blobs: (path, key) per device slot, in slot order; key None means the
            slot's tag, or the blob id when the slot has no tag.

    Raises:
        ImageError: the image and the blobs given do not match.
    """
    check_chunk_size(chunk_size, max_chunk)
    slots = check_inputs(name, image_path, blobs, budget)
    if store.has_image(name) and not replace:
        msg = f"an image named {name!r} exists; pass --replace or pick another name"
        raise ImageError(msg)
    with store.transaction():
        bootstrap = store.ingest_file(image_path, chunk_size)
        devices = []
        for (path, key), slot in zip(blobs, slots, strict=True):
            blob = store.ingest_file(path, chunk_size)
            cookie = key or slot.tag or blob.blob_id
            devices.append((cookie, blob.blob_id))
        extra = {"source": "import", "tags": [slot.tag or "" for slot in slots],
                 **local_only()}  # a blob `add` recorded first is never fetched from there
        try:
            image = Image(name, bootstrap.blob_id, tuple(devices), extra)
        except StoreError as exc:
            raise ImageError(f"{exc} (give --blob PATH=KEY with another key)") from None
        store.put_image(image, replace=replace)
    return image


def mount_command(image: Image, mountpoint: str = "/mnt", domain: str | None = None) -> str:
    """The mount(8) line for an imported image."""
    opts = [f"fsid={image.name}"]
    if domain:
        opts.append(f"domain_id={domain}")
    tags = image.extra.get("tags") or [key for key, _ in image.devices]
    # The kernel uses the on-disk tags unless device= is given, and then for every slot.
    if any(key != tag for (key, _), tag in zip(image.devices, tags, strict=True)):
        opts += [f"device={key}" for key, _ in image.devices]
    return f"mount -t erofs none -o {','.join(opts)} {mountpoint}"
