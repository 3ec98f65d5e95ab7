# SPDX-License-Identifier: Apache-2.0
"""The daemon's rules: one state machine over every cachefiles object. No I/O.

Events go in as method calls: a kernel message (`open`, `read`, `close`,
`malformed`), or the end of work the caller ran (`looked_up`, `fill_done`,
`background_done`, `copen_refused`). Each returns the actions to carry out, in
order: `Lookup`, `Copen`, `Fill`, `Complete`, `StartBackground`,
`CancelBackground`, `CloseFd`, `Ignore`. The caller (service.py) does the I/O
and reports back; it decides nothing itself.

The rules that keep the kernel from hanging, and that the stateful test in
tests/unit/test_protocol_machine.py checks against any sequence of events:

* every OPEN gets exactly one `copen` (a size, or -errno);
* every READ of an object with an fd gets exactly one completion: after data
  (`Fill`), or without data so the reader sees EIO (`Complete`);
* every anon fd is closed exactly once, and only when no READ, lookup or
  background write still uses it; an fd number that arrived in a message we
  could not parse is never closed (it may be somebody else's).

Work is bounded per source: at most `limit` READs of one source (the local
store, or one registry) are filled at once; the rest wait here in order. A
stalled registry therefore holds back only READs of that registry, and the
device keeps being read (`accepting`) until `max_held` READs are held.
"""
from __future__ import annotations

import collections
import errno
from dataclasses import dataclass, field

from ondemand_d.wire import CloseRequest, OpenRequest, ReadRequest

#: READs held (filling or waiting for a slot) before the device stops being read.
MAX_HELD_READS = 1 << 16
LOCAL = "local"


# -- actions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    """Resolve `cookie_key` to a blob, then report `looked_up(msg_id, ...)`."""

    msg_id: int
    object_id: int
    volume_key: bytes
    cookie_key: bytes


@dataclass(frozen=True, slots=True)
class Copen:
    """Write `copen msg_id,size` (size < 0 is -errno).

    If the kernel refuses a size >= 0 (the OPEN was cancelled meanwhile),
    report `copen_refused(object_id, fd)` so the fd does not stay open.
    """

    msg_id: int
    size: int
    object_id: int = field(default=0, compare=False)
    fd: int = field(default=-1, compare=False)


@dataclass(frozen=True, slots=True)
class Fill:
    """Fill [off, off+len) of the blob into `fd` and complete `msg_id`; report `fill_done`."""

    msg_id: int
    object_id: int
    fd: int
    blob_id: str
    off: int
    len: int


@dataclass(frozen=True, slots=True)
class Complete:
    """Complete READ `msg_id` on `fd` without data: the reader gets EIO. No report."""

    msg_id: int
    object_id: int
    fd: int


@dataclass(frozen=True, slots=True)
class StartBackground:
    """Write [off, end) of the blob into `fd` unasked; report `background_done(fd, ok)`.

    kind: "prefill" (a bootstrap after its OPEN), "prefetch" (a data blob after
    its OPEN) or "readahead" (the bytes after a READ).
    """

    object_id: int
    fd: int
    blob_id: str
    kind: str
    off: int
    end: int


@dataclass(frozen=True, slots=True)
class CancelBackground:
    """Stop the object's background write; it still reports `background_done`."""

    object_id: int
    fd: int


@dataclass(frozen=True, slots=True)
class CloseFd:
    """close(fd): nothing uses it any more."""

    object_id: int
    fd: int


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing can be done for this message; say why in the log."""

    msg_id: int
    object_id: int
    reason: str


Action = Lookup | Copen | Fill | Complete | StartBackground | CancelBackground | CloseFd | Ignore


# -- what a fill reports ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filled:
    """The READ's range and more were written, up to byte `end`, and it was completed."""

    end: int


@dataclass(frozen=True, slots=True)
class Failed:
    """No data: `completed` says whether the kernel was told already (else `Complete`)."""

    completed: bool = False


FillOutcome = Filled | Failed


# -- state -------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class ObjectState:
    """One OPEN of a cachefiles object: an anon fd and the blob behind it."""

    object_id: int
    fd: int
    cookie_key: bytes
    volume_key: bytes
    open_msg_id: int
    blob_id: str | None = None  # set once the OPEN was answered with a size
    size: int = 0
    source: str = LOCAL
    looking_up: bool = True
    closing: bool = False  # CLOSE seen (or replaced by a new OPEN): close once idle
    reads: set[int] = field(default_factory=set)  # msg_ids held (filling or queued)
    background: str | None = None  # the kind running, if any
    background_off: int = 0
    ahead_to: int = 0  # readahead was started up to here

    @property
    def idle(self) -> bool:
        return not self.looking_up and not self.reads and self.background is None


@dataclass(eq=False, slots=True)
class _Read:
    msg_id: int
    obj: ObjectState
    off: int
    len: int
    at: float = 0.0  # when it arrived, as the caller's clock says
    started: bool = False


@dataclass(frozen=True, slots=True)
class HeldRead:
    """A READ taken from the kernel and not completed yet (for `inflight`)."""

    msg_id: int
    object_id: int
    fd: int
    blob_id: str
    off: int
    len: int
    at: float
    started: bool  # False: waiting for a slot of its source


class Objects:
    """Every object the kernel opened, every READ held, and the decisions that follow.

    Args:
        limit: READs of one source filled at once.
        readahead: bytes to write past each READ before the kernel asks (0: off).
        max_held: READs held before `accepting` turns False.
    """

    def __init__(self, *, limit: int = 64, readahead: int = 0,
                 max_held: int = MAX_HELD_READS) -> None:
        self.limit = max(1, limit)
        self.readahead = readahead
        self.max_held = max_held
        self._objects: dict[int, ObjectState] = {}  # object_id -> its current OPEN
        self._fds: dict[int, ObjectState] = {}  # every fd still open, current or closing
        self._opens: dict[int, ObjectState] = {}  # OPEN msg_id -> object being looked up
        self._reads: dict[int, _Read] = {}
        self._active: collections.Counter[str] = collections.Counter()
        self._queued: dict[str, collections.deque[_Read]] = {}
        self._stopping = False

    # -- views --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, object_id: int) -> ObjectState | None:
        return self._objects.get(object_id)

    def by_fd(self, fd: int) -> ObjectState | None:
        return self._fds.get(fd)

    def open_objects(self) -> list[ObjectState]:
        """The objects answered with a size and not closed."""
        return [o for o in self._objects.values() if o.blob_id is not None]

    def blob_ids(self) -> set[str]:
        """The blobs that objects with an open fd are answered from."""
        return {o.blob_id for o in self._fds.values() if o.blob_id is not None}

    @property
    def reads_in_flight(self) -> int:
        """READs taken from the kernel and not yet completed (filling or queued)."""
        return len(self._reads)

    @property
    def reads_queued(self) -> int:
        return sum(len(q) for q in self._queued.values())

    def held(self) -> list[HeldRead]:
        return [HeldRead(r.msg_id, r.obj.object_id, r.obj.fd, r.obj.blob_id or "", r.off,
                         r.len, r.at, r.started) for r in self._reads.values()]

    def read_started(self, msg_id: int) -> bool:
        read = self._reads.get(msg_id)
        return read is not None and read.started

    @property
    def accepting(self) -> bool:
        """Whether the device should be read: below the bound of READs held."""
        return len(self._reads) < self.max_held

    # -- kernel messages ------------------------------------------------------------

    def open(self, req: OpenRequest) -> list[Action]:
        if req.fd in self._fds:
            # Two live objects cannot share an fd: refuse, and close nothing (it is in use).
            return [Copen(req.msg_id, -errno.EBADF),
                    Ignore(req.msg_id, req.object_id, "OPEN with an fd already in use")]
        actions: list[Action] = []
        old = self._objects.pop(req.object_id, None)
        if old is not None:  # a second OPEN of the object: the old fd goes once idle
            actions += self._retire(old)
        obj = ObjectState(req.object_id, req.fd, req.cookie_key, req.volume_key, req.msg_id)
        self._objects[req.object_id] = obj
        self._fds[req.fd] = obj
        self._opens[req.msg_id] = obj
        actions.append(Lookup(req.msg_id, req.object_id, req.volume_key, req.cookie_key))
        return actions

    def read(self, req: ReadRequest, at: float = 0.0) -> list[Action]:
        """A READ arrived (at time `at`, kept only to be shown)."""
        obj = self._objects.get(req.object_id)
        if obj is None:
            # No fd for the object, so no way to complete: the kernel fails it
            # when the object goes. Only a confused kernel or fake sends this.
            return [Ignore(req.msg_id, req.object_id, "READ for an object that is not open")]
        if req.msg_id in self._reads:
            return [Ignore(req.msg_id, req.object_id, "READ msg_id already in flight")]
        if obj.blob_id is None:
            return [Complete(req.msg_id, obj.object_id, obj.fd),
                    Ignore(req.msg_id, req.object_id, "READ before the object's copen")]
        read = _Read(req.msg_id, obj, req.off, req.len, at)
        self._reads[req.msg_id] = read
        obj.reads.add(req.msg_id)
        if self._active[obj.source] < self.limit:
            return [self._start(read)]
        self._queued.setdefault(obj.source, collections.deque()).append(read)
        return []

    def close(self, req: CloseRequest) -> list[Action]:
        obj = self._objects.pop(req.object_id, None)
        if obj is None:
            return [Ignore(req.msg_id, req.object_id, "CLOSE for an object that is not open")]
        return self._retire(obj)

    def malformed(self, msg_id: int | None, object_id: int, *, is_open: bool) -> list[Action]:
        """A message we could not parse. An OPEN with a readable msg_id is answered
        (-EINVAL), else its mount waits forever; the fd number it names is not
        trusted, so it is left alone."""
        if msg_id is None or not is_open:
            return []
        return [Copen(msg_id, -errno.EINVAL)]

    # -- the caller's reports ----------------------------------------------------------

    def looked_up(
        self, msg_id: int, blob_id: str | None, size: int, *, source: str = LOCAL,
        background: str | None = None,
    ) -> list[Action]:
        """The lookup for OPEN `msg_id` ended: `blob_id` and `size`, or no blob and -errno.

        background: "prefill" or "prefetch" to write the blob unasked after the copen.
        """
        obj = self._opens.pop(msg_id, None)
        if obj is None:  # not a Lookup we asked for
            return []
        obj.looking_up = False
        if blob_id is None or size < 0:
            actions: list[Action] = [Copen(msg_id, size if size < 0 else -errno.ENOENT)]
            if self._objects.get(obj.object_id) is obj:
                del self._objects[obj.object_id]
            obj.closing = True
            return actions + self._close_if_idle(obj)
        obj.blob_id, obj.size, obj.source = blob_id, size, source
        actions = [Copen(msg_id, size, obj.object_id, obj.fd)]
        if obj.closing:
            return actions + self._close_if_idle(obj)
        if background is not None and size > 0 and not self._stopping:
            actions.append(self._background(obj, background, 0, size))
        return actions

    def copen_refused(self, object_id: int, fd: int) -> list[Action]:
        """The kernel refused our copen: drop the object as a CLOSE would."""
        obj = self._fds.get(fd)
        if obj is None or obj.object_id != object_id or obj.closing:
            return []
        if self._objects.get(object_id) is obj:
            del self._objects[object_id]
        return self._retire(obj)

    def fill_done(self, msg_id: int, outcome: FillOutcome) -> list[Action]:
        """A Fill ended. Complete it if it failed untold; read ahead; start the next."""
        read = self._reads.pop(msg_id, None)
        if read is None or not read.started:
            return []
        obj = read.obj
        obj.reads.discard(msg_id)
        self._active[obj.source] -= 1
        actions: list[Action] = []
        if isinstance(outcome, Failed):
            if not outcome.completed:
                actions.append(Complete(msg_id, obj.object_id, obj.fd))
        elif (self.readahead and not obj.closing and obj.background is None
              and not self._stopping):
            start = max(outcome.end, obj.ahead_to)
            end = min(outcome.end + self.readahead, obj.size)
            if start < end:
                actions.append(self._background(obj, "readahead", start, end))
        actions += self._next(obj.source)
        return actions + self._close_if_idle(obj)

    def background_done(self, fd: int, *, ok: bool) -> list[Action]:
        obj = self._fds.get(fd)
        if obj is None or obj.background is None:
            return []
        if not ok and obj.background == "readahead":
            obj.ahead_to = min(obj.ahead_to, obj.background_off)  # let a later READ retry
        obj.background = None
        return self._close_if_idle(obj)

    def stop(self) -> list[Action]:
        """Shutdown begins: cancel every background write (READs are still filled)."""
        self._stopping = True
        return [CancelBackground(o.object_id, o.fd) for o in self._fds.values()
                if o.background is not None]

    def drain(self) -> list[Action]:
        """At shutdown, once nothing runs: complete what is left and close every fd."""
        actions: list[Action] = []
        for read in self._reads.values():
            actions.append(Complete(read.msg_id, read.obj.object_id, read.obj.fd))
        for obj in self._fds.values():
            actions.append(CloseFd(obj.object_id, obj.fd))
        self._reads.clear()
        self._queued.clear()
        self._active.clear()
        self._objects.clear()
        self._fds.clear()
        self._opens.clear()
        return actions

    # -- inside --------------------------------------------------------------------

    def _start(self, read: _Read) -> Fill:
        obj = read.obj
        read.started = True
        self._active[obj.source] += 1
        assert obj.blob_id is not None
        return Fill(read.msg_id, obj.object_id, obj.fd, obj.blob_id, read.off, read.len)

    def _next(self, source: str) -> list[Action]:
        queue = self._queued.get(source)
        actions: list[Action] = []
        while queue and self._active[source] < self.limit:
            actions.append(self._start(queue.popleft()))
        if queue is not None and not queue:
            del self._queued[source]
        return actions

    def _background(self, obj: ObjectState, kind: str, off: int, end: int) -> StartBackground:
        assert obj.blob_id is not None
        obj.background, obj.background_off = kind, off
        obj.ahead_to = max(obj.ahead_to, end)
        return StartBackground(obj.object_id, obj.fd, obj.blob_id, kind, off, end)

    def _retire(self, obj: ObjectState) -> list[Action]:
        """The object is gone for the kernel: stop its work; close its fd once idle."""
        obj.closing = True
        actions: list[Action] = []
        queue = self._queued.get(obj.source)
        if queue:  # READs not started yet: answer them now, nothing will fill them
            for read in [r for r in queue if r.obj is obj]:
                queue.remove(read)
                del self._reads[read.msg_id]
                obj.reads.discard(read.msg_id)
                actions.append(Complete(read.msg_id, obj.object_id, obj.fd))
        if obj.background is not None:
            actions.append(CancelBackground(obj.object_id, obj.fd))
        return actions + self._close_if_idle(obj)

    def _close_if_idle(self, obj: ObjectState) -> list[Action]:
        if not obj.closing or not obj.idle or self._fds.get(obj.fd) is not obj:
            return []
        del self._fds[obj.fd]
        return [CloseFd(obj.object_id, obj.fd)]
