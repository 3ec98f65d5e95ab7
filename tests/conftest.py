# SPDX-License-Identifier: Apache-2.0
import os
import sys
from pathlib import Path

# The tests import helpers (fakekernel) from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", "/tmp/ondemand-d-hypothesis")
