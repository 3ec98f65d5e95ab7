# SPDX-License-Identifier: Apache-2.0
"""Nothing one image brings can change what another image reads (issue 10, section 1).

Each attack is run for real (build, import), and the victim's bytes are then
read back the way the kernel gets them: OPEN by cookie key and READ through
the daemon, from the fake kernel's cache file.
"""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from ondemand_d.errors import ImageError, StoreError, UnknownName
from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.tree import Node, directory, regular
from ondemand_d.importer import import_image
from ondemand_d.store.fsck import fsck
from ondemand_d.store.model import Blob, Chunk, Image

MiB = 1 << 20


async def _served(env, key: bytes) -> bytes:
    """OPEN `key` and READ all of it as the kernel would; the cache file's bytes."""
    obj = await env.kernel.open(key)
    assert obj.copen_result is not None and obj.copen_result > 0, (key, obj.copen_result)
    for off in range(0, obj.copen_result, MiB):
        assert await env.kernel.read(obj, off, min(MiB, obj.copen_result - off))
    data = env.kernel.cache_bytes(obj)[: obj.copen_result]
    return data


def _tree(seed: int) -> Node:
    root = directory(mtime_ns=10**18)
    root.children[b"big"] = regular(random.Random(seed).randbytes(3 * MiB), mtime_ns=10**18)
    return root


def _mkfs(tmp: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A mkfs.erofs metadata image and its --blobdev data blob."""
    src = tmp / f"{name}-src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(seed).randbytes(300_000))
    meta, blob = tmp / f"{name}.meta", tmp / f"{name}.blob"
    subprocess.run(["mkfs.erofs", "--chunksize=65536", f"--blobdev={blob}", str(meta), str(src)],
                   check=True, capture_output=True)
    return meta, blob


def _built_data(env, name: str) -> tuple[str, bytes]:
    """The data blob id (= the device tag the kernel sends) of built image `name`, and its bytes."""
    image = env.store.get_image(name)
    (tag, blob_id), = image.devices
    assert tag == blob_id
    blob = env.store.get_blob(blob_id)
    return blob_id, b"".join(env.store.read_chunk(c) for c in blob.chunks)


async def test_device_key_equal_to_another_images_blob_id_is_refused(env) -> None:
    """import --blob blob.img=<X's data blob id>: refused; X's device still serves X's bytes."""
    build_image(_tree(1), env.store, "X")
    victim_id, victim_bytes = _built_data(env, "X")
    meta, blob = _mkfs(env.tmp, "evil", 2)
    with pytest.raises(ImageError, match="form of a blob id"):
        import_image(env.store, "evil", meta, [(blob, victim_id)])
    assert not env.store.has_image("evil")
    assert await _served(env, victim_id.encode()) == victim_bytes
    assert await _served(env, b"X") == _blob_bytes(env, env.store.get_image("X").bootstrap)
    assert not fsck(env.store).problems  # the refused import left nothing damaged


async def test_image_named_like_a_device_key_is_refused_both_ways(env) -> None:
    """import --name A --blob blob.img=foo, then build --name foo: refused, A's 'foo' unchanged."""
    meta, blob = _mkfs(env.tmp, "a", 3)
    import_image(env.store, "A", meta, [(blob, "foo")])
    with pytest.raises(ImageError, match="'foo' is already a device key of image 'A'"):
        build_image(_tree(4), env.store, "foo")
    assert await _served(env, b"foo") == blob.read_bytes()
    # And the other order: an image called "bar" exists, an import wants "bar" as a key.
    build_image(_tree(5), env.store, "bar")
    bar_boot = _blob_bytes(env, env.store.get_image("bar").bootstrap)
    meta2, blob2 = _mkfs(env.tmp, "b", 6)
    with pytest.raises(StoreError, match="device key 'bar' is already the name of image 'bar'"):
        import_image(env.store, "B", meta2, [(blob2, "bar")])
    assert await _served(env, b"bar") == bar_boot
    with pytest.raises(UnknownName):
        env.store.get_image("B")
    assert not fsck(env.store).problems


async def test_two_images_with_the_same_device_key_second_is_refused(env) -> None:
    """Two mkfs.erofs imports both keyed 'blob.img' with different bytes: the second is refused."""
    meta1, blob1 = _mkfs(env.tmp, "one", 7)
    meta2, blob2 = _mkfs(env.tmp, "two", 8)
    import_image(env.store, "one", meta1, [(blob1, "blob.img")])
    with pytest.raises(StoreError, match="already names another blob, of image 'one'"):
        import_image(env.store, "two", meta2, [(blob2, "blob.img")])
    assert await _served(env, b"blob.img") == blob1.read_bytes()
    # The same key under --replace of its own image moves with the image.
    import_image(env.store, "one", meta2, [(blob2, "blob.img")], replace=True)
    assert await _served(env, b"blob.img") == blob2.read_bytes()
    assert not fsck(env.store).problems


async def test_images_may_share_a_device_key_for_the_same_blob(env) -> None:
    """The share-domain case: two metadata images, one data blob, one key; rm of one keeps it."""
    meta1, blob = _mkfs(env.tmp, "dom-a", 20)
    meta2 = env.tmp / "dom-b.meta"
    subprocess.run(["mkfs.erofs", "--chunksize=65536", "-U66666666-7777-8888-9999-000000000000",
                    f"--blobdev={env.tmp / 'dom-b.blob'}", str(meta2), str(env.tmp / "dom-a-src")],
                   check=True, capture_output=True)
    assert (env.tmp / "dom-b.blob").read_bytes() == blob.read_bytes()
    import_image(env.store, "dom-a", meta1, [(blob, "shared-data")])
    import_image(env.store, "dom-b", meta2, [(env.tmp / "dom-b.blob", "shared-data")])
    assert await _served(env, b"shared-data") == blob.read_bytes()
    env.store.remove_image("dom-a")
    assert await _served(env, b"shared-data") == blob.read_bytes()
    env.store.remove_image("dom-b")
    assert (await env.kernel.open(b"shared-data")).copen_result < 0  # nobody lists it now


async def test_names_with_the_form_of_a_blob_id_are_refused(env) -> None:
    build_image(_tree(9), env.store, "X")
    victim_id, victim_bytes = _built_data(env, "X")
    with pytest.raises(ImageError, match="reserved for blob ids"):
        build_image(_tree(10), env.store, victim_id)
    assert await _served(env, victim_id.encode()) == victim_bytes


@pytest.mark.damages_store
async def test_a_blob_record_cannot_claim_another_id(env) -> None:
    """A record whose id is not its content id is refused when made, and unreadable if planted."""
    build_image(_tree(11), env.store, "X")
    victim_id, victim_bytes = _built_data(env, "X")
    evil = env.store.ingest_file(_write(env.tmp / "e", random.Random(12).randbytes(MiB)))
    with pytest.raises(StoreError, match="does not match its chunk table"):
        Blob(victim_id, evil.size, evil.chunks)
    with pytest.raises(StoreError, match="does not match its chunk table"):
        Blob.from_json({**evil.to_json(), "blob_id": victim_id})
    # An existing record is never rewritten, even by a valid one of the same id.
    before = env.store.blob_path(victim_id).stat()
    env.store.put_blob(Blob(victim_id, len(victim_bytes), env.store.get_blob(victim_id).chunks,
                            {"remote": {"registry": "evil", "repository": "x"}}))
    after = env.store.blob_path(victim_id).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "remote" not in env.store.get_blob(victim_id).extra
    # A record planted on disk under the victim's id (bypassing the store) serves nothing wrong.
    planted = json.dumps({**evil.to_json(), "blob_id": victim_id})
    path = env.store.blob_path(victim_id)
    path.write_text(planted)
    env.store._blob_cache.clear()
    obj = await env.kernel.open(victim_id.encode())
    assert obj.copen_result is not None and obj.copen_result < 0  # an error, never evil's bytes


async def test_replace_cannot_take_keys_of_another_image(env) -> None:
    """--replace acts on one's own image: a key owned by another image stays with it."""
    meta, blob = _mkfs(env.tmp, "v", 13)
    import_image(env.store, "victim", meta, [(blob, "shared-key")])
    meta2, blob2 = _mkfs(env.tmp, "w", 14)
    import_image(env.store, "other", meta2, [(blob2, "own-key")])
    with pytest.raises(StoreError, match="already names another blob, of image 'victim'"):
        import_image(env.store, "other", meta2, [(blob2, "shared-key")], replace=True)
    assert await _served(env, b"shared-key") == blob.read_bytes()
    assert await _served(env, b"own-key") == blob2.read_bytes()  # the failed replace changed nothing


async def test_dedup_never_trusts_extents_outside_the_local_index(env) -> None:
    """A blob record carrying "extents" (as a registry table could) is no dedup source."""
    secret = random.Random(15).randbytes(2 * MiB)
    evil_bytes = random.Random(16).randbytes(2 * MiB)
    path = _write(env.tmp / "evil", evil_bytes)
    evil = env.store.ingest_file(path)
    digest = __import__("hashlib").sha256(secret).hexdigest()
    poisoned = Blob.of(evil.chunks, {"extents": [[digest, 0, len(secret)]]})
    env.store.blob_path(evil.blob_id).unlink()
    env.store.put_blob(poisoned)
    root = directory(mtime_ns=10**18)
    root.children[b"guessed"] = regular(secret, mtime_ns=10**18)
    report = build_image(root, env.store, "victim")
    assert report.chunks_reused == 0
    blob_id, data = _built_data(env, "victim")
    assert blob_id != evil.blob_id
    assert (await _served(env, blob_id.encode()))[: len(secret)] == secret


async def test_images_sharing_a_blob_by_content_read_the_same_bytes(env) -> None:
    """The domain case: two images whose tags are one blob id; rm-free, rebuild-free."""
    build_image(_tree(17), env.store, "v1")
    build_image(_tree(17), env.store, "v2", BuildOptions())
    (_, a), = env.store.get_image("v1").devices
    (_, b), = env.store.get_image("v2").devices
    assert a == b
    assert await _served(env, a.encode()) == _blob_bytes(env, a)


def test_image_records_check_their_keys() -> None:
    chunk = Chunk(0, 4096, "a" * 64)
    blob = Blob.of((chunk,))
    with pytest.raises(StoreError, match="form of a blob id"):
        Image("x", blob.blob_id, (("b" * 64, blob.blob_id),))
    with pytest.raises(StoreError, match="used twice"):
        Image("x", blob.blob_id, (("k", blob.blob_id), ("k", blob.blob_id)))
    with pytest.raises(StoreError, match="used twice"):
        Image("x", blob.blob_id, (("x", blob.blob_id),))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _blob_bytes(env, blob_id: str) -> bytes:
    blob = env.store.get_blob(blob_id)
    return b"".join(env.store.read_chunk(c) for c in blob.chunks)
