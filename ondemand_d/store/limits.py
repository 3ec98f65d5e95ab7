# SPDX-License-Identifier: Apache-2.0
"""Caps on what an image may bring: a chunk is read, verified and written whole per READ.

A registry table could otherwise declare a 1 GiB chunk, and one 4 KiB READ
would then cost 1 GiB of memory and a 1 GiB cache write.
"""
from __future__ import annotations

from ondemand_d.errors import StoreError
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
