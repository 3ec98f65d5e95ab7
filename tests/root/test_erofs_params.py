# SPDX-License-Identifier: Apache-2.0
"""What this kernel's EROFS accepts, asked of an fsopen context (nothing is mounted): how
`serve` tells a kernel whose EROFS still mounts by fsid from one that does not."""

from __future__ import annotations

import gzip
from pathlib import Path

from ondemand_d.fanotify.syscalls import erofs_takes


def _config() -> str | None:
    try:
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return None


def test_known_unknown_and_compiled_out_parameters() -> None:
    assert erofs_takes("source", "/nowhere") is True
    assert erofs_takes("no_such_erofs_option", "1") is False
    config = _config()
    if config is not None:  # the kernel says what it was built with: the probe must agree
        ondemand = "CONFIG_EROFS_FS_ONDEMAND=y" in config
        assert erofs_takes("fsid", "probe") is ondemand
        assert erofs_takes("directio") is ("CONFIG_EROFS_FS_BACKED_BY_FILE=y" in config)
