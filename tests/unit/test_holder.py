# SPDX-License-Identifier: Apache-2.0
"""The fd holder's protocol with real processes and fds (no fanotify needed)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ondemand_d.fanotify import holder


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    """A cache directory whose holder is stopped after the test, whatever happened."""
    yield tmp_path
    with contextlib.suppress(OSError):
        holder.release(tmp_path)


def _gone(pid: int) -> bool:
    """Whether `pid` exits (here it is our child: exited is a zombie until reaped)."""
    for _ in range(400):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_fds_outlive_the_daemon_and_go_to_the_successor(cache: Path) -> None:
    """Stored fds survive the daemon's end (no EXIT) and come back by name; EXIT ends it."""
    first = holder.attach(cache, 30.0)
    assert first is not None and first.fds == {}
    r, w = os.pipe()
    first.store(w, "fanotify")
    os.close(w)
    assert os.getsid(first.pid) == first.pid != os.getsid(0)  # its own session
    first.close(clean=False)  # as a crash would
    second = holder.attach(cache, 30.0, start=False)
    assert second is not None and second.pid == first.pid
    assert set(second.fds) == {"fanotify"}
    os.write(second.fds["fanotify"], b"same pipe")
    assert os.read(r, 64) == b"same pipe"
    with pytest.raises(holder.HolderError, match="another ondemand-d serve"):
        holder.attach(cache, 30.0, start=False)  # one daemon at a time
    os.close(second.fds["fanotify"])
    second.close(clean=True)
    assert _gone(first.pid)
    assert os.read(r, 64) == b""  # the holder's copy is closed too
    os.close(r)
    assert holder.attach(cache, 30.0, start=False) is None  # the stale socket is removed


def test_a_foreign_file_at_the_socket_path_is_refused(cache: Path) -> None:
    """A regular file where the socket belongs is an error sentence, and is left alone."""
    path = holder.socket_path(cache)
    path.parent.mkdir(parents=True)
    path.write_text("not a socket")
    with pytest.raises(holder.HolderError, match="not this daemon's holder socket"):
        holder.attach(cache, 30.0)
    assert path.read_text() == "not a socket"
