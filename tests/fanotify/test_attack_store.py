# SPDX-License-Identifier: Apache-2.0
"""A FIFO planted in the store as a chunk file, on the fanotify front end (real mounts).

Opening the FIFO waited for a writer forever: the reader of the file hung, the daemon's
I/O thread with it, and the daemon could not stop.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from ondemand_d.store.local import LocalStore

from tests.service.test_attack_store import HeldFile

from .conftest import Daemon, build


@pytest.mark.damages_store
def test_fifo_chunk_fails_its_file_with_eio_and_the_daemon_stops(
    daemon: Daemon, workdir: Path
) -> None:
    """The file whose chunk is a FIFO reads EIO (in a child, so a hang fails instead of
    blocking the tests), the other files read exact, and SIGTERM stops the daemon cleanly."""
    src = workdir / "src"
    src.mkdir()
    rng = random.Random(7)
    for i in range(4):
        (src / f"f{i}").write_bytes(rng.randbytes(3 * 65536))  # a chunk holds one file
    build(daemon.store, src, "app", "--chunk-size", "64K")
    store = LocalStore(daemon.store)
    data = store.get_blob(store.get_image("app").devices[0][1])
    victim = data.chunks[len(data.chunks) // 2]
    path = store.chunk_path(victim.digest)
    path.chmod(0o644)
    path.unlink()
    os.mkfifo(path)
    mnt = workdir / "mnt"
    daemon.mount("app", mnt)
    outcomes = {}
    try:
        for i in range(4):
            done = subprocess.run(["cat", str(mnt / f"f{i}")], capture_output=True,
                                  timeout=60, check=False)
            outcomes[i] = ("ok" if done.stdout == (src / f"f{i}").read_bytes() else
                           done.stderr.decode().strip())
    finally:
        with contextlib.suppress(OSError):  # release a reader stuck before the fix
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    failed = {i: o for i, o in outcomes.items() if o != "ok"}
    assert len(failed) == 1 and "Input/output error" in next(iter(failed.values())), outcomes
    bad = [r for r in daemon.reads(data.blob_id) if r["outcome"] == "eio"]
    assert bad and "not a regular file" in str(bad[0]), bad
    daemon.umount(mnt)
    assert daemon.stop() == 0


def test_chunk_read_on_a_hung_filesystem_fails_at_the_deadline(workdir: Path) -> None:
    """A chunk file whose read blocks in the kernel (an unanswered FAN_PRE_ACCESS event of
    the test's own group, as a hung NFS or FUSE store would): the file that needs it reads
    EIO at local_read_timeout, the other files read exact meanwhile, the log names the
    chunk file; once the read returns the file reads exact and the daemon stops cleanly."""
    src = workdir / "src"
    src.mkdir()
    rng = random.Random(8)
    for i in range(4):
        (src / f"f{i}").write_bytes(rng.randbytes(3 * 65536))
    store_dir = workdir / "store"
    LocalStore(store_dir)
    build(store_dir, src, "app", "--chunk-size", "64K")
    store = LocalStore(store_dir)
    data = store.get_blob(store.get_image("app").devices[0][1])
    victim = data.chunks[len(data.chunks) // 2]
    held = HeldFile(store.chunk_path(victim.digest))
    daemon = Daemon(workdir, store_dir, env={"ONDEMAND_D_LOCAL_READ_TIMEOUT": "1",
                                             "ONDEMAND_D_READAHEAD": "0"}).start()
    try:
        _hung_chunk_file(daemon, workdir, src, store, victim.digest, held)
    finally:
        held.release()  # a reader stuck before the fix goes
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def _hung_chunk_file(daemon: Daemon, workdir: Path, src: Path, store: LocalStore, digest: str,
                     held: HeldFile) -> None:
    mnt = workdir / "mnt"
    daemon.mount("app", mnt)
    outcomes = {}
    for i in range(4):
        done = subprocess.run(["cat", str(mnt / f"f{i}")], capture_output=True,
                              timeout=60, check=False)
        outcomes[i] = ("ok" if done.stdout == (src / f"f{i}").read_bytes() else
                       done.stderr.decode().strip())
    failed = {i: o for i, o in outcomes.items() if o != "ok"}
    assert len(failed) == 1 and "Input/output error" in next(iter(failed.values())), outcomes
    stuck = [line for line in daemon.lines() if line.get("event") == "local_read_stuck"]
    assert stuck and stuck[0]["file"] == str(store.chunk_path(digest)), stuck
    assert daemon.client.get("/status")["stuck_local_reads"] == 1
    held.release()
    for _ in range(3000):
        if any(line.get("event") == "local_read_returned" for line in daemon.lines()):
            break
        time.sleep(0.01)
    assert daemon.client.get("/status")["stuck_local_reads"] == 0
    (bad,) = failed
    assert (mnt / f"f{bad}").read_bytes() == (src / f"f{bad}").read_bytes()
    daemon.umount(mnt)
    assert daemon.stop() == 0
