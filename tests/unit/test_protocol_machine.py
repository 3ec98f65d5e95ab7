# SPDX-License-Identifier: Apache-2.0
"""protocol.Objects under any sequence of kernel messages and completions (hypothesis).

A model kernel sends OPEN, READ and CLOSE (object ids from a small set, so
objects are reopened and closed twice), garbage OPENs, and the caller's work
ends in any order and either way. After every step and at shutdown:

* every OPEN is answered once, and only once;
* every READ of an object with an fd is completed once, and only once;
* every fd is closed once, only when no READ, lookup or background write still
  uses it, and nothing is done with it after;
* per source, no more READs are filled at once than the limit.
"""
from __future__ import annotations

import errno

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ondemand_d import protocol as p
from ondemand_d.wire import CloseRequest, OpenRequest, ReadRequest

BLOB = "b" * 64
LIMIT = 2


class Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.objs = p.Objects(limit=LIMIT, readahead=8192, max_held=1 << 30)
        self.next_msg = 1
        self.next_fd = 100
        self.opens: dict[int, int] = {}  # OPEN msg_id -> copens seen
        self.reads: dict[int, int] = {}  # READ msg_id -> fd it was sent for (object open)
        self.completions: dict[int, int] = {}  # READ msg_id -> completions
        self.live_fds: set[int] = set()  # fds the kernel handed over and we have not closed
        self.closed: set[int] = set()
        self.lookups: dict[int, int] = {}  # msg_id -> fd, Lookup issued and not reported
        self.fills: dict[int, p.Fill] = {}  # started, not reported
        self.backgrounds: dict[int, p.StartBackground] = {}  # fd -> running
        self.answered: dict[tuple[int, int], p.Copen] = {}  # (object_id, fd) -> size copen
        self.objects_open: dict[int, int] = {}  # object_id -> fd, as the kernel sees it
        self.sources: dict[int, str] = {}  # fd -> the source its lookup found

    # -- carrying out ---------------------------------------------------------------

    def run(self, actions: list[p.Action]) -> None:
        for a in actions:
            if isinstance(a, p.Lookup):
                assert a.msg_id not in self.lookups
                self.lookups[a.msg_id] = self.objects_open[a.object_id]
            elif isinstance(a, p.Copen):
                assert a.msg_id in self.opens, a
                self.opens[a.msg_id] += 1
                assert self.opens[a.msg_id] == 1, f"OPEN {a.msg_id} answered twice"
                if a.size >= 0:
                    self.answered[a.object_id, a.fd] = a
            elif isinstance(a, p.Fill):
                assert a.fd in self.live_fds, f"Fill on closed fd {a.fd}"
                assert a.msg_id not in self.fills
                self.fills[a.msg_id] = a
                source = self.sources[a.fd]
                assert sum(self.sources[f.fd] == source for f in self.fills.values()) <= LIMIT
            elif isinstance(a, p.Complete):
                assert a.fd in self.live_fds, f"Complete on closed fd {a.fd}"
                self._completed(a.msg_id)
            elif isinstance(a, p.StartBackground):
                assert a.fd in self.live_fds
                assert a.fd not in self.backgrounds, "two background writes on one fd"
                assert 0 <= a.off < a.end
                self.backgrounds[a.fd] = a
            elif isinstance(a, p.CancelBackground):
                assert a.fd in self.backgrounds
            elif isinstance(a, p.CloseFd):
                assert a.fd in self.live_fds, f"fd {a.fd} closed twice or never ours"
                assert a.fd not in self.backgrounds, "fd closed under a background write"
                assert a.fd not in self.lookups.values(), "fd closed during its lookup"
                assert not [f for f in self.fills.values() if f.fd == a.fd], "fd closed mid-READ"
                pending = [m for m, fd in self.reads.items()
                           if fd == a.fd and self.completions.get(m, 0) == 0]
                assert not pending, f"fd {a.fd} closed before READs {pending} completed"
                self.live_fds.discard(a.fd)
                self.closed.add(a.fd)

    def _completed(self, msg_id: int) -> None:
        assert msg_id in self.reads, msg_id
        self.completions[msg_id] = self.completions.get(msg_id, 0) + 1
        assert self.completions[msg_id] == 1, f"READ {msg_id} completed twice"

    def _forget(self, fd: int) -> None:
        self.objects_open = {o: f for o, f in self.objects_open.items() if f != fd}

    def _msg(self) -> int:
        self.next_msg += 1
        return self.next_msg

    # -- the kernel -----------------------------------------------------------------

    @rule(object_id=st.integers(1, 3))
    def kernel_open(self, object_id: int) -> None:
        msg_id, fd = self._msg(), self.next_fd
        self.next_fd += 1
        self.opens[msg_id] = 0
        self.live_fds.add(fd)
        self.objects_open[object_id] = fd
        self.run(self.objs.open(OpenRequest(msg_id, object_id, b"erofs,d", b"k", fd, 0)))

    @rule(object_id=st.integers(1, 3), off=st.integers(0, 5), pages=st.integers(1, 3),
          reuse=st.booleans())
    def kernel_read(self, object_id: int, off: int, pages: int, reuse: bool) -> None:
        last = self.next_msg
        in_flight = last in self.reads and self.completions.get(last, 0) == 0
        msg_id = last if reuse and in_flight else self._msg()  # a duplicate is ignored
        fd = self.objects_open.get(object_id)
        if fd is not None and fd in self.live_fds and msg_id not in self.reads:
            self.reads[msg_id] = fd
        self.run(self.objs.read(ReadRequest(msg_id, object_id, off * 4096, pages * 4096)))

    @rule(object_id=st.integers(1, 3))
    def kernel_close(self, object_id: int) -> None:
        self.objects_open.pop(object_id, None)
        self.run(self.objs.close(CloseRequest(self._msg(), object_id)))

    @rule()
    def kernel_sends_garbage_open(self) -> None:
        msg_id = self._msg()
        self.opens[msg_id] = 0
        self.run(self.objs.malformed(msg_id, 7, is_open=True))

    # -- the caller's work ending -----------------------------------------------------

    @precondition(lambda self: self.lookups)
    @rule(data=st.data(), found=st.booleans(), background=st.sampled_from([None, "prefill"]),
          source=st.sampled_from(["local", "registry"]))
    def lookup_ends(self, data: st.DataObject, found: bool, background: str | None,
                    source: str) -> None:
        msg_id = data.draw(st.sampled_from(sorted(self.lookups)))
        fd = self.lookups.pop(msg_id)
        self.sources[fd] = source
        if not found:  # for the kernel the object was never opened
            self._forget(fd)
        if found:
            actions = self.objs.looked_up(msg_id, BLOB, 6 * 4096, source=source,
                                          background=background)
        else:
            actions = self.objs.looked_up(msg_id, None, -errno.ENOENT)
        self.run(actions)

    @precondition(lambda self: self.answered)
    @rule(data=st.data())
    def copen_refused(self, data: st.DataObject) -> None:
        object_id, fd = data.draw(st.sampled_from(sorted(self.answered)))
        del self.answered[object_id, fd]
        self._forget(fd)
        self.run(self.objs.copen_refused(object_id, fd))

    @precondition(lambda self: self.fills)
    @rule(data=st.data(), how=st.sampled_from(["ok", "failed", "failed_told"]))
    def fill_ends(self, data: st.DataObject, how: str) -> None:
        msg_id = data.draw(st.sampled_from(sorted(self.fills)))
        fill = self.fills.pop(msg_id)
        if how == "ok":
            self._completed(msg_id)
            outcome: p.FillOutcome = p.Filled(fill.off + fill.len)
        elif how == "failed_told":
            self._completed(msg_id)
            outcome = p.Failed(completed=True)
        else:
            outcome = p.Failed()
        self.run(self.objs.fill_done(msg_id, outcome))

    @precondition(lambda self: self.backgrounds)
    @rule(data=st.data(), ok=st.booleans())
    def background_ends(self, data: st.DataObject, ok: bool) -> None:
        fd = data.draw(st.sampled_from(sorted(self.backgrounds)))
        del self.backgrounds[fd]
        self.run(self.objs.background_done(fd, ok=ok))

    # -- always ------------------------------------------------------------------------

    @invariant()
    def held_reads_match(self) -> None:
        uncompleted = [m for m in self.reads if self.completions.get(m, 0) == 0]
        assert self.objs.reads_in_flight == len(uncompleted)

    @invariant()
    def closed_fds_are_not_used(self) -> None:
        assert not self.closed & {f.fd for f in self.fills.values()}
        assert not self.closed & set(self.backgrounds)

    def teardown(self) -> None:
        """Shutdown as the service does it: stop, let the work end, drain."""
        self.run(self.objs.stop())
        while self.lookups or self.fills or self.backgrounds:
            for msg_id in list(self.lookups):
                del self.lookups[msg_id]
                self.run(self.objs.looked_up(msg_id, BLOB, 4096))
            for msg_id in list(self.fills):
                self.fills.pop(msg_id)
                self.run(self.objs.fill_done(msg_id, p.Failed()))
            for fd in list(self.backgrounds):
                del self.backgrounds[fd]
                self.run(self.objs.background_done(fd, ok=False))
        self.run(self.objs.drain())
        assert all(n == 1 for n in self.opens.values()), self.opens
        assert all(self.completions.get(m) == 1 for m in self.reads), (self.reads, self.completions)
        assert not self.live_fds, f"fds never closed: {self.live_fds}"


Machine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestProtocolMachine = Machine.TestCase
