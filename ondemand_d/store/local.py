# SPDX-License-Identifier: Apache-2.0
"""The local store: records (records.py) plus the names that reach them.

Layout added to the records' (see records.py)::

    images/<name>.json          an image: bootstrap, device keys (replaced only by --replace)
    keys/<sha256(key)>/<image>  {"key", "image"}: image lists free device key `key`

Trust: a cookie key resolves as a blob id (which commits to the content), as
an image name (its bootstrap), or as a free device key through the images
that list it. An image whose name is another's device key, or whose device
key is another's name or names other content there, is refused: nothing an
image brings can rebind what another image's keys name. Images may share a
device key for the same blob (two mkfs.erofs imports of one data blob in a
share domain). An image record is the commit point of import, build and add.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ondemand_d.errors import StoreError, UnknownName
from ondemand_d.store import durable
from ondemand_d.store.lease import Lease, gc_lock
from ondemand_d.store.model import Blob, Image, check_key, check_name, is_content_id
from ondemand_d.store.records import DEFAULT_CHUNK_SIZE, FORMAT, RecordStore, _dumps, _load

__all__ = ["DEFAULT_CHUNK_SIZE", "FORMAT", "Damaged", "LocalStore"]
log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Damaged:
    """A record that could not be read: the file and what is wrong with it."""

    path: Path
    error: str


class LocalStore(RecordStore):
    """Chunks, blobs, images and device keys under one directory."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self._lease: Lease | None = None
        super().__init__(root, create=create)

    # -- images and keys --------------------------------------------------------

    def _image_path(self, name: str) -> Path:
        return self.root / "images" / f"{check_name(name)}.json"

    def _key_dir(self, key: str) -> Path:
        return self.root / "keys" / hashlib.sha256(key.encode()).hexdigest()

    def key_users(self, key: str) -> list[Image]:
        """The images whose current record lists free device key `key` (readable ones)."""
        users = []
        try:
            entries = sorted(os.listdir(self._key_dir(key)))
        except FileNotFoundError:
            return []
        for name in entries:
            try:
                image = self.get_image(name)
            except StoreError:
                continue  # gone, or damaged: answers for nothing
            if any(k == key for k, _ in image.devices):
                users.append(image)
        return users

    def resolve(self, key: bytes) -> Blob:
        """Map a cookie key from the kernel to its blob.

        A key with the form of a blob id names that blob: the id commits to its
        content. An image's name gives its bootstrap. Any other key is a device
        key, and resolves through the images that list it, which all agree on
        its blob (put_image refuses an image that would disagree).

        Raises:
            BadKey: the key is not acceptable as a lookup key.
            UnknownName: nothing is registered under it.
            StoreError: a record on the way is damaged.
        """
        text = check_key(key)
        if is_content_id(text):
            return self.get_blob(text)
        if self.has_image(text):
            return self.get_blob(self.get_image(text).bootstrap)
        for image in self.key_users(text):
            blob_id = image.blob_for(text)
            if blob_id is not None:
                return self.get_blob(blob_id)
        msg = f"no image or blob is registered under {text!r}"
        raise UnknownName(msg)

    def open_blob(self, key: bytes) -> Blob:
        """resolve() for the daemon's OPEN: the blob is in this process's lease before
        gc can judge it (see lease.py); `lease_settled` ends the OPEN."""
        with gc_lock(self.root, exclusive=False):
            blob = self.resolve(key)
            self.lease.begin(blob.blob_id)
        return blob

    def lease_settled(self, blob_id: str | None, open_blobs: set[str]) -> None:
        """An OPEN was answered; `open_blobs` are the blobs of every open object now."""
        self.lease.settle(blob_id, open_blobs)

    def keep_open(self, open_blobs: set[str]) -> None:
        """Objects closed: the lease now covers only `open_blobs` (and OPENs in progress)."""
        self.lease.keep(open_blobs)

    @property
    def lease(self) -> Lease:
        if self._lease is None:
            self._lease = Lease(self.root)
        return self._lease

    def _check_keys(self, image: Image) -> None:
        """Refuse an image whose name or free device keys would answer for another image's."""
        for name in self.key_user_names(image.name):
            msg = (
                f"{image.name!r} is already a device key of image {name!r}; an image name "
                "cannot also be another image's device key (pick another name)"
            )
            raise StoreError(msg)
        for key, blob_id in image.devices:
            if is_content_id(key):
                continue
            if self.has_image(key):
                msg = (
                    f"device key {key!r} is already the name of image {key!r}; give this "
                    "blob another key (--blob PATH=KEY)"
                )
                raise StoreError(msg)
            for other in self.key_users(key):
                if other.name != image.name and other.blob_for(key) != blob_id:
                    msg = (
                        f"device key {key!r} already names another blob, of image "
                        f"{other.name!r}; give this blob another key (--blob PATH=KEY), or "
                        "remove that image"
                    )
                    raise StoreError(msg)

    @staticmethod
    def load_record(path: Path) -> dict[str, Any]:
        """A JSON record; StoreError if damaged, FileNotFoundError if absent."""
        return _load(path)

    def key_entry_key(self, entry: Path) -> str | None:
        """The key a keys/ entry file is for, or None if the entry is damaged or misplaced."""
        try:
            key = str(_load(entry)["key"])
        except (OSError, StoreError, KeyError):
            return None
        return key if self._key_dir(key) == entry.parent else None

    def key_user_names(self, key: str) -> list[str]:
        """Names of the images other than `key` itself that list `key` as a device key."""
        return [i.name for i in self.key_users(key) if i.name != key]

    def put_image(self, image: Image, *, replace: bool = False) -> None:
        """Register an image (see _put_image); takes the writer lock unless in a transaction."""
        if self._undo is not None:
            self._put_image(image, replace=replace)
            return
        with self.writer_lock():
            self._put_image(image, replace=replace)

    def _put_image(self, image: Image, *, replace: bool) -> None:
        """Register an image: its key entries first, then its record (the commit point).

        Callers hold the writer lock (transaction), so the checks and the writes
        are one step for every other writer. A key entry answers nothing until
        a record listing the key exists, and the record is written only once
        every blob it needs is durable. With `replace`, the old record stays
        whole until the new one replaces it.
        """
        path = self._image_path(image.name)
        for blob_id in image.blob_ids:
            self.get_blob(blob_id)  # present and sound
        old: Image | None = None
        if path.exists():
            if not replace:
                msg = f"an image named {image.name!r} exists; pass --replace or pick another name"
                raise StoreError(msg)
            with contextlib.suppress(StoreError):
                old = self.get_image(image.name)
        self._check_keys(image)
        for key in image.owned_keys[1:]:
            entry = self._key_dir(key) / image.name
            if not entry.exists():
                entry.parent.mkdir(exist_ok=True)
                self._write_record(entry, _dumps({"key": key, "image": image.name}))
        self._make_durable()
        self._write(path, _dumps(image.to_json()), mode=0o644, sync=True)  # the commit
        if self._undo is not None:
            self._undo.paths.clear()  # committed: nothing after this point is taken back
        try:
            durable.fsync_dir(path.parent)
        except OSError as exc:  # the image is in place; a power loss now could only undo it
            log.warning("image_not_durable", image=image.name, error=str(exc))
        if old is not None:
            self._release(image.name, set(old.owned_keys[1:]) - set(image.owned_keys[1:]))

    def _release(self, name: str, keys: set[str] | tuple[str, ...]) -> None:
        """Drop image `name`'s key entries for `keys` (after its record stopped listing them)."""
        for key in keys:
            with contextlib.suppress(OSError):
                durable.unlink(self._key_dir(key) / name)
                with contextlib.suppress(OSError):
                    self._key_dir(key).rmdir()

    def get_image(self, name: str) -> Image:
        """Raises UnknownName if there is no such image, StoreError if its record is damaged."""
        path = self._image_path(name)
        try:
            image = Image.from_json(_load(path))
        except FileNotFoundError:
            raise UnknownName(f"no image named {name!r} in {self.root}") from None
        if image.name != name:
            msg = f"{path} holds image {image.name!r}"
            raise StoreError(msg)
        return image

    def has_image(self, name: str) -> bool:
        """Whether `name` is an image's name (so its blob is a bootstrap)."""
        try:
            return self._image_path(name).exists()
        except StoreError:
            return False

    def scan_images(self) -> tuple[list[Image], list[Damaged]]:
        """Every readable image, and the records that could not be read."""
        good: list[Image] = []
        bad: list[Damaged] = []
        for path in sorted((self.root / "images").glob("*.json")):
            try:
                good.append(self.get_image(path.stem))
            except (StoreError, OSError) as exc:
                bad.append(Damaged(path, str(exc)))
        return good, bad

    def images(self) -> Iterator[Image]:
        """Every readable image (see scan_images for the damaged ones)."""
        yield from self.scan_images()[0]

    def remove_image(self, name: str) -> Image | None:
        """Unregister image `name` (its blobs stay until gc); return its record if readable."""
        path = self._image_path(name)
        if not path.exists():
            raise UnknownName(f"no image named {name!r} in {self.root}")
        image = None
        with contextlib.suppress(StoreError):
            image = self.get_image(name)
        durable.unlink(path)
        durable.fsync_dir(path.parent)
        if image is not None:
            self._release(name, image.owned_keys[1:])
        return image

