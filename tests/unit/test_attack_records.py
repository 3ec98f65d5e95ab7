# SPDX-License-Identifier: Apache-2.0
"""Blob and image records replaced by a FIFO or a symlink: an error naming the damage, never
a hang (a FIFO opened for reading waits for a writer) and never a record read from
wherever a link points."""

from __future__ import annotations

import os
import threading

import pytest

from ondemand_d.errors import StoreError
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Image


def _store_with_image(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(3 * 4096))
    blob = store.ingest_file(src, 4096)
    store.put_image(Image("app", blob.blob_id, ()))
    return store, blob


@pytest.mark.damages_store
@pytest.mark.parametrize("kind", ["fifo", "symlink"])
@pytest.mark.parametrize("record", ["blob", "image"])
def test_a_planted_record_is_damage_not_a_hang(tmp_path, kind, record):
    store, blob = _store_with_image(tmp_path)
    path = (store.blob_path(blob.blob_id) if record == "blob"
            else store.root / "images" / "app.json")
    assert path.is_file()
    elsewhere = tmp_path / "elsewhere.json"
    path.rename(elsewhere)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(elsewhere)
    store._blob_cache.clear()
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            store.get_blob(blob.blob_id) if record == "blob" else store.get_image("app")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():  # release the reader the old code left waiting on the FIFO
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"loading a {kind} as the {record} record hung")
    (exc,) = outcome
    assert isinstance(exc, StoreError), exc
    assert str(path) in str(exc)
    assert ("not a regular file" if kind == "fifo" else "symbolic link") in str(exc)
