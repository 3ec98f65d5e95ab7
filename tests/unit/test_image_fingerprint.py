# SPDX-License-Identifier: Apache-2.0
"""Fingerprints checked from metadata alone (image/fingerprint.py)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ondemand_d.image import format as f
from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.fingerprint import TAG, Verdict, check_image
from ondemand_d.image.materialize import image_reader
from ondemand_d.image.tree import Node, directory, regular
from ondemand_d.image.xattrs import FingerprintPrefix
from ondemand_d.store import LocalStore

NAME = b"trusted.erofs.fingerprint"
FP = BuildOptions(fingerprint=FingerprintPrefix(NAME), base_chunk=64 << 10)


def tree(files: dict[bytes, bytes]) -> Node:
    root = directory(mtime_ns=10**18)
    root.children.update({k: regular(v, mtime_ns=10**18) for k, v in files.items()})
    return root


def verdict(store: LocalStore, name: str, primary: bytes | None = None) -> Verdict:
    image = store.get_image(name)
    if primary is None:
        primary = image_reader(store, name).primary
    return check_image(primary, [store.get_blob(b) for b in image.blob_ids[1:]])


def patched(primary: bytes, old: bytes, new: bytes) -> bytes:
    """`primary` with one xattr value swapped (same length) and the sb checksum made right."""
    assert len(old) == len(new) and primary.count(old) == 1
    raw = bytearray(primary.replace(old, new))
    sb = f.Superblock.from_bytes(bytes(raw[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE]))
    raw[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE] = bytes(replace(sb, checksum=0))
    crc = f.sb_checksum(bytes(raw[: f.BLOCK]))
    raw[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE] = bytes(replace(sb, checksum=crc))
    return bytes(raw)


def test_built_image_checks_out(tmp_path: Path) -> None:
    """Every fingerprint of a freshly built image matches its own chunk tables."""
    store = LocalStore(tmp_path / "s")
    files = {b"a": b"A" * 200_000, b"b": b"B" * 70_000, b"hole": bytes(300_000) + b"x",
             b"tiny": b"t"}
    build_image(tree(files), store, "v1", FP)
    v = verdict(store, "v1")
    assert v == Verdict(safe=True, reason="", fingerprinted=3)  # tiny is inline: none


def test_equal_files_of_two_images_get_equal_fingerprints(tmp_path: Path) -> None:
    """A file the second build reuses from the first has the first's fingerprint; a changed
    file has another; both images check out."""
    store = LocalStore(tmp_path / "s")
    build_image(tree({b"same": b"S" * 100_000, b"chg": b"1" * 90_000}), store, "v1", FP)
    build_image(tree({b"same": b"S" * 100_000, b"chg": b"2" * 90_000}), store, "v2", FP)
    r1, r2 = image_reader(store, "v1"), image_reader(store, "v2")
    assert r1.lookup(b"same").xattrs[NAME] == r2.lookup(b"same").xattrs[NAME]
    assert r1.lookup(b"chg").xattrs[NAME] != r2.lookup(b"chg").xattrs[NAME]
    assert verdict(store, "v1").safe and verdict(store, "v2").safe


def test_copied_fingerprint_is_refused(tmp_path: Path) -> None:
    """An image whose file carries another image's fingerprint over different bytes (same
    size, checksum made right) is not sharing-safe, and the reason names the file."""
    store = LocalStore(tmp_path / "s")
    build_image(tree({b"lib.so": b"V" * 100_000}), store, "victim", FP)
    build_image(tree({b"lib.so": b"F" * 100_000}), store, "forger", FP)
    victim = image_reader(store, "victim").lookup(b"lib.so").xattrs[NAME]
    forger = image_reader(store, "forger")
    own = forger.lookup(b"lib.so").xattrs[NAME]
    forged = patched(forger.primary, own, victim)
    assert verdict(store, "forger").safe
    v = verdict(store, "forger", forged)
    assert not v.safe
    assert v.reason == "fingerprints not verified: /lib.so carries another file's fingerprint"


def test_foreign_format_is_refused(tmp_path: Path) -> None:
    """A value without the odfp2: tag (erofs-utils' sha256:, our old one) is not trusted."""
    store = LocalStore(tmp_path / "s")
    build_image(tree({b"f": b"x" * 10_000}), store, "img", FP)
    reader = image_reader(store, "img")
    own = reader.lookup(b"f").xattrs[NAME]
    v = verdict(store, "img", patched(reader.primary, own, b"sha256" + own[len(TAG) :]))
    assert v.reason == "fingerprints not verified: /f carries a foreign or old format fingerprint"


def test_no_fingerprints(tmp_path: Path) -> None:
    """An image built without --fingerprint is 'image without fingerprints'."""
    store = LocalStore(tmp_path / "s")
    build_image(tree({b"f": b"x" * 10_000}), store, "img")
    assert verdict(store, "img") == Verdict(safe=False, reason="image without fingerprints")


def test_wrong_devices_and_garbage_are_refused(tmp_path: Path) -> None:
    """Checked against other blobs, or with unreadable metadata, nothing is trusted."""
    store = LocalStore(tmp_path / "s")
    build_image(tree({b"f": b"x" * 10_000}), store, "a", FP)
    build_image(tree({b"f": b"y" * 10_000}), store, "b", FP)
    primary = image_reader(store, "a").primary
    other = [store.get_blob(b) for b in store.get_image("b").blob_ids[1:]]
    assert check_image(primary, other).reason.startswith("fingerprints not verified: /f")
    assert not check_image(primary[:2000], other).safe
    assert check_image(bytes(8192), []).reason.startswith("fingerprints not verified: unreadable")
