# SPDX-License-Identifier: Apache-2.0
"""protocol.py: scripted events in, actions out."""
from __future__ import annotations

import errno

from ondemand_d import protocol as p
from ondemand_d.wire import CloseRequest, OpenRequest, ReadRequest

BLOB = "a" * 64


def _opened(objs: p.Objects, object_id: int = 1, fd: int = 10, msg_id: int = 1,
            source: str = "local") -> None:
    assert objs.open(OpenRequest(msg_id, object_id, b"erofs,d", b"img", fd, 0)) == [
        p.Lookup(msg_id, object_id, b"erofs,d", b"img")
    ]
    assert objs.looked_up(msg_id, BLOB, 8192, source=source) == [p.Copen(msg_id, 8192)]


def test_open_success_with_prefill():
    objs = p.Objects()
    objs.open(OpenRequest(3, 1, b"erofs,d", b"img", 10, 0))
    assert objs.looked_up(3, BLOB, 4096, background="prefill") == [
        p.Copen(3, 4096), p.StartBackground(1, 10, BLOB, "prefill", 0, 4096)]


def test_open_failure_answers_and_closes_fd():
    objs = p.Objects()
    objs.open(OpenRequest(3, 1, b"erofs,d", b"nope", 10, 0))
    assert objs.looked_up(3, None, -errno.ENOENT, background="prefill") == [
        p.Copen(3, -errno.ENOENT), p.CloseFd(1, 10)
    ]
    assert len(objs) == 0
    (ignore,) = objs.read(ReadRequest(4, 1, 0, 4096))
    assert isinstance(ignore, p.Ignore) and ignore.reason.startswith("READ for an object")


def test_read_fill_then_done():
    objs = p.Objects()
    _opened(objs)
    assert objs.read(ReadRequest(5, 1, 0, 4096)) == [p.Fill(5, 1, 10, BLOB, 0, 4096)]
    assert objs.reads_in_flight == 1
    assert objs.fill_done(5, p.Filled(4096)) == []
    assert objs.reads_in_flight == 0


def test_failed_fill_is_completed_without_data_unless_told():
    objs = p.Objects()
    _opened(objs)
    objs.read(ReadRequest(5, 1, 0, 4096))
    objs.read(ReadRequest(6, 1, 0, 4096))
    assert objs.fill_done(5, p.Failed()) == [p.Complete(5, 1, 10)]
    assert objs.fill_done(6, p.Failed(completed=True)) == []


def test_duplicate_read_msg_id_is_ignored():
    objs = p.Objects()
    _opened(objs)
    objs.read(ReadRequest(5, 1, 0, 4096))
    assert isinstance(objs.read(ReadRequest(5, 1, 0, 4096))[0], p.Ignore)


def test_read_before_copen_is_completed_without_data():
    objs = p.Objects()
    objs.open(OpenRequest(3, 1, b"erofs,d", b"img", 10, 0))
    complete, _ = objs.read(ReadRequest(4, 1, 0, 4096))
    assert complete == p.Complete(4, 1, 10)


def test_close_defers_until_reads_finish():
    objs = p.Objects()
    _opened(objs)
    objs.read(ReadRequest(5, 1, 0, 4096))
    objs.read(ReadRequest(6, 1, 4096, 4096))
    assert objs.close(CloseRequest(7, 1)) == []
    assert objs.fill_done(5, p.Filled(4096)) == []
    assert objs.fill_done(6, p.Filled(8192)) == [p.CloseFd(1, 10)]
    assert len(objs) == 0


def test_close_without_reads_closes_now_and_unknown_close_is_ignored():
    objs = p.Objects()
    _opened(objs)
    assert objs.close(CloseRequest(7, 1)) == [p.CloseFd(1, 10)]
    assert isinstance(objs.close(CloseRequest(8, 1))[0], p.Ignore)


def test_reopen_after_failover_gets_new_object():
    objs = p.Objects()
    _opened(objs, object_id=1, fd=10)
    _opened(objs, object_id=2, fd=11, msg_id=2)
    assert objs.read(ReadRequest(9, 2, 0, 4096)) == [p.Fill(9, 2, 11, BLOB, 0, 4096)]


def test_second_open_of_an_object_closes_the_old_fd_after_its_reads():
    objs = p.Objects()
    _opened(objs, object_id=1, fd=10)
    objs.read(ReadRequest(5, 1, 0, 4096))
    assert objs.open(OpenRequest(6, 1, b"erofs,d", b"img", 11, 0)) == [
        p.Lookup(6, 1, b"erofs,d", b"img")]
    assert objs.looked_up(6, BLOB, 8192) == [p.Copen(6, 8192)]
    assert objs.fill_done(5, p.Filled(4096)) == [p.CloseFd(1, 10)]
    assert objs.read(ReadRequest(7, 1, 0, 4096)) == [p.Fill(7, 1, 11, BLOB, 0, 4096)]


def test_drain_closes_everything():
    objs = p.Objects()
    _opened(objs, 1, 10)
    _opened(objs, 2, 11, msg_id=2)
    assert sorted(a.fd for a in objs.drain() if isinstance(a, p.CloseFd)) == [10, 11]
    assert len(objs) == 0


def test_copen_refused_closes_fd():
    objs = p.Objects()
    objs.open(OpenRequest(3, 1, b"erofs,d", b"img", 10, 0))
    (copen,) = objs.looked_up(3, BLOB, 4096)
    assert (copen.object_id, copen.fd) == (1, 10)
    assert objs.copen_refused(1, 10) == [p.CloseFd(1, 10)]
    assert objs.copen_refused(1, 10) == []


def test_malformed_open_is_answered_and_closes_nothing():
    objs = p.Objects()
    assert objs.malformed(9, 3, is_open=True) == [p.Copen(9, -errno.EINVAL)]
    assert objs.malformed(None, 3, is_open=True) == []
    assert objs.malformed(9, 3, is_open=False) == []


def test_blob_ids_of_open_objects():
    objs = p.Objects()
    _opened(objs, 1, 10)
    assert objs.blob_ids() == {BLOB}
    objs.close(CloseRequest(7, 1))
    assert objs.blob_ids() == set()


def test_reads_beyond_a_sources_limit_wait_and_other_sources_go_on():
    objs = p.Objects(limit=2)
    _opened(objs, 1, 10, source="registry")
    _opened(objs, 2, 11, msg_id=2)
    assert len(objs.read(ReadRequest(20, 1, 0, 4096))) == 1
    assert len(objs.read(ReadRequest(21, 1, 0, 4096))) == 1
    assert objs.read(ReadRequest(22, 1, 0, 4096)) == []  # queued behind the registry's two
    assert objs.read(ReadRequest(23, 2, 0, 4096)) == [p.Fill(23, 2, 11, BLOB, 0, 4096)]
    assert objs.fill_done(20, p.Failed(completed=True)) == [p.Fill(22, 1, 10, BLOB, 0, 4096)]
    assert objs.accepting


def test_readahead_after_a_read_once_per_window():
    objs = p.Objects(readahead=8192)
    objs.open(OpenRequest(1, 1, b"erofs,d", b"img", 10, 0))
    objs.looked_up(1, BLOB, 65536)
    objs.read(ReadRequest(5, 1, 0, 4096))
    assert objs.fill_done(5, p.Filled(4096)) == [
        p.StartBackground(1, 10, BLOB, "readahead", 4096, 12288)]
    objs.read(ReadRequest(6, 1, 0, 4096))
    assert objs.fill_done(6, p.Filled(4096)) == []  # one background at a time
    assert objs.background_done(10, ok=True) == []
    objs.read(ReadRequest(7, 1, 4096, 4096))
    assert objs.fill_done(7, p.Filled(8192)) == [  # only what was not read ahead yet
        p.StartBackground(1, 10, BLOB, "readahead", 12288, 16384)]


def test_close_cancels_background_and_closes_after_it_ends():
    objs = p.Objects()
    objs.open(OpenRequest(1, 1, b"erofs,d", b"img", 10, 0))
    objs.looked_up(1, BLOB, 65536, background="prefetch")
    assert objs.close(CloseRequest(2, 1)) == [p.CancelBackground(1, 10)]
    assert objs.background_done(10, ok=False) == [p.CloseFd(1, 10)]
