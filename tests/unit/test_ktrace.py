# SPDX-License-Identifier: Apache-2.0
"""ktrace: trace_pipe lines in the kernel's TP_printk formats, joined to daemon lines."""
from __future__ import annotations

from ondemand_d.control.ktrace import Joiner, parse

# Lines as trace_pipe prints them (include/trace/events/cachefiles.h, Linux 6.12).
READ = "  kworker/u8:1-40  [001] .....  100.000000: cachefiles_ondemand_read: o=0000002a mid=7 oid=3 s=100000 l=1000"
WRITE = "  python3-120  [000] .....  100.030000: cachefiles_ondemand_fd_write: o=0000002a iB=5c s=100000 l=100000"
CREAD = "  python3-120  [000] .....  100.045000: cachefiles_ondemand_cread: o=0000002a mid=7"
OPEN = "  mount-99  [001] .....  99.000000: cachefiles_ondemand_open: o=0000002a mid=6 oid=3 fd=12 f=0"


def test_parse_fields_in_hex_and_fd_in_decimal():
    """Every field is hex except the anon fd, as TP_printk writes them."""
    assert parse(READ) == {"event": "read", "ts": 100.0, "o": 0x2a, "mid": 7, "oid": 3,
                           "s": 0x100000, "l": 0x1000}
    assert parse(OPEN)["fd"] == 12
    assert parse("# tracer: nop") is None


def test_read_row_splits_the_wait_into_phases():
    """queued until the daemon took it, fetch until its write, write until completion."""
    j = Joiner()
    for line in (READ, WRITE, CREAD):
        j.kernel(parse(line))
    # The daemon logged at mono 100.046 a READ that took 36 ms: it took it at 100.010.
    j.daemon({"op": "READ", "msg_id": 7, "object_id": 3, "off": 0x100000, "len": 0x1000,
              "duration_ms": 36.0, "mono": 100.046, "source": "local", "outcome": "ok"})
    (row,) = j.ready(now=0)
    assert row["queued_ms"] == 10.0
    assert row["fetch_ms"] == 20.0
    assert row["write_ms"] == 15.0
    assert row["total_ms"] == 45.0
    assert (row["source"], row["outcome"], row["object_id"]) == ("local", "ok", 3)
    assert row["kernel_events"] == ["cread", "read"]
    assert not j.pending


def test_unanswered_read_is_flushed_as_pending():
    """A READ the kernel sent that nobody completed: shown as pending, with no total."""
    j = Joiner()
    j.kernel(parse(READ))
    assert list(j.ready(now=0)) == []  # still waiting for its other half
    (row,) = j.ready(now=0, flush=True)
    assert (row["op"], row["outcome"], row["total_ms"]) == ("READ", "pending", None)
