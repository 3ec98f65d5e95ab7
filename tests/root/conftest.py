# SPDX-License-Identifier: Apache-2.0
"""Root-only tests: they mount images natively through loop devices."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/root/" in str(item.fspath):
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def _need_root() -> None:
    # Not a skip: these tests prove the images mount, so running them unprivileged is an error.
    assert os.geteuid() == 0, "tests/root needs root (loop devices and mount)"
