# SPDX-License-Identifier: Apache-2.0
"""The local store: chunking, names, key checks, persistence, atomic transactions."""
from __future__ import annotations

import os

import pytest

from ondemand_d.errors import BadKey, ChunkNotFound, DigestMismatch, StoreError, UnknownName
from ondemand_d.store import Blob, Chunk, Image, LocalStore
from ondemand_d.store.model import check_key, content_id


def test_ingest_chunks_and_reads_back(tmp_path):
    store = LocalStore(tmp_path / "s")
    data = os.urandom(2_500_000)
    (tmp_path / "f").write_bytes(data)
    blob = store.ingest_file(tmp_path / "f", 1 << 20)
    assert blob.blob_id == content_id(len(data), blob.chunks)
    assert [c.length for c in blob.chunks] == [1 << 20, 1 << 20, 2_500_000 - (2 << 20)]
    assert b"".join(store.read_chunk(c) for c in blob.chunks) == data


def test_identical_chunks_are_stored_once(tmp_path):
    store = LocalStore(tmp_path / "s")
    (tmp_path / "f").write_bytes(b"\0" * (4 << 20))
    blob = store.ingest_file(tmp_path / "f", 1 << 20)
    assert len({c.digest for c in blob.chunks}) == 1
    assert len(list((tmp_path / "s" / "chunks").rglob("*"))) == 2  # one dir, one chunk


def test_chunks_for():
    chunks = (Chunk(0, 8192, "a" * 64), Chunk(8192, 8192, "b" * 64), Chunk(16384, 100, "c" * 64))
    blob = Blob.of(chunks)
    assert blob.chunks_for(0, 1) == chunks[:1]
    assert blob.chunks_for(8191, 2) == chunks[:2]
    assert blob.chunks_for(16384, 4096) == chunks[2:]
    assert blob.chunks_for(20000, 4096) == ()
    assert blob.chunks_for(0, 1 << 30) == chunks


@pytest.mark.parametrize(
    "chunks",
    [
        (Chunk(0, 100, "a" * 64), Chunk(100, 100, "b" * 64)),  # unaligned middle
        (Chunk(0, 4096, "a" * 64), Chunk(8192, 100, "b" * 64)),  # gap
    ],
)
def test_blob_invariants(chunks):
    with pytest.raises(StoreError):
        Blob("d" * 64, chunks[-1].end, chunks)


def test_names_persist_and_resolve(tmp_path):
    store = LocalStore(tmp_path / "s")
    (tmp_path / "f").write_bytes(b"x" * 5000)
    blob = store.ingest_file(tmp_path / "f")
    store.put_image(Image("img", blob.blob_id, (("dev1", blob.blob_id),)))
    again = LocalStore(tmp_path / "s", create=False)
    assert again.resolve(b"img").blob_id == blob.blob_id
    assert again.resolve(b"dev1").blob_id == blob.blob_id
    assert again.resolve(blob.blob_id.encode()).blob_id == blob.blob_id  # a tag that is an id
    assert again.has_image("img") and not again.has_image("dev1")
    with pytest.raises(UnknownName):
        again.resolve(b"other")
    with pytest.raises(StoreError, match="exists"):
        again.put_image(Image("img", blob.blob_id))


@pytest.mark.parametrize("key", [b"", b"../x", b"/abs", b"a\0b", b"x" * 241, b"\xff", b".", b"a\nb"])
def test_bad_keys(key):
    with pytest.raises(BadKey):
        check_key(key)


@pytest.mark.damages_store
def test_missing_and_corrupt_chunks(tmp_path):
    store = LocalStore(tmp_path / "s")
    (tmp_path / "f").write_bytes(b"y" * 9000)
    blob = store.ingest_file(tmp_path / "f")
    path = store.chunk_path(blob.chunks[0].digest)
    path.chmod(0o644)
    path.write_bytes(b"z" * 9000)
    with pytest.raises(DigestMismatch):
        store.read_chunk(blob.chunks[0])
    path.unlink()
    with pytest.raises(ChunkNotFound):
        store.read_chunk(blob.chunks[0])


def test_failed_transaction_leaves_store_unchanged(tmp_path):
    store = LocalStore(tmp_path / "s")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*") if p.is_file())
    (tmp_path / "f").write_bytes(os.urandom(3 << 20))
    with pytest.raises(RuntimeError), store.transaction():
        store.ingest_file(tmp_path / "f")
        raise RuntimeError("boom")  # before the image record, the commit point
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*") if p.is_file()
                   and p.name != "lock")
    assert after == before
    with pytest.raises(UnknownName):
        store.resolve(b"img")


def test_a_format_1_store_is_refused_with_a_way_out(tmp_path):
    (tmp_path / "old" / "names").mkdir(parents=True)
    (tmp_path / "old" / "chunks").mkdir()
    with pytest.raises(StoreError, match="older ondemand-d.*create a new store"):
        LocalStore(tmp_path / "old")
    assert not (tmp_path / "old" / "format").exists()


@pytest.mark.damages_store
def test_read_chunk_into_an_aligned_buffer(tmp_path):
    """The fill path's read: straight into a pooled buffer, verified there, no bytes made."""
    from ondemand_d import _native

    s = LocalStore(tmp_path / "s")
    (tmp_path / "f").write_bytes(os.urandom(3 * 4096 + 100))
    blob = s.ingest_file(tmp_path / "f", chunk_size=8192)
    with _native.POOL.take(blob.size) as buf:
        for c in blob.chunks:
            s.read_chunk_into(c, buf, c.offset)
        assert buf[: blob.size] == (tmp_path / "f").read_bytes()
        first = blob.chunks[0]
        path = s.chunk_path(first.digest)
        os.chmod(path, 0o644)
        path.write_bytes(path.read_bytes() + b"x")  # grew by a byte
        with pytest.raises(DigestMismatch, match="more bytes"):
            s.read_chunk_into(first, buf)
        path.write_bytes(path.read_bytes()[:-2])  # now one byte short
        with pytest.raises(DigestMismatch, match="8191 bytes"):
            s.read_chunk_into(first, buf)
        path.write_bytes(b"y" * 8192)  # right length, wrong content
        with pytest.raises(DigestMismatch, match="hashes to"):
            s.read_chunk_into(first, buf)
        path.unlink()
        with pytest.raises(ChunkNotFound):
            s.read_chunk_into(first, buf)
        with pytest.raises(ValueError, match="do not fit"):
            s.read_chunk_into(blob.chunks[1], buf, len(buf) - 4096)
