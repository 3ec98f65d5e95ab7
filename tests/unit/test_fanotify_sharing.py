# SPDX-License-Identifier: Apache-2.0
"""The sharing verdict of a fanotify mount (fanotify/sharing.py), with a fake kernel probe."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ondemand_d.fanotify import sharing, syscalls
from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.materialize import image_reader
from ondemand_d.image.tree import directory, regular
from ondemand_d.image.xattrs import FingerprintPrefix
from ondemand_d.store import Blob, Chunk, LocalStore
from tests.unit.test_image_fingerprint import NAME, patched

FP = BuildOptions(fingerprint=FingerprintPrefix(NAME), base_chunk=64 << 10)


class FakeFetcher:
    """Verified chunk bytes straight from the store, or from a forged bootstrap."""

    def __init__(self, store: LocalStore, forged: dict[str, bytes] | None = None) -> None:
        self.store, self.forged = store, forged or {}

    async def get(self, blob: Blob, chunks: Sequence[Chunk]) -> tuple[list[bytes], str]:
        if blob.blob_id in self.forged:
            raw = self.forged[blob.blob_id]
            return [raw[c.offset : c.end] for c in chunks], "local"
        return [self.store.read_chunk(c) for c in chunks], "local"


@pytest.fixture
def kernel_has_it(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(syscalls, "erofs_takes", lambda flag: flag == "inode_share")
    sharing.reset()
    yield
    sharing.reset()


def blobs(store: LocalStore, name: str) -> tuple[Blob, list[Blob]]:
    ids = store.get_image(name).blob_ids
    return store.get_blob(ids[0]), [store.get_blob(b) for b in ids[1:]]


def built(tmp_path: Path, data: bytes, name: str = "img", options: BuildOptions = FP
          ) -> LocalStore:
    store = LocalStore(tmp_path / "s")
    root = directory(mtime_ns=10**18)
    root.children[b"lib.so"] = regular(data, mtime_ns=10**18)
    build_image(root, store, name, options)
    return store


async def decide(fetcher: Any, store: LocalStore, name: str, domain: str | None
                 ) -> sharing.Sharing:
    boot, data = blobs(store, name)
    return await sharing.decide(fetcher, boot, data, domain)


@pytest.mark.usefixtures("kernel_has_it")
async def test_on_with_domain_and_verified_fingerprints(tmp_path: Path) -> None:
    """Kernel option, a named domain, verified fingerprints: on, with both options."""
    store = built(tmp_path, b"V" * 100_000)
    got = await decide(FakeFetcher(store), store, "img", "dom")
    assert got == sharing.Sharing(on=True, options=(("inode_share", None), ("domain_id", "dom")))
    assert got.status == "on"


@pytest.mark.usefixtures("kernel_has_it")
async def test_off_reasons(tmp_path: Path) -> None:
    """No domain, no fingerprints, a copied fingerprint: off, each with its reason."""
    store = built(tmp_path, b"V" * 100_000)
    assert (await decide(FakeFetcher(store), store, "img", None)).status == (
        f"off: {sharing.NO_DOMAIN}")
    root = directory(mtime_ns=10**18)
    root.children[b"lib.so"] = regular(b"F" * 100_000, mtime_ns=10**18)
    build_image(root, store, "plain")
    got = await decide(FakeFetcher(store), store, "plain", "dom")
    assert (got.on, got.reason, got.options) == (False, "image without fingerprints", ())
    build_image(root, store, "forger", FP)
    victim = image_reader(store, "img").lookup(b"lib.so").xattrs[NAME]
    forger = image_reader(store, "forger")
    forged = patched(forger.primary, forger.lookup(b"lib.so").xattrs[NAME], victim)
    boot, _ = blobs(store, "forger")
    got = await decide(FakeFetcher(store, {boot.blob_id: forged}), store, "forger", "dom")
    assert got.status == ("off: fingerprints not verified: /lib.so carries another file's "
                          "fingerprint")
    assert got.options == ()


async def test_off_without_the_kernel_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """A kernel without the option: off, whatever the image, and the probe runs once."""
    calls: list[str] = []
    monkeypatch.setattr(syscalls, "erofs_takes", lambda flag: calls.append(flag) or False)
    sharing.reset()
    store = built(tmp_path, b"V" * 100_000)
    for _ in range(2):
        got = await decide(FakeFetcher(store), store, "img", "dom")
        assert got.status == f"off: {sharing.KERNEL_MISSING}"
    assert calls == ["inode_share"]
    sharing.reset()


def test_confirm_reads_the_super_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """`on` stays on only if mountinfo shows inode_share for that mount point."""
    on = sharing.Sharing(on=True, options=(("inode_share", None),))
    monkeypatch.setattr(sharing, "super_options", lambda _m: "ro,inode_share,domain_id=d")
    assert sharing.confirm(on, "/m").status == "on"
    monkeypatch.setattr(sharing, "super_options", lambda _m: "ro")
    assert sharing.confirm(on, "/m").status == (
        "off: the kernel turned inode_share off (see dmesg)")


def test_parse_super_options() -> None:
    """The fourth field after ' - ' of the last line for that mount point (spaces escaped)."""
    info = ("36 25 0:32 / /mnt/a\\040b ro,nosuid shared:1 - erofs none ro,user_xattr\n"
            "37 36 0:33 / /mnt/a\\040b ro - erofs /c/boot ro,user_xattr,inode_share\n"
            "38 25 0:34 / /mnt/c rw - ext4 /dev/vda rw\n")
    assert sharing.parse_super_options(info, "/mnt/a b") == "ro,user_xattr,inode_share"
    assert sharing.parse_super_options(info, "/mnt/c") == "rw"
    assert sharing.parse_super_options(info, "/mnt/none") is None
