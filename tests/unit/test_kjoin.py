# SPDX-License-Identifier: Apache-2.0
"""kjoin: trace_pipe lines in the kernel's TP_printk formats, joined to daemon lines."""
from __future__ import annotations

from typing import Any

from ondemand_d.control.kjoin import JOIN_WAIT, Joiner, parse, table_row

# Lines as trace_pipe prints them (include/trace/events/cachefiles.h, Linux 6.12): `read`,
# `open` and `close` are traced before the kernel fills in msg_id and object_id (mid=0 oid=0).
READ = "  kworker/u8:1-40  [001] .....  100.000000: cachefiles_ondemand_read: o=0000002a mid=0 oid=0 s=100000 l=1000"
OPEN = "  python3-120  [000] .....  99.000000: cachefiles_ondemand_open: o=0000002a mid=0 oid=0 fd=12 f=0"


def trace(j: Joiner, ts: float, event: str, args: str) -> None:
    """Feed `j` one trace_pipe line of `event` at `ts`."""
    ev = parse(f"  python3-120  [000] .....  {ts:.6f}: cachefiles_ondemand_{event}: {args}")
    assert ev is not None
    j.kernel(ev)


def read_line(msg_id: int, object_id: int, off: int, length: int, *, mono: float,
              duration_ms: float, outcome: str = "ok") -> dict[str, Any]:
    """The daemon's read_completed line, as `trace` receives it."""
    return {"event": "read_completed", "op": "READ", "msg_id": msg_id, "object_id": object_id,
            "off": off, "len": length, "chunks": 1, "duration_ms": duration_ms,
            "source": "local", "outcome": outcome, "mono": mono}


def open_line(msg_id: int, object_id: int, *, mono: float) -> dict[str, Any]:
    """The daemon's opened line."""
    return {"event": "opened", "op": "OPEN", "msg_id": msg_id, "object_id": object_id,
            "key": "img", "size": 0xE80000, "duration_ms": 1.5, "outcome": "ok", "mono": mono}


def by_msg(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {r["msg_id"]: r for r in rows}


def test_parse_fields_in_hex_and_fd_in_decimal() -> None:
    """Every field is hex except the anon fd, as TP_printk writes them."""
    assert parse(READ) == {"event": "read", "ts": 100.0, "o": 0x2A, "mid": 0, "oid": 0,
                           "s": 0x100000, "l": 0x1000}
    assert parse(OPEN) == {"event": "open", "ts": 99.0, "o": 0x2A, "mid": 0, "oid": 0,
                           "fd": 12, "f": 0}
    assert parse("# tracer: nop") is None


def test_read_row_splits_the_wait_into_phases() -> None:
    """A 6.12 read (mid=0 oid=0) joins its READ through cread's debug id and the range."""
    j = Joiner()
    # Logged at 100.044 after 34 ms: the daemon took it at 100.010; completed at 100.045.
    # The line may reach `trace` before trace_pipe's events do.
    j.daemon(read_line(7, 3, 0x100000, 0x1000, mono=100.044, duration_ms=34.0))
    j.kernel(parse(READ))  # type: ignore[arg-type]
    trace(j, 100.030, "fd_write", "o=0000002a iB=5c s=100000 l=100000")
    assert list(j.ready(now=100.044)) == []  # not completed yet
    trace(j, 100.045, "cread", "o=0000002a mid=7")
    (row,) = j.ready(now=100.046)
    assert (row["op"], row["msg_id"], row["object_id"], row["debug_id"]) == ("READ", 7, 3, 0x2A)
    assert (row["off"], row["len"], row["source"], row["outcome"]) == (
        0x100000, 0x1000, "local", "ok")
    assert (row["queued_ms"], row["fetch_ms"], row["write_ms"], row["total_ms"]) == (
        10.0, 20.0, 15.0, 45.0)
    assert row["kernel_events"] == ["cread", "read"]
    assert table_row(row).split()[:5] == ["READ", "7", "3", "2a", str(0x100000)]
    assert list(j.ready(now=200, flush=True)) == []  # nothing left over, no msg 0 row


def test_concurrent_reads_on_one_object_join_by_range() -> None:
    """Two READs in flight on one object, completed out of order, each get their own read."""
    j = Joiner()
    trace(j, 100.000, "read", "o=0000002a mid=0 oid=0 s=0 l=40000")
    trace(j, 100.001, "read", "o=0000002a mid=0 oid=0 s=100000 l=40000")
    j.daemon(read_line(8, 3, 0x100000, 0x40000, mono=100.020, duration_ms=15.0))
    trace(j, 100.021, "cread", "o=0000002a mid=8")
    j.daemon(read_line(7, 3, 0, 0x40000, mono=100.030, duration_ms=25.0))
    trace(j, 100.031, "cread", "o=0000002a mid=7")
    rows = by_msg(list(j.ready(now=100.032)))
    assert rows.keys() == {7, 8}
    assert (rows[7]["off"], rows[7]["queued_ms"], rows[7]["total_ms"]) == (0, 5.0, 31.0)
    assert (rows[8]["off"], rows[8]["queued_ms"], rows[8]["total_ms"]) == (0x100000, 4.0, 20.0)
    assert rows[7]["kernel_events"] == rows[8]["kernel_events"] == ["cread", "read"]
    assert list(j.ready(now=200, flush=True)) == []


def test_same_range_twice_then_a_msg_id_again_after_a_restart() -> None:
    """Two READs of one range go to their msg_ids in order; a daemon restarted without
    restore binds a new cache that numbers from 0 again, so a second cread for msg 5 (on
    a new object) starts a new row instead of breaking the first."""
    j = Joiner()
    trace(j, 100.000, "read", "o=0000002a mid=0 oid=0 s=0 l=1000")
    trace(j, 100.002, "read", "o=0000002a mid=0 oid=0 s=0 l=1000")
    j.daemon(read_line(5, 3, 0, 0x1000, mono=100.010, duration_ms=8.0))
    trace(j, 100.011, "cread", "o=0000002a mid=5")
    j.daemon(read_line(6, 3, 0, 0x1000, mono=100.020, duration_ms=10.0))
    trace(j, 100.021, "cread", "o=0000002a mid=6")
    # The new daemon's cache: object 1 is debug id 2c, and its first READ is msg 5 again.
    trace(j, 105.000, "read", "o=0000002c mid=0 oid=0 s=0 l=1000")
    j.daemon(read_line(5, 1, 0, 0x1000, mono=105.010, duration_ms=6.0))
    trace(j, 105.011, "cread", "o=0000002c mid=5")
    rows = sorted(j.ready(now=105.012), key=lambda r: (r["debug_id"], r["msg_id"]))
    assert [(r["msg_id"], r["debug_id"], r["object_id"], r["total_ms"], r["queued_ms"])
            for r in rows] == [(5, 0x2A, 3, 11.0, 2.0), (6, 0x2A, 3, 19.0, 8.0),
                               (5, 0x2C, 1, 11.0, 4.0)]
    assert all(r["kernel_events"] == ["cread", "read"] for r in rows)
    assert list(j.ready(now=200, flush=True)) == []


def test_read_resent_after_restore_keeps_its_msg_id() -> None:
    """The held READ is not traced again when the successor takes it: its row queues from
    the first `read`; the reopened object's new object id maps through copen."""
    j = Joiner()
    trace(j, 100.000, "read", "o=0000002a mid=0 oid=0 s=0 l=40000")
    # The first daemon took msg 3 and was killed; the successor reopens the object (a new
    # OPEN, object id 4) and is re-sent msg 3.
    trace(j, 102.000, "fd_release", "o=0000002a oid=3")
    trace(j, 102.500, "open", "o=0000002a mid=0 oid=0 fd=7 f=0")
    j.daemon(open_line(9, 4, mono=102.502))
    trace(j, 102.503, "copen", "o=0000002a mid=9 l=e80000")
    j.daemon(read_line(3, 4, 0, 0x40000, mono=103.000, duration_ms=5.0))
    trace(j, 103.001, "cread", "o=0000002a mid=3")
    rows = by_msg(list(j.ready(now=103.002)))
    assert (rows[3]["debug_id"], rows[3]["object_id"], rows[3]["queued_ms"],
            rows[3]["total_ms"]) == (0x2A, 4, 2995.0, 3001.0)
    assert (rows[9]["op"], rows[9]["size"], rows[9]["total_ms"]) == ("OPEN", 0xE80000, 3.0)
    assert rows[9]["kernel_events"] == ["copen", "open"]


def test_reads_nobody_answered_are_shown_pending_with_their_range() -> None:
    """Unclaimed reads wait JOIN_WAIT, then each is its own pending row: no msg_id, its
    debug id, range and time queued so far; a flush shows the rest, once."""
    j = Joiner()
    trace(j, 100.000, "read", "o=0000002a mid=0 oid=0 s=0 l=40000")
    trace(j, 100.200, "read", "o=0000002b mid=0 oid=0 s=0 l=40000")
    trace(j, 100.500, "read", "o=0000002a mid=0 oid=0 s=200000 l=40000")
    assert list(j.ready(now=101.0)) == []
    rows = list(j.ready(now=100.3 + JOIN_WAIT))
    assert [(r["op"], r["msg_id"], r["debug_id"], r["off"], r["len"], r["outcome"],
             r["queued_ms"], r["total_ms"]) for r in rows] == [
        ("READ", None, 0x2A, 0, 0x40000, "pending", 2300.0, None),
        ("READ", None, 0x2B, 0, 0x40000, "pending", 2100.0, None)]
    assert table_row(rows[0]).split()[:5] == ["READ", "2a", "0", str(0x40000), "2300.0"]
    (last,) = j.ready(now=103.0, flush=True)
    assert (last["debug_id"], last["off"], last["queued_ms"]) == (0x2A, 0x200000, 2500.0)
    assert list(j.ready(now=104.0, flush=True)) == []


def test_hung_read_found_through_its_object_id_then_completed() -> None:
    """A READ the daemon logged as hung (no cread) finds its `read` through its object id,
    which copen and the OPEN line tie to the debug id on 6.12; its completion later still
    has the queued time."""
    j = Joiner()
    j.kernel(parse(OPEN))  # type: ignore[arg-type]
    j.daemon(open_line(1, 3, mono=99.002))
    trace(j, 99.003, "copen", "o=0000002a mid=1 l=e80000")
    trace(j, 100.000, "read", "o=0000002a mid=0 oid=0 s=0 l=40000")
    opened, pending = j.ready(now=102.5)
    assert (opened["op"], opened["msg_id"], opened["debug_id"], opened["object_id"],
            opened["size"], opened["total_ms"]) == ("OPEN", 1, 0x2A, 3, 0xE80000, 3.0)
    # The kernel-only row already knows the object id, from the same tie.
    assert (pending["msg_id"], pending["object_id"], pending["outcome"]) == (None, 3, "pending")
    j.daemon({"event": "read_hung", "op": "READ", "msg_id": 4, "object_id": 3, "off": 0,
              "len": 0x40000, "age_s": 29.99, "waits_on": "fetch", "hung": True,
              "mono": 130.0})
    (hung,) = j.ready(now=130.0 + JOIN_WAIT + 0.5)
    assert (hung["msg_id"], hung["debug_id"], hung["off"], hung["outcome"], hung["queued_ms"],
            hung["total_ms"], hung["kernel_events"]) == (4, 0x2A, 0, "pending", 10.0, None,
                                                         ["read"])
    j.daemon(read_line(4, 3, 0, 0x40000, mono=140.0, duration_ms=39990.0))
    trace(j, 140.001, "cread", "o=0000002a mid=4")
    (done,) = j.ready(now=140.002)
    assert (done["msg_id"], done["outcome"], done["queued_ms"], done["total_ms"],
            done["kernel_events"]) == (4, "ok", 10.0, 40001.0, ["cread", "read"])
    assert list(j.ready(now=200, flush=True)) == []


def test_kernel_6_3_to_6_7_events_carry_the_object_id() -> None:
    """Before 6.8, open, read and close print the real object id (read's mid is still 0):
    a READ logged but not completed joins through it, with or without an open event."""
    j = Joiner()
    trace(j, 99.000, "open", "o=0000002a mid=1 oid=3 fd=12 f=0")
    trace(j, 100.000, "read", "o=0000002a mid=0 oid=3 s=0 l=40000")
    trace(j, 100.100, "read", "o=0000002b mid=0 oid=4 s=100000 l=1000")
    trace(j, 100.200, "read", "o=0000002b mid=0 oid=4 s=200000 l=1000")
    j.daemon(read_line(7, 3, 0, 0x40000, mono=100.030, duration_ms=20.0))
    j.daemon(read_line(8, 4, 0x100000, 0x1000, mono=100.150, duration_ms=40.0))
    rows = by_msg(list(j.ready(now=100.2 + JOIN_WAIT + 0.1)))
    assert (rows[7]["debug_id"], rows[7]["queued_ms"], rows[7]["kernel_events"]) == (
        0x2A, 10.0, ["read"])
    assert (rows[8]["debug_id"], rows[8]["off"], rows[8]["queued_ms"]) == (0x2B, 0x100000, 10.0)
    assert (rows[None]["object_id"], rows[None]["off"], rows[None]["outcome"]) == (
        4, 0x200000, "pending")


def test_closes_join_by_debug_id_not_by_mid_0() -> None:
    """close events (mid=0 oid=0 on 6.12) neither merge nor land on the OPEN that really
    is msg 0; each joins its CLOSE line through the object id."""
    j = Joiner()
    for msg_id, oid, o, ts in ((0, 1, "2a", 99.0), (1, 2, "2b", 99.1)):
        trace(j, ts, "open", f"o=000000{o} mid=0 oid=0 fd={10 + oid} f=0")
        j.daemon(open_line(msg_id, oid, mono=ts + 0.002))
        trace(j, ts + 0.003, "copen", f"o=000000{o} mid={msg_id:x} l=e80000")
    trace(j, 110.0, "close", "o=0000002a mid=0 oid=0")
    trace(j, 110.1, "close", "o=0000002b mid=0 oid=0")
    for msg_id, oid, ts in ((2, 1, 110.05), (3, 2, 110.15)):
        j.daemon({"event": "closed", "op": "CLOSE", "msg_id": msg_id, "object_id": oid,
                  "mono": ts})
    trace(j, 110.2, "fd_release", "o=0000002a oid=1")
    rows = by_msg(list(j.ready(now=110.3)))
    assert [(m, r["op"], r["debug_id"], r["kernel_events"]) for m, r in sorted(rows.items())] == [
        (0, "OPEN", 0x2A, ["copen", "open"]), (1, "OPEN", 0x2B, ["copen", "open"]),
        (2, "CLOSE", 0x2A, ["close"]), (3, "CLOSE", 0x2B, ["close"])]
    assert list(j.ready(now=200, flush=True)) == []
