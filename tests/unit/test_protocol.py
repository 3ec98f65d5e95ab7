# SPDX-License-Identifier: Apache-2.0
"""protocol.py: scripted requests in, actions out."""
from __future__ import annotations

import errno

from ondemand_d import protocol as p
from ondemand_d.wire import CloseRequest, OpenRequest, ReadRequest

BLOB = "a" * 64


def _opened(objs: p.Objects, object_id: int = 1, fd: int = 10) -> None:
    assert objs.handle(OpenRequest(1, object_id, b"erofs,d", b"img", fd, 0)) == [
        p.Lookup(1, object_id, b"erofs,d", b"img")
    ]
    assert objs.opened(1, object_id, BLOB, 8192, prefill=False) == [p.Copen(1, 8192)]


def test_open_success_with_prefill():
    objs = p.Objects()
    objs.handle(OpenRequest(3, 1, b"erofs,d", b"img", 10, 0))
    assert objs.opened(3, 1, BLOB, 4096, prefill=True) == [p.Copen(3, 4096), p.Prefill(1, 10, BLOB)]


def test_open_failure_answers_and_closes_fd():
    objs = p.Objects()
    objs.handle(OpenRequest(3, 1, b"erofs,d", b"nope", 10, 0))
    assert objs.opened(3, 1, None, -errno.ENOENT, prefill=True) == [
        p.Copen(3, -errno.ENOENT), p.CloseFd(1, 10)
    ]
    assert len(objs) == 0
    assert objs.handle(ReadRequest(4, 1, 0, 4096))[0].reason.startswith("READ for an object")


def test_read_fill_then_done():
    objs = p.Objects()
    _opened(objs)
    assert objs.handle(ReadRequest(5, 1, 0, 4096)) == [p.Fill(5, 1, 10, BLOB, 0, 4096)]
    assert objs.reads_in_flight == 1
    assert objs.read_done(5) == []
    assert objs.reads_in_flight == 0


def test_duplicate_read_msg_id_is_ignored():
    objs = p.Objects()
    _opened(objs)
    objs.handle(ReadRequest(5, 1, 0, 4096))
    assert isinstance(objs.handle(ReadRequest(5, 1, 0, 4096))[0], p.Ignore)


def test_close_defers_until_reads_finish():
    objs = p.Objects()
    _opened(objs)
    objs.handle(ReadRequest(5, 1, 0, 4096))
    objs.handle(ReadRequest(6, 1, 4096, 4096))
    assert objs.handle(CloseRequest(7, 1)) == []
    assert objs.read_done(5) == []
    assert objs.read_done(6) == [p.CloseFd(1, 10)]
    assert len(objs) == 0


def test_close_without_reads_closes_now_and_unknown_close_is_ignored():
    objs = p.Objects()
    _opened(objs)
    assert objs.handle(CloseRequest(7, 1)) == [p.CloseFd(1, 10)]
    assert isinstance(objs.handle(CloseRequest(8, 1))[0], p.Ignore)


def test_reopen_after_failover_gets_new_object():
    objs = p.Objects()
    _opened(objs, object_id=1, fd=10)
    _opened(objs, object_id=2, fd=11)
    assert objs.handle(ReadRequest(9, 2, 0, 4096)) == [p.Fill(9, 2, 11, BLOB, 0, 4096)]


def test_drain_closes_everything():
    objs = p.Objects()
    _opened(objs, 1, 10)
    _opened(objs, 2, 11)
    assert sorted(a.fd for a in objs.drain()) == [10, 11]
    assert len(objs) == 0


def test_forget_after_refused_copen_closes_fd():
    objs = p.Objects()
    objs.handle(OpenRequest(3, 1, b"erofs,d", b"img", 10, 0))
    (copen,) = objs.opened(3, 1, BLOB, 4096, prefill=False)
    assert copen.object_id == 1
    assert objs.forget(1) == [p.CloseFd(1, 10)]
    assert objs.forget(1) == []


def test_blob_ids_of_open_objects():
    objs = p.Objects()
    _opened(objs, 1, 10)
    assert objs.blob_ids() == {BLOB}
    objs.handle(CloseRequest(7, 1))
    assert objs.blob_ids() == set()
