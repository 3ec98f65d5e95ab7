# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d import`: ingest EROFS images made by other tools (mkfs.erofs).

A plain image becomes one bootstrap blob. A metadata image made with
`--blobdev` names its data blobs in its device table; each is ingested and
bound to the cookie key the kernel will send for it: the slot's tag, or the
`device=` string given at mount time.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ondemand_d.errors import ImageError
from ondemand_d.store.local import DEFAULT_CHUNK_SIZE, LocalStore
from ondemand_d.store.model import Image, check_key, check_name

EROFS_MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024
FSCACHE_BLKSZBITS = 12  # fscache mode needs the block size to equal the 4 KiB page


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """struct erofs_deviceslot (fs/erofs/erofs_fs.h): tag[64], blocks, mapped_blkaddr."""

    tag: str
    blocks: int
    mapped_blkaddr: int


def read_device_table(path: Path) -> list[DeviceSlot]:
    """Check that `path` is an EROFS image fscache mode can mount; return its device slots.

    Raises:
        ImageError: not EROFS, wrong block size, or a truncated device table.
    """
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
                    f"{path} uses {1 << blkszbits}-byte blocks; fscache mode needs 4096 "
                    "(mkfs.erofs -b 4096)"
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
        slots.append(DeviceSlot(tag.rstrip(b"\0").decode("utf-8", "replace"), blocks, mapped))
    return slots


def import_image(
    store: LocalStore,
    name: str,
    image_path: Path,
    blobs: list[tuple[Path, str | None]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    replace: bool = False,
) -> Image:
    """Ingest an image and its data blobs under `name` (the fsid to mount with).

    Args:
        blobs: (path, key) per device slot, in slot order; key None means the
            slot's tag, or the blob id when the slot has no tag.

    Raises:
        ImageError: the image and the blobs given do not match.
    """
    check_name(name)
    slots = read_device_table(image_path)
    if len(blobs) != len(slots):
        raise ImageError(
            f"{image_path} has {len(slots)} extra device(s) in its device table but "
            f"{len(blobs)} --blob given; give one --blob PATH[=KEY] per device, in order"
        )
    with store.transaction():
        bootstrap = store.ingest_file(image_path, chunk_size)
        devices = []
        for (path, key), slot in zip(blobs, slots, strict=True):
            blob = store.ingest_file(path, chunk_size)
            cookie = key or slot.tag or blob.blob_id
            check_key(cookie.encode())
            devices.append((cookie, blob.blob_id))
        extra = {"source": "import", "tags": [slot.tag for slot in slots]}
        image = Image(name, bootstrap.blob_id, tuple(devices), extra)
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
