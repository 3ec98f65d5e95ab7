# SPDX-License-Identifier: Apache-2.0
"""ondemand-d: a cachefiles on-demand daemon serving EROFS images from a content-addressed store."""
from __future__ import annotations


def __getattr__(name: str) -> str:
    # importlib.metadata costs ~0.1 s on the host and seconds under emulation: only on demand.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            return version("ondemand-d")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0.0.0+source"
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
