# SPDX-License-Identifier: Apache-2.0
"""Store records (chunks, blobs, images) and their JSON form. No I/O here.

A blob is what the kernel sees as one cache file: `size` bytes, covered without
gaps or overlap by chunks. Every chunk but the last starts and ends on a 4 KiB
boundary, so any chunk can be written to the anon fd on its own with direct I/O.
A chunk is named by the sha256 of its (uncompressed) bytes; where those bytes
live - the local chunk directory or a range of a registry blob - is the
chunk's source.

Identity follows content. A blob's id is `content_id(size, chunks)`, a digest
of its size and chunk table, checked whenever a Blob is made (from JSON, from a
registry's table, by the builder): the same id always means the same bytes,
since every chunk is verified against its digest before use. Where chunks can
be fetched from (remote ranges, registry) is not part of the identity: it can
change how a blob is fetched, never what it reads.

Three kinds of names reach the store and cannot be confused: a blob id (64
lowercase hex, a content id), an image name (never 64 hex), and a device key
(a content id equal to its own blob's id, or a free name that the store lets
one image own at a time).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ondemand_d.errors import BadKey, StoreError

PAGE = 4096
#: cachefiles BUG()s on keys over 252 bytes; EROFS device tags are at most 64.
MAX_KEY_BYTES = 240
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Names a person gives images: printable, no path separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=-]{0,127}")


def check_digest(digest: str) -> str:
    """Return `digest` if it is 64 lowercase hex characters, else raise StoreError."""
    if not _HEX64.fullmatch(digest):
        msg = f"not a sha256 hex digest: {digest!r}"
        raise StoreError(msg)
    return digest


def is_content_id(text: str) -> bool:
    """Whether `text` has the form of a blob id (64 lowercase hex characters)."""
    return _HEX64.fullmatch(text) is not None


def content_id(size: int, chunks: tuple[Chunk, ...] | list[Chunk]) -> str:
    """The blob id that commits to `size` and every chunk's offset, length and digest."""
    h = hashlib.sha256(b"ondemand-d blob 1\n%d\n" % size)
    for c in chunks:
        h.update(b"%d %d %s\n" % (c.offset, c.length, c.digest.encode()))
    return h.hexdigest()


def check_key(key: bytes) -> str:
    """Validate a cookie key from the kernel; return it as text.

    A key is only ever a lookup key. Anything that could be mistaken for a
    path or that the kernel itself would choke on is refused.

    Raises:
        BadKey: empty, too long, not UTF-8, NUL or control bytes, a slash,
            or a leading dot.
    """
    if not key or len(key) > MAX_KEY_BYTES:
        msg = f"cookie key of {len(key)} bytes (allowed 1..{MAX_KEY_BYTES})"
        raise BadKey(msg)
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        msg = "cookie key is not UTF-8"
        raise BadKey(msg) from None
    if any(c < 0x21 or c == 0x7F for c in key) or "/" in text or "\\" in text:
        msg = f"cookie key {text!r} has a slash, NUL, space or control byte"
        raise BadKey(msg)
    if text.startswith("."):
        msg = f"cookie key {text!r} starts with a dot"
        raise BadKey(msg)
    return text


def check_name(name: str) -> str:
    """Validate an image name a person chose (it doubles as the fsid)."""
    if not _NAME.fullmatch(name) or len(name.encode()) > MAX_KEY_BYTES:
        msg = (
            f"bad image name {name!r}: use 1-128 of A-Z a-z 0-9 _ . : @ + = -, "
            "not starting with '.' or '-'"
        )
        raise StoreError(msg)
    if is_content_id(name):
        msg = f"bad image name {name!r}: 64 hex characters are reserved for blob ids"
        raise StoreError(msg)
    return name


@dataclass(frozen=True, slots=True)
class RemoteRange:
    """Where a chunk's bytes sit in a registry blob (possibly compressed).

    `registry` and `repository` are set in memory when a blob is located for an
    image (Location.apply), never written: they tell concurrent fetches of one
    digest from different places apart, so no READ waits on another image's registry.
    """

    blob: str  # registry blob digest, "sha256:<hex>"
    offset: int
    length: int
    compression: str = "none"  # "none" | "zstd"
    registry: str = ""
    repository: str = ""

    def to_json(self) -> list[Any]:
        return [self.blob, self.offset, self.length, self.compression]

    @classmethod
    def from_json(cls, raw: list[Any]) -> RemoteRange:
        return cls(str(raw[0]), int(raw[1]), int(raw[2]), str(raw[3]))


@dataclass(frozen=True, slots=True)
class Chunk:
    """`length` bytes at `offset` of a blob whose sha256 is `digest`."""

    offset: int
    length: int
    digest: str
    remote: RemoteRange | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_json(self) -> list[Any]:
        row: list[Any] = [self.offset, self.length, self.digest]
        if self.remote is not None:
            row.append(self.remote.to_json())
        return row

    @classmethod
    def from_json(cls, raw: list[Any]) -> Chunk:
        remote = RemoteRange.from_json(raw[3]) if len(raw) > 3 else None  # noqa: PLR2004
        return cls(int(raw[0]), int(raw[1]), check_digest(str(raw[2])), remote)


@dataclass(frozen=True, slots=True)
class Blob:
    """One cache file's worth of bytes, described by its chunk table.

    `blob_id` is `content_id(size, chunks)`: 64 hex characters, so it fits an
    EROFS device tag and is a valid cookie key; a Blob whose id does not match
    its table cannot be made. `extra` carries where a remote blob is fetched
    from (``{"remote": {"registry", "repository"}}``), round-tripped untouched
    and, like the remote ranges, not part of the identity. In a blob record
    these are the first adder's; the daemon fetches through the Location of
    the image that reads the blob instead (Location.apply gives that Blob).
    """

    blob_id: str
    size: int
    chunks: tuple[Chunk, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    _starts: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_digest(self.blob_id)
        pos = 0
        for i, c in enumerate(self.chunks):
            last = i == len(self.chunks) - 1
            if c.offset != pos or c.length <= 0:
                msg = f"blob {self.blob_id}: chunk {i} at {c.offset} leaves a gap or overlap"
                raise StoreError(msg)
            if c.offset % PAGE or (not last and c.length % PAGE):
                msg = f"blob {self.blob_id}: chunk {i} is not 4 KiB aligned"
                raise StoreError(msg)
            pos = c.end
        if pos != self.size:
            msg = f"blob {self.blob_id}: chunks cover {pos} bytes, size says {self.size}"
            raise StoreError(msg)
        if content_id(self.size, self.chunks) != self.blob_id:
            msg = f"blob {self.blob_id}: the id does not match its chunk table"
            raise StoreError(msg)
        object.__setattr__(self, "_starts", tuple(c.offset for c in self.chunks))

    @classmethod
    def of(cls, chunks: tuple[Chunk, ...], extra: dict[str, Any] | None = None) -> Blob:
        """The blob made of `chunks` (contiguous from 0), with the id its content gives it."""
        size = chunks[-1].end if chunks else 0
        return cls(content_id(size, chunks), size, chunks, dict(extra or {}))

    def chunks_for(self, offset: int, length: int) -> tuple[Chunk, ...]:
        """The chunks that hold any byte of [offset, offset+length), clipped to the blob."""
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return ()
        first = bisect.bisect_right(self._starts, offset) - 1
        last = bisect.bisect_left(self._starts, end)
        return self.chunks[max(first, 0) : last]

    @property
    def is_remote(self) -> bool:
        return any(c.remote is not None for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {
            "blob_id": self.blob_id,
            "size": self.size,
            "chunks": [c.to_json() for c in self.chunks],
            **self.extra,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Blob:
        """Parse a blob record. Raises StoreError for any malformed or inconsistent record."""
        try:
            extra = {k: v for k, v in raw.items() if k not in {"blob_id", "size", "chunks"}}
            return cls(
                check_digest(str(raw["blob_id"])),
                int(raw["size"]),
                tuple(Chunk.from_json(c) for c in raw["chunks"]),
                extra,
            )
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
            msg = f"blob record is malformed: {exc!r}"
            raise StoreError(msg) from None


@dataclass(frozen=True, slots=True)
class Image:
    """A mountable image: its bootstrap (named by `fsid`) and its data blobs.

    `devices` lists, in device-slot order, the cookie key the kernel will use
    for each extra device (the slot tag, or the `device=` string) and the blob
    it names. A key that looks like a blob id must be that blob's id (it then
    commits to the content); any other key resolves through the images that
    list it, and the store refuses an image that would give it another blob.
    """

    name: str
    bootstrap: str
    devices: tuple[tuple[str, str], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_name(self.name)
        check_digest(self.bootstrap)
        seen = {self.name}
        for key, blob_id in self.devices:
            check_key(key.encode())
            check_digest(blob_id)
            if is_content_id(key) and key != blob_id:
                msg = (
                    f"image {self.name}: device key {key} has the form of a blob id but names "
                    f"blob {blob_id}; a 64-hex key must be its own blob's id"
                )
                raise StoreError(msg)
            if key in seen and not is_content_id(key):
                msg = f"image {self.name}: key {key!r} is used twice (name or device key)"
                raise StoreError(msg)
            seen.add(key)

    @property
    def blob_ids(self) -> tuple[str, ...]:
        return (self.bootstrap, *(b for _, b in self.devices))

    @property
    def owned_keys(self) -> tuple[str, ...]:
        """The cookie keys this image answers for that do not commit to content (name first)."""
        return (self.name, *(k for k, _ in self.devices if not is_content_id(k)))

    def blob_for(self, key: str) -> str | None:
        """The blob the kernel's cookie `key` names in this image, if any."""
        if key == self.name:
            return self.bootstrap
        return next((b for k, b in self.devices if k == key), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bootstrap": self.bootstrap,
            "devices": [list(d) for d in self.devices],
            **self.extra,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Image:
        """Parse an image record. Raises StoreError for any malformed record."""
        try:
            extra = {k: v for k, v in raw.items() if k not in {"name", "bootstrap", "devices"}}
            return cls(
                str(raw["name"]),
                str(raw["bootstrap"]),
                tuple((str(k), str(b)) for k, b in raw["devices"]),
                extra,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"image record is malformed: {exc!r}"
            raise StoreError(msg) from None


@dataclass(frozen=True, slots=True)
class Location:
    """Where one image fetches one blob: a registry, a repository, and a range per chunk.

    Written as a record named by `location_id` (the sha256 of its JSON), so like a
    blob record it has one meaning forever; an image names its locations in its own
    record (``extra["locations"] = {blob_id: location_id}``).
    """

    blob_id: str
    registry: str
    repository: str
    ranges: tuple[RemoteRange, ...]

    def __post_init__(self) -> None:
        check_digest(self.blob_id)
        if not self.registry or not self.repository or not self.ranges:
            msg = f"location of blob {self.blob_id} names no registry, repository or range"
            raise StoreError(msg)

    @classmethod
    def of(cls, blob: Blob) -> Location | None:
        """The location a remote Blob carries (its chunks' ranges, its extra["remote"])."""
        remote = blob.extra.get("remote")
        if not blob.is_remote or not isinstance(remote, dict):
            return None
        ranges = tuple(c.remote for c in blob.chunks)
        if any(r is None for r in ranges) or not {"registry", "repository"} <= remote.keys():
            return None
        return cls(blob.blob_id, str(remote["registry"]), str(remote["repository"]),
                   tuple(RemoteRange(r.blob, r.offset, r.length, r.compression)
                         for r in ranges if r is not None))

    @property
    def location_id(self) -> str:
        return hashlib.sha256(self.dumps()).hexdigest()

    def dumps(self) -> bytes:
        """The record's bytes (canonical: its name is their sha256)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def apply(self, blob: Blob) -> Blob:
        """`blob` with this location's ranges and registry: what a fetch for this image uses.

        Raises:
            StoreError: the location is for another blob or another chunk table.
        """
        if blob.blob_id != self.blob_id or len(blob.chunks) != len(self.ranges):
            msg = f"location of blob {self.blob_id} does not fit blob {blob.blob_id}"
            raise StoreError(msg)
        chunks = tuple(
            Chunk(c.offset, c.length, c.digest,
                  RemoteRange(r.blob, r.offset, r.length, r.compression,
                              self.registry, self.repository))
            for c, r in zip(blob.chunks, self.ranges, strict=True))
        extra = {k: v for k, v in blob.extra.items() if k != "remote"}
        extra["remote"] = {"registry": self.registry, "repository": self.repository}
        return Blob(blob.blob_id, blob.size, chunks, extra)

    def to_json(self) -> dict[str, Any]:
        return {
            "blob_id": self.blob_id,
            "registry": self.registry,
            "repository": self.repository,
            "ranges": [r.to_json() for r in self.ranges],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Location:
        """Parse a location record. Raises StoreError for any malformed record."""
        try:
            return cls(
                check_digest(str(raw["blob_id"])),
                str(raw["registry"]),
                str(raw["repository"]),
                tuple(RemoteRange.from_json(r) for r in raw["ranges"]),
            )
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
            msg = f"location record is malformed: {exc!r}"
            raise StoreError(msg) from None


def unlocated(blob: Blob, reason: str) -> Blob:
    """`blob` with no registry to fetch from: its remote chunks fail with `reason` (fail closed)."""
    chunks = tuple(
        c if c.remote is None else Chunk(
            c.offset, c.length, c.digest,
            RemoteRange(c.remote.blob, c.remote.offset, c.remote.length, c.remote.compression,
                        "", f"unlocated:{blob.blob_id}"))
        for c in blob.chunks)
    extra = {k: v for k, v in blob.extra.items() if k != "remote"}
    extra["unlocated"] = reason
    return Blob(blob.blob_id, blob.size, chunks, extra)
