# SPDX-License-Identifier: Apache-2.0
"""Find the layer tarballs of an OCI image layout directory (index.json -> manifest).

Every blob read is checked against its descriptor's digest and size first,
so a damaged or tampered layout fails before any layer is applied.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
from pathlib import Path
from typing import Any

from ondemand_d.errors import ImageError

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def is_oci_layout(path: Path) -> bool:
    return path.is_dir() and (path / "oci-layout").is_file() and (path / "index.json").is_file()


def oci_layers(layout: Path, arch: str | None = None) -> list[Path]:
    """Return the layer blob paths of the one image in `layout`, bottom layer first.

    An index with several images is narrowed to linux/<arch> (default: this
    machine's architecture).

    Raises:
        ImageError: the layout is incomplete, ambiguous or fails verification.
    """
    try:
        version = json.loads((layout / "oci-layout").read_text())["imageLayoutVersion"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = f"{layout} is not an OCI image layout (oci-layout unreadable: {exc})"
        raise ImageError(msg) from exc
    if version != "1.0.0":
        msg = f"{layout}: unsupported OCI image layout version {version!r}"
        raise ImageError(msg)
    want = arch or _ARCH.get(platform.machine(), platform.machine())
    index = _load_json(layout / "index.json", f"{layout}/index.json")
    manifest_desc = _pick(layout, index, want, depth=0)
    manifest = _blob_json(layout, manifest_desc)
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        msg = f"{layout}: manifest {manifest_desc.get('digest')} lists no layers"
        raise ImageError(msg)
    paths = []
    for n, desc in enumerate(layers):
        desc = _typed(desc, dict, f"{layout}: layer {n} of manifest {manifest_desc.get('digest')}")
        if desc.get("mediaType") not in LAYER_TYPES:
            media = desc.get("mediaType")
            msg = f"{layout}: layer {desc.get('digest')} has unsupported type {media!r}"
            raise ImageError(msg)
        path = _blob_path(layout, desc)
        _verify(path, desc)
        paths.append(path)
    return paths


def _pick(layout: Path, index: dict[str, Any], arch: str, depth: int) -> dict[str, Any]:
    """Descend through (nested) indexes to the single manifest descriptor to use."""
    if depth > 4:  # noqa: PLR2004 - real layouts nest once at most
        msg = f"{layout}: image indexes nest too deeply"
        raise ImageError(msg)
    entries = _typed(index.get("manifests", []), list, f"{layout}: an index's 'manifests'")
    manifests = [_typed(d, dict, f"{layout}: entry {n} of an index's 'manifests'")
                 for n, d in enumerate(entries)]
    platforms = [_typed(d.get("platform", {}), dict, f"{layout}: 'platform' of {d.get('digest')}")
                 for d in manifests]
    if len(manifests) > 1:
        matching = [
            d for d, p in zip(manifests, platforms, strict=True)
            if p.get("os") == "linux" and p.get("architecture") == arch
        ]
        manifests = matching or manifests
    if len(manifests) != 1:
        names = [_typed(d.get("annotations", {}), dict, f"{layout}: 'annotations' of "
                        f"{d.get('digest')}").get("org.opencontainers.image.ref.name",
                                                  d.get("digest"))
                 for d in manifests]
        msg = f"{layout}: expected one image for linux/{arch}, found {len(manifests)}: {names}"
        raise ImageError(msg)
    desc = manifests[0]
    media = desc.get("mediaType")
    if media in INDEX_TYPES:
        return _pick(layout, _blob_json(layout, desc), arch, depth + 1)
    if media not in MANIFEST_TYPES:
        msg = f"{layout}: descriptor {desc.get('digest')} has unsupported type {media!r}"
        raise ImageError(msg)
    return desc


def _typed(value: Any, kind: type, label: str) -> Any:
    """`value` if it is a JSON `kind` (object or array); else an ImageError naming the entry."""
    if not isinstance(value, kind):
        want = "an object" if kind is dict else "an array"
        msg = f"{label} is {type(value).__name__} in the JSON, not {want}: the layout is damaged"
        raise ImageError(msg)
    return value


def _blob_path(layout: Path, desc: dict[str, Any]) -> Path:
    digest = str(desc.get("digest", ""))
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        msg = f"{layout}: descriptor digest {digest!r} is not sha256:<64 hex>"
        raise ImageError(msg)
    path = layout / "blobs" / "sha256" / hexdigest
    if not path.is_file():
        msg = f"{layout}: blob {digest} is missing"
        raise ImageError(msg)
    return path


def _verify(path: Path, desc: dict[str, Any]) -> None:
    want_size = desc.get("size")
    if want_size is not None and (not isinstance(want_size, int) or isinstance(want_size, bool)):
        msg = f"descriptor {desc.get('digest')}: size {want_size!r} is not an integer"
        raise ImageError(msg)
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    if "sha256:" + h.hexdigest() != desc.get("digest") or size != desc.get("size", size):
        msg = f"blob {path} does not match its descriptor {desc.get('digest')} ({size} bytes)"
        raise ImageError(msg)


def _blob_json(layout: Path, desc: dict[str, Any]) -> dict[str, Any]:
    path = _blob_path(layout, desc)
    _verify(path, desc)
    return _load_json(path, f"{layout}: blob {desc.get('digest')}")


def _load_json(path: Path, label: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"{label} is unreadable: {exc}"
        raise ImageError(msg) from exc
    if not isinstance(raw, dict):
        msg = f"{label} is not a JSON object"
        raise ImageError(msg)
    return raw
