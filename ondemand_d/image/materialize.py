# SPDX-License-Identifier: Apache-2.0
"""Write an image's blobs out of the store as plain files (for fsck, loop mounts, export)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ondemand_d.image.reader import DeviceRead, ImageReader
from ondemand_d.store import LocalStore


@dataclass(frozen=True, slots=True)
class ImageFiles:
    """The bootstrap file and the data-blob files in device-slot order."""

    bootstrap: Path
    devices: tuple[Path, ...]

    def fsck_args(self) -> list[str]:
        """erofs-utils wants one --device= per extra device, in device-id order."""
        return [*(f"--device={p}" for p in self.devices), str(self.bootstrap)]


def write_blob(store: LocalStore, blob_id: str, path: str | os.PathLike[str]) -> Path:
    """Concatenate a blob's chunks, each verified against its digest, into `path`."""
    blob = store.get_blob(blob_id)
    out = Path(path)
    with out.open("wb") as f:
        for chunk in blob.chunks:
            f.write(store.read_chunk(chunk))
    return out


def materialize(store: LocalStore, name: str, directory: str | os.PathLike[str]) -> ImageFiles:
    """Write image `name` as `<blob id>.img` files under `directory`."""
    image = store.get_image(name)
    where = Path(directory)
    where.mkdir(parents=True, exist_ok=True)

    def one(blob_id: str) -> Path:
        path = where / f"{blob_id}.img"
        return path if path.exists() else write_blob(store, blob_id, path)

    return ImageFiles(one(image.bootstrap), tuple(one(b) for _, b in image.devices))


def image_reader(store: LocalStore, name: str) -> ImageReader:
    """An ImageReader over image `name`, reading (verified) chunks straight from the store."""
    image = store.get_image(name)
    boot = store.get_blob(image.bootstrap)
    primary = b"".join(store.read_chunk(c) for c in boot.chunks)
    return ImageReader(primary, [_range_reader(store, b) for _, b in image.devices])


def _range_reader(store: LocalStore, blob_id: str) -> DeviceRead:
    blob = store.get_blob(blob_id)

    def read(offset: int, length: int) -> bytes:
        chunks = blob.chunks_for(offset, length)
        data = b"".join(store.read_chunk(c) for c in chunks)
        start = offset - chunks[0].offset if chunks else 0
        return data[start : start + length]

    return read
