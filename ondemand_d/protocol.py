# SPDX-License-Identifier: Apache-2.0
"""The object table and what to do about each request. Ids and state only, no I/O.

The caller feeds requests (and the outcome of the lookups and fills it ran)
into `Objects`, and carries out the actions it gets back. This is where the
rules that keep the kernel from hanging live:

* every OPEN gets exactly one `copen` (a size, or -errno and the fd closed);
* every READ of a known object gets exactly one completion (after data, or
  without data so the reader sees EIO);
* an object's fds are closed only once none of its READs is in flight.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

from ondemand_d.wire import CloseRequest, OpenRequest, ReadRequest, Request


@dataclass(frozen=True, slots=True)
class Lookup:
    """Resolve `cookie_key` (in `volume_key`) to a blob, then call `Objects.opened`."""

    msg_id: int
    object_id: int
    volume_key: bytes
    cookie_key: bytes


@dataclass(frozen=True, slots=True)
class Copen:
    """Write `copen msg_id,size` (size < 0 is -errno).

    If the kernel refuses it (the OPEN was cancelled meanwhile), call
    `Objects.forget(object_id)` so the object's fd does not stay pinned.
    """

    msg_id: int
    size: int
    object_id: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Fill:
    """Fill [off, off+len) of the object's blob into `fd`, then complete `msg_id`.

    Whatever happens, report back with `Objects.read_done(msg_id)`.
    """

    msg_id: int
    object_id: int
    fd: int
    blob_id: str
    off: int
    len: int


@dataclass(frozen=True, slots=True)
class Prefill:
    """Write the whole blob into `fd` without any READ asking (bootstraps, prefetch)."""

    object_id: int
    fd: int
    blob_id: str


@dataclass(frozen=True, slots=True)
class CloseFd:
    """close(fd): the object is gone or was never opened."""

    object_id: int
    fd: int


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing can be done for this request; say why in the log."""

    msg_id: int
    object_id: int
    reason: str


Action = Lookup | Copen | Fill | Prefill | CloseFd | Ignore


@dataclass(slots=True)
class ObjectState:
    """One cachefiles object: an anon fd and the blob behind it."""

    object_id: int
    fd: int
    cookie_key: bytes
    volume_key: bytes
    blob_id: str | None = None  # set once the OPEN was answered with a size
    size: int = 0
    inflight: set[int] = field(default_factory=set)  # msg_ids of READs being filled
    closing: bool = False  # CLOSE seen; close the fd once inflight drains


class Objects:
    """object_id -> ObjectState, and the decisions that follow each request."""

    def __init__(self) -> None:
        self._objects: dict[int, ObjectState] = {}
        self._reads: dict[int, int] = {}  # msg_id -> object_id of READs in flight

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, object_id: int) -> ObjectState | None:
        return self._objects.get(object_id)

    def blob_ids(self) -> set[str]:
        """The blobs that open objects are answered from."""
        return {o.blob_id for o in self._objects.values() if o.blob_id is not None}

    @property
    def reads_in_flight(self) -> int:
        return len(self._reads)

    def handle(self, req: Request) -> list[Action]:
        """Decide what a request from the kernel needs."""
        if isinstance(req, OpenRequest):
            return self._open(req)
        if isinstance(req, ReadRequest):
            return self._read(req)
        return self._close(req)

    def _open(self, req: OpenRequest) -> list[Action]:
        old = self._objects.get(req.object_id)
        actions: list[Action] = []
        if old is not None and old.fd != req.fd and not old.inflight:
            # The kernel reuses an id only after our fd for it is gone; keep no stale fd.
            actions.append(CloseFd(old.object_id, old.fd))
        self._objects[req.object_id] = ObjectState(
            req.object_id, req.fd, req.cookie_key, req.volume_key
        )
        actions.append(Lookup(req.msg_id, req.object_id, req.volume_key, req.cookie_key))
        return actions

    def opened(
        self, msg_id: int, object_id: int, blob_id: str | None, size: int, *, prefill: bool
    ) -> list[Action]:
        """The lookup for an OPEN ended: `blob_id` and `size`, or no blob and size = -errno."""
        obj = self._objects.get(object_id)
        if obj is None:  # pragma: no cover - only handle() adds and only CLOSE removes
            return [Copen(msg_id, -errno.ENOENT)]
        if blob_id is None or size < 0:
            del self._objects[object_id]
            return [Copen(msg_id, size if size < 0 else -errno.ENOENT), CloseFd(object_id, obj.fd)]
        obj.blob_id, obj.size = blob_id, size
        actions: list[Action] = [Copen(msg_id, size, object_id)]
        if prefill:
            actions.append(Prefill(object_id, obj.fd, blob_id))
        return actions

    def _read(self, req: ReadRequest) -> list[Action]:
        obj = self._objects.get(req.object_id)
        if obj is None:
            # No fd for the object, so no way to complete: the kernel fails it
            # when the object goes. Only a confused kernel or fake sends this.
            return [Ignore(req.msg_id, req.object_id, "READ for an object that is not open")]
        if obj.blob_id is None:
            return [Ignore(req.msg_id, req.object_id, "READ before the object's copen")]
        if req.msg_id in self._reads:
            return [Ignore(req.msg_id, req.object_id, "READ msg_id already in flight")]
        obj.inflight.add(req.msg_id)
        self._reads[req.msg_id] = req.object_id
        return [Fill(req.msg_id, req.object_id, obj.fd, obj.blob_id, req.off, req.len)]

    def read_done(self, msg_id: int) -> list[Action]:
        """A Fill ended (either way); close the object if it was waiting for this."""
        object_id = self._reads.pop(msg_id, None)
        obj = self._objects.get(object_id) if object_id is not None else None
        if obj is None:
            return []
        obj.inflight.discard(msg_id)
        if obj.closing and not obj.inflight:
            del self._objects[obj.object_id]
            return [CloseFd(obj.object_id, obj.fd)]
        return []

    def _close(self, req: CloseRequest) -> list[Action]:
        obj = self._objects.get(req.object_id)
        if obj is None:
            return [Ignore(req.msg_id, req.object_id, "CLOSE for an object that is not open")]
        if obj.inflight:
            obj.closing = True
            return []
        del self._objects[req.object_id]
        return [CloseFd(obj.object_id, obj.fd)]

    def forget(self, object_id: int) -> list[Action]:
        """The kernel refused our copen: drop the object as a CLOSE would."""
        obj = self._objects.get(object_id)
        if obj is None:
            return []
        return self._close(CloseRequest(0, object_id))

    def drain(self) -> list[Action]:
        """At shutdown, after in-flight READs ended: close every remaining fd."""
        actions: list[Action] = [CloseFd(o.object_id, o.fd) for o in self._objects.values()]
        self._objects.clear()
        return actions
