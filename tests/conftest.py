# SPDX-License-Identifier: Apache-2.0
import os
import sys
from pathlib import Path

# The tests import helpers (fakekernel) from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", "/tmp/ondemand-d-hypothesis")

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog():
    """A test that configured logging (e.g. via `serve`) must not leak it into the next."""
    yield
    structlog.reset_defaults()
