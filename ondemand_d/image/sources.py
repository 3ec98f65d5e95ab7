# SPDX-License-Identifier: Apache-2.0
"""Turn what the user named (a directory, layer tarballs, an OCI layout) into a tree."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from ondemand_d.errors import ImageError
from ondemand_d.image.source_dir import read_directory
from ondemand_d.image.source_oci import is_oci_layout, oci_layers
from ondemand_d.image.source_tar import read_layers
from ondemand_d.image.tree import Node


def describe(paths: Sequence[Path]) -> str:
    """What kind of source `paths` is: 'oci', 'directory' or 'layers'."""
    if len(paths) == 1 and is_oci_layout(paths[0]):
        return "oci"
    if len(paths) == 1 and paths[0].is_dir():
        return "directory"
    for p in paths:
        if p.is_dir():
            msg = f"{p} is a directory; give one directory, one OCI layout, or layer tarballs"
            raise ImageError(msg)
        if not p.exists():
            msg = f"source {p} does not exist: give a directory, an OCI layout or layer tarballs"
            raise ImageError(msg)
    return "layers"


@contextlib.contextmanager
def open_source(
    paths: Sequence[str | os.PathLike[str]], spool_dir: str | os.PathLike[str] | None = None
) -> Iterator[Node]:
    """Yield the tree for `paths`; layer data stays readable until the block exits."""
    if not paths:
        msg = "no source given"
        raise ImageError(msg)
    resolved = [Path(p) for p in paths]
    kind = describe(resolved)
    if kind == "directory":
        yield read_directory(resolved[0])
        return
    layers = oci_layers(resolved[0]) if kind == "oci" else resolved
    with read_layers(layers, spool_dir) as stack:
        yield stack.root
