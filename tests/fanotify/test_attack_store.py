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
from pathlib import Path

import pytest

from ondemand_d.store.local import LocalStore

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
