# SPDX-License-Identifier: Apache-2.0
"""Content-addressed store: chunks by sha256, blobs as chunk tables, a name index."""
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk, Image, RemoteRange

__all__ = ["Blob", "Chunk", "Image", "LocalStore", "RemoteRange"]
