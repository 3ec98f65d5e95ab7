# SPDX-License-Identifier: Apache-2.0
"""EROFS image builder: chunk-based, multi-blob, dedup-aware images into the store."""
