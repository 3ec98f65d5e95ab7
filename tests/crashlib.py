# SPDX-License-Identifier: Apache-2.0
"""Crash matrix: run a store operation with a fault at each of its steps, then check the store.

Each run forks: the child arms the store's fault hook (ondemand_d.store.durable) for one
step (the Nth write, fsync, rename or unlink) and one kind (SIGKILL, ENOSPC, EIO), runs
the operation on a copy of the store, and exits. The parent then opens the copy and checks
that every image reads back byte-identical to one of the states it may be in (old or new),
that fsck finds nothing damaged, and that the same operation, run again without a fault,
succeeds and gives the new state.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import traceback
from collections.abc import Callable
from pathlib import Path

from ondemand_d.errors import StoreError
from ondemand_d.image.reader import ImageReader
from ondemand_d.store import durable
from ondemand_d.store.fsck import fsck
from ondemand_d.store.local import LocalStore

STEPS = ("write", "fsync", "rename", "unlink")
KINDS = ("KILL", "ENOSPC", "EIO")
#: What an image reads as: (path, sha256 of the content) of every regular file.
Snapshot = tuple[tuple[bytes, str], ...]


def snapshot(store: LocalStore, name: str) -> Snapshot | None:
    """Image `name`'s files as a mount would read them; None if there is no such image.

    Every blob comes through the daemon's path: its cookie key resolved, its chunks
    read and verified. (Blob bytes themselves may differ between two good builds of
    the same tree, when one reuses data an interrupted build left behind.)
    """
    if not store.has_image(name):
        return None
    image = store.get_image(name)

    def blob_bytes(key: str) -> bytes:
        blob = store.resolve(key.encode())
        return b"".join(store.read_chunk(c) for c in blob.chunks)

    devices = [blob_bytes(k) for k, _ in image.devices]
    reader = ImageReader(blob_bytes(name),
                         [lambda o, n, d=d: d[o : o + n] for d in devices])
    return tuple(sorted((path, hashlib.sha256(reader.read(ino)).hexdigest())
                        for path, ino in reader.walk() if stat.S_ISREG(ino.mode)))


def _fork(root: Path, op: Callable[[LocalStore], object], spec: str, counts: Path | None) -> str:
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            durable.faults.arm(spec) if spec else durable.faults.count_only()
            op(LocalStore(root))
        except BaseException:  # noqa: BLE001 - an injected failure ends here
            code = 1
            with open(root.parent / "child-error.txt", "w") as f:
                f.write(traceback.format_exc())
        if counts is not None:
            counts.write_text(repr(durable.faults.counts))
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    return "ok" if os.WEXITSTATUS(status) == 0 else "failed"


def step_counts(base: Path, work: Path, op: Callable[[LocalStore], object]) -> dict[str, int]:
    """How many of each step `op` takes on a copy of `base` (run without faults)."""
    _copy(base, work)
    counts = work.parent / "counts.txt"
    assert _fork(work, op, "", counts) == "ok", (work.parent / "child-error.txt").read_text()
    return dict(eval(counts.read_text()))  # noqa: S307 - a dict repr we wrote


def run_matrix(
    base: Path,
    work: Path,
    op: Callable[[LocalStore], object],
    allowed: dict[str, set[Snapshot | None]],
    final: dict[str, Snapshot | None],
) -> dict[str, int]:
    """Fault `op` at every step; after each, check `allowed` states and that a retry reaches `final`.

    Returns how many runs ended killed, failed and ok (all three must have happened).
    """
    outcomes = {"killed": 0, "failed": 0, "ok": 0}
    counts = step_counts(base, work, op)
    assert sum(counts.values()) > 0
    for step in STEPS:
        for at in range(1, counts.get(step, 0) + 1):
            for kind in KINDS:
                spec = f"{step}:{at}:{kind}"
                _copy(base, work)
                outcome = _fork(work, op, spec, None)
                outcomes[outcome] += 1
                check(work, allowed, spec)
                # The store is not wedged: the same operation now succeeds and gives the new state.
                assert _fork(work, op, "", None) == "ok", (
                    spec, (work.parent / "child-error.txt").read_text())
                check(work, {n: {s} for n, s in final.items()}, f"{spec} then retry",
                      full=False)
    return outcomes


def check(root: Path, allowed: dict[str, set[Snapshot | None]], label: str, *,
          full: bool = True) -> None:
    """Each image in one of its allowed states; with `full`, fsck finds no damage either."""
    store = LocalStore(root, create=False)
    for name, states in allowed.items():
        try:
            got = snapshot(store, name)
        except StoreError as exc:
            raise AssertionError(f"{label}: image {name} does not read back: {exc}") from None
        assert got in states, f"{label}: image {name} reads as neither the old nor the new state"
    if not full:
        return
    report = fsck(store)
    damage = [p for p in report.problems if p.kind != "key-entry"]
    assert not damage, f"{label}: fsck found {damage}"


def _copy(base: Path, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work, symlinks=True)
