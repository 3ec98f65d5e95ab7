# SPDX-License-Identifier: Apache-2.0
"""Page-cache sharing on the 7.2 guest kernel (issue 22, items 2 and 3).

One boot of the 7.2 kind. Two images of one domain, built with ``--fingerprint`` into one
store (v2 changes some files of v1, resizes one and adds two), are mounted with ``--domain``:
sharing is on (status, log line, mountinfo), and every file's md5 matches its source through
both mounts, read v1 first and, in a second domain with fresh blob files, v2 first. The page
cache that reading v2's unchanged files adds after v1 is recorded with sharing on and off.

The forged pair: an image whose file carries the victim's fingerprint over other bytes of the
same size. The daemon refuses it sharing ("off: fingerprints not verified: ..."), and read in
both orders the victim reads its bytes and the forger its own. That the refusal is what
protects the victim is shown too: the same forged blob files mounted by hand with
``inode_share`` read the victim's bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from guestlib import Daemon, guard, run_cli, tree_digests

pytestmark = [pytest.mark.vm, pytest.mark.kernel("7.2")]

MiB = 1 << 20
NO_DOMAIN = "no domain (mount with --domain to share page cache)"

# ------------------------------------------------------------------ host side


@pytest.fixture(scope="module")
def checks(guest_7_2: Any) -> Any:
    return guest_7_2.checks(__file__)


def test_kernel_has_inode_share(checks: Any) -> None:
    """The 7.2 guest kernel takes inode_share (the probe finds CONFIG_EROFS_FS_PAGE_CACHE_SHARE)."""
    data = checks.passed("check_probe")
    assert data["release"].startswith("7.2") and data["lacks"] is None, data


def test_two_versions_share_and_read_byte_exact(checks: Any) -> None:
    """Sharing on for both images (status, log, mountinfo); every md5 right in both orders."""
    data = checks.passed("check_shared_pair")
    for rnd in data["rounds"]:
        assert rnd["sharing"] == ["on", "on"], rnd
        assert rnd["super_inode_share"] == [True, True], rnd
        assert rnd["mismatched"] == {"v1": [], "v2": []}, rnd
        assert rnd["files"] == {"v1": data["files_v1"], "v2": data["files_v2"]}
    assert data["log_sharing"] == ["on"] * 4


def test_second_reader_adds_little_page_cache(checks: Any) -> None:
    """Reading v2's unchanged files after v1 adds under 10% of their bytes to the page cache
    with sharing on (both orders), and at least their bytes with it off (no --domain)."""
    data = checks.passed("check_shared_pair")
    unchanged = data["unchanged_bytes"]
    assert data["off_sharing"] == [f"off: {NO_DOMAIN}"] * 2
    assert data["cached_added_on_dom"] < unchanged // 10, data
    assert data["cached_added_on_dom2"] < unchanged // 10, data
    assert data["cached_added_off"] >= unchanged, data


def test_directio_reads_right_and_fills(checks: Any) -> None:
    """With `directio` every md5 is right and the fill events still arrive (the page-cache
    figures are recorded in checks.json for the README)."""
    data = checks.passed("check_directio")
    for label in ("plain", "directio"):
        assert data[label]["mismatched"] == [] and data[label]["fills"] > 0, data


def test_forger_is_refused_and_never_changes_what_the_victim_reads(checks: Any) -> None:
    """The forged image mounts with sharing off (and says why); in both read orders the victim
    reads its bytes and the forger its own; by hand with inode_share it would read the victim's."""
    data = checks.passed("check_forged_pair")
    assert data["victim_sharing"] == "on"
    assert data["forger_sharing"] == ("off: fingerprints not verified: /lib.so carries another "
                                      "file's fingerprint")
    for rnd in data["rounds"]:
        assert rnd == {"victim": "victim", "forger": "forger"}, data
    assert data["forced_forger_reads"] == "victim", data


# ------------------------------------------------------------------ guest side




_state: dict[str, Any] = {}


def _daemon(ctx: Any) -> Daemon:
    """One daemon for the module, its store and cache dir on the ext4 cache disk."""
    if "daemon" not in _state:
        base = ctx.cache.parent / "share72"
        base.mkdir(parents=True, exist_ok=True)
        socket = base / "control.sock"
        daemon = Daemon(base / "store", base / "cache", ctx.out.parent / "share72-daemon.log",
                        extra=("--control-socket", str(socket)))
        _state.update(daemon=daemon.start(timeout=120), socket=socket)
    return _state["daemon"]


def _mount(image: str, mnt: Path, domain: str | None) -> dict[str, Any]:
    mnt.mkdir(parents=True, exist_ok=True)
    run_cli("mount", image, str(mnt), "--socket", str(_state["socket"]),
         *(["--domain", domain] if domain else []))
    status = json.loads(run_cli("status", "--socket", str(_state["socket"]), "--json"))
    (mount,) = [m for m in status["frontends"]["fanotify"]["mounts"]
                if m["mountpoint"] == str(mnt)]
    return mount  # type: ignore[no-any-return]


def _umount(mnt: Path) -> None:
    run_cli("umount", str(mnt), "--socket", str(_state["socket"]))


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cached() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Cached in /proc/meminfo")


def _inode_share(mnt: Path) -> bool:
    from ondemand_d.fanotify import sharing

    return "inode_share" in sharing.super_options(str(mnt)).split(",")


@guard(60)
def check_probe(ctx: Any) -> None:
    """What the daemon's probe says about this kernel."""
    from ondemand_d.fanotify import sharing

    ctx.data["release"] = os.uname().release
    ctx.data["lacks"] = sharing.kernel_lacks()
    assert ctx.data["lacks"] is None, ctx.data


def _versions(src1: Path, src2: Path) -> tuple[list[str], int]:
    """v1: 40 files of 64 KiB..1 MiB (about 20 MiB); v2: 6 of them changed (one resized), 2
    added. Returns v2's unchanged names and their bytes."""
    rng = random.Random(722)
    unchanged, size = [], 0
    for i in range(40):
        data = rng.randbytes(rng.choice([65_536, 200_001, 500_000, 1_048_576]))
        name = f"d{i % 5}/f{i:02d}.bin"
        for root in (src1, src2):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        if i % 7 == 3:  # changed in v2: same size, other bytes (and f31 grows)
            (src2 / name).write_bytes(rng.randbytes(len(data) + (4097 if i == 31 else 0)))
        else:
            unchanged.append(name)
            size += len(data)
    (src1 / "tiny.txt").write_bytes(b"v1\n")
    (src2 / "tiny.txt").write_bytes(b"v2\n")
    (src2 / "new").mkdir()
    (src2 / "new" / "a.bin").write_bytes(rng.randbytes(300_000))
    (src2 / "new" / "b.bin").write_bytes(rng.randbytes(2 * MiB))
    return unchanged, size


@guard(600)
def check_shared_pair(ctx: Any) -> None:
    """Build v1 and v2 with fingerprints; mount both in one domain; md5 every file in both
    orders (round 2 in a second domain: fresh blob files, filled again)."""
    daemon = _daemon(ctx)
    src1, src2 = ctx.tmp / "v1", ctx.tmp / "v2"
    unchanged, unchanged_bytes = _versions(src1, src2)
    _state["v2_src"] = src2
    store = ["--store", str(daemon.store)]
    for name, src in (("v1", src1), ("v2", src2)):
        run_cli(*store, "build", str(src), "--name", name, "--chunk-size", "64K", "--fingerprint")
    want = {"v1": tree_digests(src1), "v2": tree_digests(src2)}
    ctx.data.update(files_v1=len(want["v1"]), files_v2=len(want["v2"]), rounds=[],
                    unchanged_bytes=unchanged_bytes)
    daemon.mark()
    for domain, order in (("dom", ("v1", "v2")), ("dom2", ("v2", "v1"))):
        _drop_caches()
        mnts = {name: ctx.tmp / f"m-{domain}-{name}" for name in ("v1", "v2")}
        views = {name: _mount(name, mnts[name], domain) for name in ("v1", "v2")}
        got = {}
        for i, name in enumerate(order):
            if i == 1:  # the second image's unchanged files, after the first was read
                before = _cached()
                for rel in unchanged:
                    (mnts[name] / rel).read_bytes()
                ctx.data[f"cached_added_on_{domain}"] = _cached() - before
            got[name] = tree_digests(mnts[name])
        ctx.data["rounds"].append({
            "domain": domain, "order": list(order),
            "sharing": [views[n]["sharing"] for n in ("v1", "v2")],
            "super_inode_share": [_inode_share(mnts[n]) for n in ("v1", "v2")],
            "files": {n: len(got[n]) for n in got},
            "mismatched": {n: sorted(k for k in want[n].keys() | got[n].keys()
                                     if want[n].get(k) != got[n].get(k)) for n in got}})
        for mnt in mnts.values():
            _umount(mnt)
    # The same reading with sharing off (no --domain: each image in its own domain).
    _drop_caches()
    off = {name: ctx.tmp / f"m-off-{name}" for name in ("v1", "v2")}
    views = {name: _mount(name, off[name], None) for name in ("v1", "v2")}
    ctx.data["off_sharing"] = [views[n]["sharing"] for n in ("v1", "v2")]
    tree_digests(off["v1"])
    before = _cached()
    for rel in unchanged:
        (off["v2"] / rel).read_bytes()
    ctx.data["cached_added_off"] = _cached() - before
    for mnt in off.values():
        _umount(mnt)
    ctx.data["log_sharing"] = [e["sharing"] for e in daemon.events("fanotify_mounted")][:4]
    for rnd in ctx.data["rounds"]:
        assert all(not v for v in rnd["mismatched"].values()), rnd
        assert rnd["sharing"] == ["on", "on"], rnd


@guard(300)
def check_directio(ctx: Any) -> None:
    """Measure `directio` (recorded, not required): v2's blob files of a fresh domain mounted
    by hand with and without it; every md5, the fill events, the page cache a full read adds."""
    from ondemand_d.fanotify import syscalls

    daemon = _daemon(ctx)
    src = _state["v2_src"]  # check_shared_pair's (it runs first)
    want = tree_digests(src)
    for label, extra in (("plain", ()), ("directio", (("directio", None),))):
        _drop_caches()
        view = _mount("v2", ctx.tmp / f"m-dio-{label}", f"dio-{label}")  # lays out fresh files
        paths = [b["path"] for b in view["blobs"]]
        hand = ctx.tmp / f"m-hand-{label}"
        hand.mkdir()
        fd = os.open(hand, os.O_PATH | os.O_DIRECTORY)
        try:
            syscalls.mount_erofs(paths[0], fd, paths[1:], options=extra)
        finally:
            os.close(fd)
        daemon.mark()
        before = _cached()
        got = tree_digests(hand)  # cold: filled by the daemon as it is read
        cold = _cached() - before
        _drop_caches()
        before = _cached()
        again = tree_digests(hand)  # warm: the blob files are whole, the page cache is empty
        ctx.data[label] = {
            "cached_added_cold": cold, "cached_added_warm": _cached() - before,
            "fills": len(daemon.events("read_completed")),
            "mismatched": sorted(k for k in want.keys() | got.keys() | again.keys()
                                 if not want.get(k) == got.get(k) == again.get(k)),
            "bytes": sum((src / k).stat().st_size for k in want)}
        syscalls.umount(str(hand))
        _umount(ctx.tmp / f"m-dio-{label}")
    for label in ("plain", "directio"):
        assert ctx.data[label]["mismatched"] == [], ctx.data
        assert ctx.data[label]["fills"] > 0, ctx.data


def _forge(store_dir: Path, victim: str, forger: str) -> None:
    """Give `forger`'s lib.so the fingerprint of `victim`'s (same size, other bytes): a new
    bootstrap with the value swapped and the superblock checksum made right."""
    from ondemand_d.image import format as f
    from ondemand_d.image.blobwriter import put_bytes
    from ondemand_d.image.materialize import image_reader
    from ondemand_d.store import LocalStore

    name = b"trusted.erofs.fingerprint"
    store = LocalStore(store_dir)
    want = image_reader(store, victim).lookup(b"lib.so").xattrs[name]
    reader = image_reader(store, forger)
    own = reader.lookup(b"lib.so").xattrs[name]
    assert reader.primary.count(own) == 1 and len(own) == len(want)
    raw = bytearray(reader.primary.replace(own, want))
    sb = f.Superblock.from_bytes(bytes(raw[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE]))
    raw[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE] = bytes(replace(sb, checksum=0))
    crc = f.sb_checksum(bytes(raw[: f.BLOCK]))
    raw[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE] = bytes(replace(sb, checksum=crc))
    image = store.get_image(forger)
    with store.transaction():
        boot = put_bytes(store, bytes(raw), {"kind": "erofs-bootstrap"})
        store.put_image(replace(image, bootstrap=boot.blob_id), replace=True)


@guard(400)
def check_forged_pair(ctx: Any) -> None:
    """The forger is refused sharing; in both orders each image reads its own bytes."""
    from ondemand_d.fanotify import syscalls

    daemon = _daemon(ctx)
    data = {"victim": b"V" * 300_000, "forger": b"F" * 300_000}
    store = ["--store", str(daemon.store)]
    for name, body in data.items():
        src = ctx.tmp / f"src-{name}"
        src.mkdir()
        (src / "lib.so").write_bytes(body)
        run_cli(*store, "build", str(src), "--name", name, "--chunk-size", "64K", "--fingerprint",
             "--fingerprint-name", "trusted.erofs.fingerprint")
    _forge(daemon.store, "victim", "forger")
    which = {hashlib.md5(b).hexdigest(): n for n, b in data.items()}
    ctx.data["rounds"] = []
    forger_view: dict[str, Any] = {}
    for domain, order in (("fdom", ("forger", "victim")), ("fdom2", ("victim", "forger"))):
        _drop_caches()
        mnts = {n: ctx.tmp / f"m-{domain}-{n}" for n in data}
        views = {n: _mount(n, mnts[n], domain) for n in data}
        ctx.data["victim_sharing"] = views["victim"]["sharing"]
        ctx.data["forger_sharing"] = views["forger"]["sharing"]
        forger_view = views["forger"]
        ctx.data["rounds"].append({n: which.get(hashlib.md5(
            (mnts[n] / "lib.so").read_bytes()).hexdigest(), "?") for n in order})
        if domain == "fdom2":
            # The attack, made by hand: the forger's own blob files with inode_share in the
            # victim's domain, after the victim's lib.so is in the page cache.
            forced = ctx.tmp / "m-forced"
            forced.mkdir()
            paths = [b["path"] for b in forger_view["blobs"]]
            fd = os.open(forced, os.O_PATH | os.O_DIRECTORY)
            try:
                syscalls.mount_erofs(paths[0], fd, paths[1:], options=(
                    ("inode_share", None), ("domain_id", domain)))
            finally:
                os.close(fd)
            ctx.data["forced_forger_reads"] = which.get(
                hashlib.md5((forced / "lib.so").read_bytes()).hexdigest(), "?")
            syscalls.umount(str(forced))
        for mnt in mnts.values():
            _umount(mnt)
    assert ctx.data["forger_sharing"].startswith("off: fingerprints not verified"), ctx.data
    for rnd in ctx.data["rounds"]:
        assert rnd == {"victim": "victim", "forger": "forger"}, ctx.data


def teardown() -> None:
    daemon = _state.get("daemon")
    if daemon is not None:
        assert daemon.stop() == 0, daemon.log_tail()
