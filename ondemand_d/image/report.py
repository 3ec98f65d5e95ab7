# SPDX-License-Identifier: Apache-2.0
"""What a build did, for people (one summary line) and machines (JSON)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":  # noqa: PLR2004
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # unreachable


@dataclass(slots=True)
class BuildReport:
    """Counters of one build; `blobs` lists the data blobs in device-slot order.

    `chunks_*` count the image's chunk-index entries (EROFS extents of file data, the unit of
    dedup); `new_blob_chunks` counts the store's verified chunks of the new blob, the unit
    `ls` shows and the daemon fetches. The summary calls the first "extents" and the second
    "chunks", so that a word means one thing across commands.
    """

    name: str
    bootstrap: str = ""
    new_blob: str | None = None
    blobs: list[str] = field(default_factory=list)
    inodes: int = 0
    files: int = 0
    bytes: int = 0
    inline_files: int = 0
    chunks_total: int = 0
    chunks_new: int = 0
    chunks_reused: int = 0
    holes: int = 0
    zero_chunks: int = 0
    bytes_new: int = 0
    bytes_saved: int = 0
    bootstrap_bytes: int = 0
    new_blob_bytes: int = 0
    new_blob_chunks: int = 0
    xattrs_dropped: int = 0
    seconds: float = 0.0

    @property
    def blobs_reused(self) -> int:
        return sum(1 for b in self.blobs if b != self.new_blob)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["blobs_reused"] = self.blobs_reused
        out["seconds"] = round(self.seconds, 3)
        return out

    def summary(self) -> str:
        """One line saying what the build did."""
        new = (
            f"1 new data blob {self.new_blob[:12]} ({human_bytes(self.new_blob_bytes)} in "
            f"{self.new_blob_chunks} chunks)"
            if self.new_blob
            else "no new data blob"
        )
        return (
            f"built image {self.name!r}: {self.files} files, {human_bytes(self.bytes)}; "
            f"extents {self.chunks_total} total, {self.chunks_new} new, {self.chunks_reused} "
            f"reused ({human_bytes(self.bytes_saved)} saved), {self.holes} holes, "
            f"{self.zero_chunks} zero-extent refs; {new}, "
            f"{self.blobs_reused} existing blob(s) referenced; "
            f"bootstrap {self.bootstrap[:12]} ({human_bytes(self.bootstrap_bytes)}) "
            f"in {self.seconds:.1f}s"
        )
