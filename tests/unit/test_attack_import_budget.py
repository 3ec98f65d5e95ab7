# SPDX-License-Identifier: Apache-2.0
"""Attack: `import` of an image file bigger than the bootstrap cap is refused before a byte
of it is read into the store (a sparse 2 GiB file would otherwise be hashed and stored)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ondemand_d.cli import main
from ondemand_d.importer import EROFS_MAGIC, SB_OFFSET


def _sparse_erofs(path: Path, size: int) -> Path:
    """A sparse file with an EROFS superblock that counts `size` bytes of 4 KiB blocks."""
    with path.open("wb") as f:
        head = bytearray(SB_OFFSET + 128)
        struct.pack_into("<I", head, SB_OFFSET, EROFS_MAGIC)
        head[SB_OFFSET + 12] = 12  # blkszbits
        struct.pack_into("<I", head, SB_OFFSET + 36, size >> 12)
        f.write(head)
        f.truncate(size)
    return path


def test_attack_import_of_a_huge_image_is_refused_before_reading_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _sparse_erofs(tmp_path / "huge.erofs", 2 << 30)
    store = tmp_path / "store"
    assert main(["--store", str(store), "import", str(image), "--name", "huge",
                 "--max-bootstrap", "1G"]) == 1
    err = capsys.readouterr().err
    assert (f"image huge is refused: its bootstrap is {2 << 30} bytes, above the cap of "
            f"{1 << 30} (raise max_bootstrap in the configuration or pass --max-bootstrap") in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not store.exists()  # refused before the store is created


def test_attack_import_total_cap_counts_the_blobs(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    image = _sparse_erofs(tmp_path / "small.erofs", 1 << 20)
    assert main(["--store", str(tmp_path / "s"), "import", str(image), "--name", "x",
                 "--max-image", "512K"]) == 1
    assert "it declares 1048576 bytes in all, above the cap of 524288" in capsys.readouterr().err
