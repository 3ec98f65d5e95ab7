# SPDX-License-Identifier: Apache-2.0
"""ondemand-d: a cachefiles on-demand daemon serving EROFS blobs from a content-addressed store."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ondemand-d")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
