# SPDX-License-Identifier: Apache-2.0
"""Caps on what an image may bring: a chunk is read, verified and written whole per READ.

A registry table could otherwise declare a 1 GiB chunk, and one 4 KiB READ
would then cost 1 GiB of memory and a 1 GiB cache write. Likewise a 62 KiB
layer of zstd frames can declare a 1 GiB bootstrap: `ImageBudget` refuses an
image by what it declares, before a byte of it is decoded.
"""
from __future__ import annotations

from dataclasses import dataclass

from ondemand_d.errors import ImageError, StoreError
from ondemand_d.store.model import Blob

#: Largest chunk accepted at add and import (the builder writes 1 MiB chunks).
DEFAULT_MAX_CHUNK = 4 << 20


def check_chunk_size(size: int, max_chunk: int = DEFAULT_MAX_CHUNK) -> int:
    """Return `size` if it is a chunk size the store accepts, else raise StoreError."""
    if size > max_chunk:
        msg = (
            f"chunk size {size} is above the store's cap of {max_chunk} bytes "
            "(raise max_chunk in the configuration if this is intended)"
        )
        raise StoreError(msg)
    return size


def check_chunks(blob: Blob, max_chunk: int = DEFAULT_MAX_CHUNK) -> Blob:
    """Refuse a blob with a chunk (or a compressed remote range) above `max_chunk` bytes."""
    for chunk in blob.chunks:
        stored = chunk.remote.length if chunk.remote is not None else 0
        if chunk.length > max_chunk or stored > max_chunk + (max_chunk >> 4) + 4096:
            msg = (
                f"blob {blob.blob_id[:16]} has a chunk of {max(chunk.length, stored)} bytes at "
                f"offset {chunk.offset}, above the store's cap of {max_chunk} bytes "
                "(raise max_chunk in the configuration if this is intended)"
            )
            raise StoreError(msg)
    return blob


#: Largest bootstrap accepted (decoded) at add and import. A bootstrap built here or pushed
#: from a `build` holds metadata only: about 1 KiB per file, so 256 MiB is room for images of
#: a few hundred thousand files; a plain image imported whole is its own bootstrap, and
#: that is where raising it is needed.
DEFAULT_MAX_BOOTSTRAP = 256 << 20
#: Largest total an image may declare (bootstrap and data blobs, as their tables say). The
#: biggest real container images are a few tens of GiB; 64 GiB leaves room and still stops
#: a table that declares terabytes to fill a cache with.
DEFAULT_MAX_IMAGE = 64 << 30


@dataclass(frozen=True, slots=True)
class ImageBudget:
    """What one image may declare, checked before any of its bytes are decoded or copied."""

    max_bootstrap: int = DEFAULT_MAX_BOOTSTRAP
    max_image: int = DEFAULT_MAX_IMAGE

    def check(self, image: str, bootstrap: int, total: int) -> None:
        """Raise ImageError (one sentence: the image, the size, the cap, how to raise it)."""
        if bootstrap > self.max_bootstrap:
            msg = (f"image {image} is refused: its bootstrap is {bootstrap} bytes, above the "
                   f"cap of {self.max_bootstrap} (raise max_bootstrap in the configuration or "
                   "pass --max-bootstrap if this image is trusted)")
            raise ImageError(msg)
        if total > self.max_image:
            msg = (f"image {image} is refused: it declares {total} bytes in all, above the "
                   f"cap of {self.max_image} (raise max_image in the configuration or pass "
                   "--max-image if this image is trusted)")
            raise ImageError(msg)
