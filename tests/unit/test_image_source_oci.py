# SPDX-License-Identifier: Apache-2.0
"""OCI image layouts: index -> manifest -> layers, platform choice, verification."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ondemand_d.errors import ImageError
from ondemand_d.image.build import build_image
from ondemand_d.image.materialize import materialize
from ondemand_d.image.source_oci import oci_layers
from ondemand_d.image.sources import open_source
from ondemand_d.store import LocalStore
from tests.unit.test_image_source_tar import BASE, make_layer

LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def _blob(layout: Path, data: bytes, media: str, **extra: Any) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data), **extra}


def make_layout(tmp: Path, platforms: tuple[str, ...] = ("amd64",), nested: bool = False) -> Path:
    """An OCI layout with two layers per image (base, then an upper with a whiteout)."""
    layout = tmp / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    lower = make_layer(tmp / "lower.tar", BASE, "gzip").read_bytes()
    manifests = []
    for arch in platforms:
        upper = make_layer(
            tmp / f"upper-{arch}.tar",
            [("etc/.wh.gone", "f", b""), ("arch", "f", arch.encode())],
            "zstd",
        )
        config = _blob(
            layout,
            json.dumps({"architecture": arch, "os": "linux"}).encode(),
            "application/vnd.oci.image.config.v1+json",
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config,
            "layers": [
                _blob(layout, lower, LAYER_GZ),
                _blob(layout, upper.read_bytes(), LAYER_ZST),
            ],
        }
        manifests.append(
            _blob(
                layout,
                json.dumps(manifest).encode(),
                MANIFEST,
                platform={"os": "linux", "architecture": arch},
            )
        )
    index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}
    if nested:
        index = {
            "schemaVersion": 2,
            "manifests": [_blob(layout, json.dumps(index).encode(), INDEX)],
        }
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def test_layout_builds_and_fscks(tmp_path: Path) -> None:
    """index.json -> manifest -> two layers, merged, built, accepted by fsck.erofs."""
    layout = make_layout(tmp_path)
    store = LocalStore(tmp_path / "store")
    with open_source([layout]) as root:
        assert sorted(root.children[b"etc"].children) == [b"passwd"]
        build_image(root, store, "oci")
    files = materialize(store, "oci", tmp_path / "b")
    done = subprocess.run(
        ["fsck.erofs", f"--extract={tmp_path / 'out'}", *files.fsck_args()],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "arch").read_text() == "amd64"
    assert (tmp_path / "out" / "bin" / "sh").read_bytes() == b"#!" * 3000


def test_multi_platform_index_picks_the_architecture(tmp_path: Path) -> None:
    """A nested multi-arch index is narrowed to linux/<arch>."""
    layout = make_layout(tmp_path, ("amd64", "arm64"), nested=True)
    assert len(oci_layers(layout, arch="arm64")) == 2
    with pytest.raises(ImageError, match="expected one image for linux/s390x, found 2"):
        oci_layers(layout, arch="s390x")


def test_tampered_or_missing_blobs_are_refused(tmp_path: Path) -> None:
    """A layer whose bytes do not match its digest, or is missing, stops the build early."""
    layout = make_layout(tmp_path)
    layers = oci_layers(layout, arch="amd64")
    layers[1].write_bytes(layers[1].read_bytes() + b"x")
    with pytest.raises(ImageError, match="does not match its descriptor"):
        oci_layers(layout, arch="amd64")
    layers[1].unlink()
    with pytest.raises(ImageError, match="is missing"):
        oci_layers(layout, arch="amd64")
    shutil.rmtree(layout / "blobs")
    (layout / "oci-layout").write_text("{}")
    with pytest.raises(ImageError, match="not an OCI image layout"):
        oci_layers(layout)
