# SPDX-License-Identifier: Apache-2.0
"""Which registry a remote blob is fetched from: the location of the image that reads it.

One content id can be added by many images from many registries. Each image
names its own Location per remote blob (``Image.extra["locations"]``), and a
fetch on an image's behalf uses that image's location only, never another
image's: falling back to another tenant's registry would tell that registry
what this image reads, and let it stall the read. A blob is shared by the
images of one domain (fscache: one object per domain; fanotify: one file per
domain), so it is located for the image that opened it first (mount order):
images in one share domain share that image's registry, as they share the
page cache. Put images that do not trust each other in different domains.

Images built or imported here name no location (``locations: {}``): they read
their chunks from this store only, even when `add` recorded the same blob first
with a registry; a chunk missing here is an error, not a fetch from that registry.
Images recorded before locations existed have no ``locations`` key at all: their
location is the one in the blob record (read as that image's, nothing is rewritten).
"""
from __future__ import annotations

from collections.abc import Iterable

from ondemand_d.errors import StoreError
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Image, Location, unlocated

LOCATIONS = "locations"  # the Image.extra key: {blob_id: location_id}


def local_only() -> dict[str, dict[str, str]]:
    """The Image.extra of an image built or imported here: it fetches from no registry."""
    return {LOCATIONS: {}}


def image_location(store: LocalStore, image: Image, blob: Blob) -> Blob:
    """`blob` as `image` fetches it: with the image's own location.

    Fails closed: a location record that is missing or damaged gives a blob
    whose remote chunks cannot be fetched (the reason is in its extra), not
    another image's location.
    """
    if not blob.is_remote:
        return blob
    names = image.extra.get(LOCATIONS)
    if names is None:  # recorded before locations: the blob record's location is the image's
        legacy = Location.of(blob)
        if legacy is None:
            return unlocated(blob, f"image {image.name!r} records no location for it")
        return legacy.apply(blob)
    location_id = names.get(blob.blob_id) if isinstance(names, dict) else None
    if not isinstance(location_id, str):
        if names == {} and "remote" not in image.extra:
            return unlocated(blob, f"image {image.name!r} was built or imported here and "
                             "reads only this store; the chunk is missing from it (fsck)")
        return unlocated(blob, f"image {image.name!r} records no location for it")
    try:
        return store.get_location(location_id).apply(blob)
    except StoreError as exc:
        return unlocated(blob, str(exc))


def locate(store: LocalStore, blob: Blob, images: Iterable[str]) -> Blob:
    """`blob` located for the first of `images` (names, in mount order) that uses it.

    When none of them does (say, a daemon restarted and the image that opened
    the blob has not been seen again), the blob is located only if every image
    that lists it agrees on one place; otherwise its remote chunks fail (EIO),
    rather than go to a registry no image of this mount chose.
    """
    if not blob.is_remote:
        return blob
    for name in images:
        try:
            image = store.get_image(name)
        except StoreError:
            continue
        if blob.blob_id in image.blob_ids:
            return image_location(store, image, blob)
    found: dict[tuple[str, str, tuple[object, ...]], Blob] = {}
    for image in store.images():
        if blob.blob_id in image.blob_ids:
            located = image_location(store, image, blob)
            found[_where(located)] = located
    if len(found) == 1:
        return next(iter(found.values()))
    reason = (f"{len(found)} images name different registries for it and none of them is "
              "known to have opened it" if found else "no image lists it")
    return unlocated(blob, reason)


def _where(blob: Blob) -> tuple[str, str, tuple[object, ...]]:
    remote = blob.extra.get("remote") or {}
    return (str(remote.get("registry", "")), str(remote.get("repository", "")),
            tuple(c.remote for c in blob.chunks))


def where(store: LocalStore, image: Image, blob: Blob) -> str:
    """Where `image` fetches `blob`'s missing chunks from, as `ls` and `status` show it.

    Returns:
        "<registry>/<repository>", "local" (this store only), or "none (<why>)".
    """
    if not blob.is_remote or (image.extra.get(LOCATIONS) == {} and "remote" not in image.extra):
        return "local"
    located = image_location(store, image, blob)
    remote = located.extra.get("remote")
    if isinstance(remote, dict):
        return f"{remote.get('registry')}/{remote.get('repository')}"
    return f"none ({located.extra.get('unlocated')})"


def remote_places(places: Iterable[str]) -> list[str]:
    """The registries/repositories among an image's blobs' places, each once, in order."""
    return list(dict.fromkeys(p for p in places if p != "local"))
