# SPDX-License-Identifier: Apache-2.0
"""Directory blocks: sorting, splitting and the end-of-data rule (spec §4)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ondemand_d.image.dirent import decode_directory, encode_directory
from ondemand_d.image.format import BLOCK, DIRENT_SIZE, parse_dirent


def test_worked_example_sub_dir() -> None:
    """Spec §9: the empty 'sub' directory is 27 bytes: two dirents and '...'."""
    data = encode_directory([(b".", 48, 2), (b"..", 40, 2)])
    assert data == bytes.fromhex("3000000000000000180002002800000000000000190002002e2e2e")


def test_multi_block_split_and_padding() -> None:
    """700 long names span blocks; every block stands alone; the data ends at the last name."""
    rows = sorted((b"entry-%04d-" % i + b"n" * 40, i + 100, 1) for i in range(700))
    data = encode_directory(rows)
    assert len(data) > 3 * BLOCK and data[-1:] != b"\0"
    for start in range(0, len(data), BLOCK):
        _, nameoff, _ = parse_dirent(data, start)
        assert nameoff % DIRENT_SIZE == 0 and 0 < nameoff < BLOCK
    assert decode_directory(data) == rows


@given(st.sets(st.binary(min_size=1, max_size=255).filter(lambda n: b"\0" not in n), max_size=80))
def test_round_trip(names: set[bytes]) -> None:
    """Any sorted set of names decodes back unchanged."""
    rows = sorted((n, i, 1) for i, n in enumerate(names))
    assert decode_directory(encode_directory(rows)) == rows
