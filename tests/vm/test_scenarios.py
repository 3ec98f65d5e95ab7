# SPDX-License-Identifier: Apache-2.0
"""ondemand-d against the real kernel (issue 3, item 4): one guest boot runs every scenario.

The host builds the inputs first (source trees, mkfs.erofs images, ``ondemand-d import`` into
stores, sha256 manifests) in the results dir, which the guest sees at the same path. In the
guest each check starts ``ondemand-d serve`` as users do (the installed console script),
mounts by fsid, and compares every byte against the manifest. Each check has a wall-clock
guard (harness.py); waits that could hang (mount, reads with a dead daemon) run in children
that are killed at a timeout, so a hang fails the check instead of the suite.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from guestlib import (
    Daemon, drop_caches, errname, guard, mount_erofs, mount_in_child, ondemand_d_argv,
    read_in_child, tree_digests, umount,
)

pytestmark = pytest.mark.vm

STORE_CHUNK = 1 << 20      # ondemand-d import's default chunk size
EROFS_CHUNK = 64 << 10     # mkfs.erofs --chunksize for chunk-based / blobdev images
MANY = 8

# ------------------------------------------------------------------ host side: inputs


def _write_tree(root: Path, seed: int, files: int, max_size: int) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    specials = [0, 1, 100, 4095, 4096, 4097, 65536 + 3, 1 << 20]
    for i in range(files):
        sub = root / f"d{i % 7}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        size = specials[i] if i < len(specials) else rng.randrange(max_size)
        # half random, half compressible text, so both full and mostly-zero blocks occur
        body = rng.randbytes(size) if i % 2 else (b"line %d\n" % i) * (size // 8 + 1)
        (sub / f"f{i:04d}.bin").write_bytes(body[:size])
    (root / "link").symlink_to("d0/e0/f0000.bin")
    (root / "emptydir").mkdir()


def _manifest(root: Path) -> dict[str, str]:
    return tree_digests(root)


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    return proc.stdout


def _mkfs(image: Path, tree: Path, *opts: str) -> None:
    _run(["mkfs.erofs", "--quiet", "-T0", "--all-root", *opts, str(image), str(tree)])


def _import(store: Path, name: str, image: Path, *blobs: str) -> None:
    argv = [*ondemand_d_argv(), "--store", str(store), "import", "--name", name, str(image)]
    for blob in blobs:
        argv += ["--blob", blob]
    _run(argv)


def _damage(store: Path, image: str, blob_path: Path, victim: Path, how: str) -> str:
    """Delete or corrupt one store chunk that lies wholly inside ``victim``'s data."""
    from ondemand_d.store.local import LocalStore
    data, body = blob_path.read_bytes(), victim.read_bytes()
    start = data.find(body[:EROFS_CHUNK])
    assert start >= 0 and data[start:start + len(body)] == body, "victim not contiguous"
    st = LocalStore(store, create=False)
    (_, blob_id), = st.get_image(image).devices
    chunk = next(c for c in st.get_blob(blob_id).chunks
                 if c.offset >= start and c.end <= start + len(body))
    path = st.chunk_path(chunk.digest)
    if how == "missing":
        path.unlink()
    else:
        raw = bytearray(path.read_bytes())
        raw[100:108] = bytes(b ^ 0xFF for b in raw[100:108])
        path.write_bytes(bytes(raw))
    return chunk.digest


def prepare_inputs(base: Path) -> dict[str, Any]:
    """Build trees, images and stores under ``base``; return the manifest the guest reads."""
    trees, images, store = base / "trees", base / "images", base / "store"
    images.mkdir(parents=True)
    _write_tree(trees / "small", 1, 40, 300_000)
    _write_tree(trees / "big", 2, 320, 100_000)        # ~16 MB, hundreds of files
    for i in range(MANY):
        _write_tree(trees / f"many{i}", 100 + i, 12, 20_000)
    bad_tree = trees / "bad"
    _write_tree(bad_tree, 3, 20, 50_000)
    rng = random.Random(4)
    (bad_tree / "victim-missing.bin").write_bytes(rng.randbytes(3 << 20))
    (bad_tree / "victim-corrupt.bin").write_bytes(rng.randbytes(3 << 20))

    formats = {
        "flat": [],
        "noinline": ["-Enoinline_data"],
        "chunked": [f"--chunksize={EROFS_CHUNK}"],
        # Compressed plain images, as erofs-utils users make them: the kernel decompresses,
        # the daemon serves raw blocks; the prefill walks their map headers and indexes.
        "lz4": ["-zlz4hc"],
        "lz4tail": ["-zlz4hc", "-Eztailpacking"],
    }
    for name, opts in formats.items():
        _mkfs(images / f"{name}.erofs", trees / "small", *opts)
        _import(store, name, images / f"{name}.erofs")
    # metadata image + --blobdev data blob, mounted with device=KEY
    for name, tree in [("blobdev", "small"), ("persist", "small"), ("big", "big"),
                       ("killme", "big")]:
        _mkfs(images / f"{name}.erofs", trees / tree, f"--chunksize={EROFS_CHUNK}",
              f"--blobdev={images / (name + '.blob')}")
        _import(store, name, images / f"{name}.erofs", f"{images / (name + '.blob')}={name}-data")
    # share domain: two images (different metadata) whose data blob is the same file content
    for name, uuid in [("dom-a", "11111111-2222-3333-4444-555555555555"),
                       ("dom-b", "66666666-7777-8888-9999-000000000000")]:
        _mkfs(images / f"{name}.erofs", trees / "small", f"-U{uuid}",
              f"--chunksize={EROFS_CHUNK}", f"--blobdev={images / (name + '.blob')}")
    a_blob, b_blob = (images / "dom-a.blob").read_bytes(), (images / "dom-b.blob").read_bytes()
    assert a_blob == b_blob, "mkfs.erofs made different data blobs for the same tree"
    assert (images / "dom-a.erofs").read_bytes() != (images / "dom-b.erofs").read_bytes()
    _import(store, "dom-a", images / "dom-a.erofs", f"{images / 'dom-a.blob'}=shared-data")
    _import(store, "dom-b", images / "dom-b.erofs", f"{images / 'dom-b.blob'}=shared-data")
    for i in range(MANY):
        _mkfs(images / f"many{i}.erofs", trees / f"many{i}")
        _import(store, f"many{i}", images / f"many{i}.erofs")
    # a store whose chunks for two files are missing / corrupt
    _mkfs(images / "bad.erofs", bad_tree, f"--chunksize={EROFS_CHUNK}",
          f"--blobdev={images / 'bad.blob'}")
    # (the victims' chunks are unique to them, so damaging them harms no other image)
    _import(store, "bad", images / "bad.erofs", f"{images / 'bad.blob'}=bad-data")
    damaged = {
        "missing": _damage(store, "bad", images / "bad.blob", bad_tree / "victim-missing.bin", "missing"),
        "corrupt": _damage(store, "bad", images / "bad.blob", bad_tree / "victim-corrupt.bin", "corrupt"),
    }
    manifest = {
        "store": str(store), "damaged": damaged,
        "trees": {t.name: _manifest(t) for t in trees.iterdir()},
        "sources": {t.name: str(t) for t in trees.iterdir()},
    }
    (base / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def checks(guest: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    results = tmp_path_factory.mktemp("scenarios")
    started = time.monotonic()
    prepare_inputs(results / "inputs")
    prepared = time.monotonic() - started
    outcome = guest.checks(__file__, results_dir=results)
    print(f"\nscenarios: inputs prepared on the host in {prepared:.1f} s; guest run "
          f"{outcome.result.seconds:.1f} s (init at {outcome.result.boot_seconds} s)",
          file=sys.stderr)
    return outcome


def test_formats_flat_chunked_inline_noinline_blobdev(checks: Any) -> None:
    """Flat, no-inline, chunk-based, lz4 (with and without ztailpacking) and blobdev images
    import, mount by fsid, read back exactly; a plain image's prefill walks its metadata."""
    data = checks.passed("check_formats")
    assert set(data["read"]) == {"flat", "noinline", "chunked", "lz4", "lz4tail", "blobdev"}


def test_share_domain_opens_shared_blob_once(checks: Any) -> None:
    """Two images in one domain_id share a data blob: one OPEN, CLOSE only after last umount."""
    data = checks.passed("check_share_domain")
    assert data["shared_opens"] == 1


def test_eight_images_and_remount(checks: Any) -> None:
    """Eight images mounted at once all read correctly; fsid/domain_id mounts can remount."""
    checks.passed("check_many_and_remount")


def test_unknown_fsid_fails_promptly(checks: Any) -> None:
    """A mount of an fsid the store lacks fails within seconds; the log names the key."""
    checks.passed("check_unknown_fsid")


def test_missing_and_corrupt_chunks_give_eio(checks: Any) -> None:
    """Missing / corrupt chunks: EIO for the affected file, others fine, daemon still serving."""
    checks.passed("check_bad_chunks")


def test_cache_persists_across_daemon_restart(checks: Any) -> None:
    """After a restart the second read pass is served from the cache file: no READs at all."""
    data = checks.passed("check_persistence")
    assert data["first_reads"] > 0 and data["second_reads"] == 0


def test_eight_parallel_readers(checks: Any) -> None:
    """Eight threads read a 300+ file, ~16 MB tree concurrently; every byte is right."""
    checks.passed("check_parallel_readers")


def test_shared_daemon_exits_0_on_sigterm(checks: Any) -> None:
    """The daemon that served the first six checks drains and exits 0 on SIGTERM."""
    assert checks.record("teardown").get("status") == "passed", checks.record("teardown")


def test_daemon_killed_then_new_daemon(checks: Any) -> None:
    """Killed daemon: uncached reads error out (no hang); after remount a new daemon serves."""
    checks.passed("check_daemon_killed")


# ---------------------------------------------------------------- guest side (runs as root)


def _inputs(ctx: Any) -> dict[str, Any]:
    return json.loads((ctx.out.parent / "inputs" / "manifest.json").read_text())


_SHARED: list[Daemon] = []


def _shared(ctx: Any) -> Daemon:
    """One daemon for the checks that need no restart (Python start-up under TCG costs 3-8 s).

    Only one process may hold /dev/cachefiles, so checks that run their own daemons come last
    and stop this one first. Its log is per-check via mark(); teardown() stops it (SIGTERM,
    exit 0 expected).
    """
    inp = _inputs(ctx)
    if not _SHARED or not _SHARED[0].alive():
        cache = Path(os.environ.get("ODG_CACHE", "/mnt/cache")) / "shared-fscache"
        _SHARED[:] = [Daemon(Path(inp["store"]), cache, ctx.out.parent / "shared-daemon.log",
                             tag="shared").start()]
    _SHARED[0].mark()
    return _SHARED[0]


def teardown() -> None:
    """Stop the shared daemon: SIGTERM must drain and exit 0."""
    if _SHARED and _SHARED[0].alive():
        rc = _SHARED[0].stop()
        assert rc == 0, f"shared daemon exited {rc} on SIGTERM"


def _own_daemon(ctx: Any, log: str = "daemon.log") -> Daemon:
    """A daemon of the check's own (stops the shared one: one device opener at a time)."""
    teardown()
    return Daemon(Path(_inputs(ctx)["store"]), ctx.cache / "fscache", ctx.out / log,
                  tag=ctx.name.replace("check_", "t-"))


def _check_tree(mnt: str, expected: dict[str, str]) -> int:
    got = tree_digests(Path(mnt))
    missing = sorted(set(expected) - set(got))[:5]
    extra = sorted(set(got) - set(expected))[:5]
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])[:5]
    assert not (missing or extra or wrong), f"{mnt}: missing {missing} extra {extra} wrong {wrong}"
    return len(got)


def _mount(target: str, fsid: str, **kw: Any) -> None:
    rc = mount_erofs(target, fsid, **kw)
    assert rc == 0, f"mount fsid={fsid} {kw} at {target}: {errname(rc)}"


def _umount(target: str) -> None:
    rc = umount(target)
    assert rc == 0, f"umount {target}: {errname(rc)}"


def _log_tail(daemon: Daemon, n: int = 30) -> str:
    return daemon.log_tail(n)


@guard(120)
def check_formats(ctx: Any) -> None:
    inp = _inputs(ctx)
    ctx.data["read"] = {}
    daemon = _shared(ctx)
    for name in ("flat", "noinline", "chunked", "lz4", "lz4tail", "blobdev"):
        mnt = f"/mnt/{name}"
        devices = (f"{name}-data",) if name == "blobdev" else ()
        _mount(mnt, name, devices=devices)
        try:
            ctx.data["read"][name] = _check_tree(mnt, inp["trees"]["small"])
            assert os.readlink(f"{mnt}/link") == "d0/e0/f0000.bin"
            assert os.path.isdir(f"{mnt}/emptydir")
            if name != "blobdev":
                # The umount's CLOSE cancels a prefill still running (under TCG it can
                # outlast the reads): let it finish, so what it wrote can be checked.
                opened = daemon.events("opened", key=name)[-1]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not daemon.events(
                    "prefilled", blob=opened["blob"]
                ):
                    time.sleep(0.1)
        finally:
            _umount(mnt)
    # A plain image is its own bootstrap: its prefill chose the metadata, not the file data,
    # and wrote no more than that (none of it if the READs of the tree wrote those chunks
    # first: a writer that finds a chunk written writes nothing).
    ctx.data["prefilled"] = {}
    for name in ("flat", "noinline", "chunked", "lz4", "lz4tail"):
        opened = daemon.events("opened", key=name)[-1]
        (pre, *_) = daemon.events("prefilled", blob=opened["blob"])
        ctx.data["prefilled"][name] = (pre.get("bytes"), opened["size"], pre.get("note"))
        assert pre["outcome"] == "ok" and str(pre.get("note")).startswith("metadata"), pre
        meta = int(str(pre["note"]).split()[1])  # "metadata: N bytes"
        assert 0 < meta < opened["size"] // 2, pre
        assert 0 <= pre["bytes"] <= meta, pre
    ctx.data["events"] = len(daemon.events())
    assert daemon.alive()


@guard(90)
def check_share_domain(ctx: Any) -> None:
    inp = _inputs(ctx)
    daemon = _shared(ctx)
    for name in ("dom-a", "dom-b"):
        _mount(f"/mnt/{name}", name, domain="dom", devices=("shared-data",))
    for name in ("dom-a", "dom-b"):
        _check_tree(f"/mnt/{name}", inp["trees"]["small"])
    opens = daemon.events("opened", key="shared-data")
    ctx.data["shared_opens"] = len(opens)
    assert len(opens) == 1, f"shared blob OPENed {len(opens)} times:\n{_log_tail(daemon)}"
    shared_obj = opens[0]["object_id"]
    _umount("/mnt/dom-a")
    time.sleep(0.5)
    closed = [e for e in daemon.events("closed") if e.get("object_id") == shared_obj]
    assert not closed, f"shared blob CLOSEd while dom-b is mounted: {closed}"
    _check_tree("/mnt/dom-b", inp["trees"]["small"])
    _umount("/mnt/dom-b")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [
            e for e in daemon.events("closed") if e.get("object_id") == shared_obj]:
        time.sleep(0.1)
    closed = [e for e in daemon.events("closed") if e.get("object_id") == shared_obj]
    assert len(closed) == 1, f"shared blob not CLOSEd after the last umount:\n" \
                             f"{_log_tail(daemon)}"
    assert daemon.alive()


@guard(150)
def check_many_and_remount(ctx: Any) -> None:
    inp = _inputs(ctx)
    daemon = _shared(ctx)
    for i in range(8):
        _mount(f"/mnt/many{i}", f"many{i}")
    for i in range(8):
        _check_tree(f"/mnt/many{i}", inp["trees"][f"many{i}"])
    # remount (MS_REMOUNT | MS_RDONLY) with the same fsid / domain_id options
    ms_rdonly, ms_remount = 1, 32
    rc = mount_in_child("none", "/mnt/many0", "erofs", "fsid=many0",
                        flags=ms_remount | ms_rdonly)
    ctx.data["remount_fsid"] = errname(rc)
    _mount("/mnt/dom-a", "dom-a", domain="dom", devices=("shared-data",))
    rc2 = mount_in_child("none", "/mnt/dom-a", "erofs",
                         "fsid=dom-a,domain_id=dom,device=shared-data",
                         flags=ms_remount | ms_rdonly)
    ctx.data["remount_domain"] = errname(rc2)
    _check_tree("/mnt/many0", inp["trees"]["many0"])
    _check_tree("/mnt/dom-a", inp["trees"]["small"])
    assert rc == 0 and rc2 == 0, ctx.data
    # umount and mount again by fsid: served again, from the cache files as they are
    for target in ("/mnt/many0", "/mnt/dom-a"):
        _umount(target)
    daemon.mark()
    _mount("/mnt/many0", "many0")
    _mount("/mnt/dom-a", "dom-a", domain="dom", devices=("shared-data",))
    drop_caches()
    _check_tree("/mnt/many0", inp["trees"]["many0"])
    _check_tree("/mnt/dom-a", inp["trees"]["small"])
    # Both were read whole before: the remount writes nothing (the anon fd's lseek shows
    # the cache file's data; its fstat describes the anon inode, size 0).
    written = [(e["event"], e.get("bytes")) for e in daemon.events()
               if e.get("event") in ("read_completed", "prefilled", "read_ahead")]
    ctx.data["remount_written"] = written
    assert all(n == 0 for _, n in written), written
    for target in ["/mnt/dom-a", *(f"/mnt/many{i}" for i in range(8))]:
        _umount(target)
    assert daemon.alive()


@guard(60)
def check_unknown_fsid(ctx: Any) -> None:
    inp = _inputs(ctx)
    daemon = _shared(ctx)
    started = time.monotonic()
    rc = mount_erofs("/mnt/nope", "no-such-image", timeout=20)
    ctx.data["mount"] = errname(rc)
    ctx.data["seconds"] = round(time.monotonic() - started, 2)
    assert rc is not None, "mount of an unknown fsid hung"
    assert rc != 0, "mount of an unknown fsid succeeded"
    assert ctx.data["seconds"] < 10
    named = [e for e in daemon.events() if e.get("key") == "no-such-image"]
    assert named, f"the daemon log does not name the key:\n{_log_tail(daemon)}"
    ctx.data["logged"] = named
    assert daemon.alive()
    _mount("/mnt/flat", "flat")     # and it still serves
    _check_tree("/mnt/flat", inp["trees"]["small"])
    _umount("/mnt/flat")
    assert daemon.alive()


@guard(120)
def check_bad_chunks(ctx: Any) -> None:
    inp = _inputs(ctx)
    expected = inp["trees"]["bad"]
    daemon = _shared(ctx)
    _mount("/mnt/bad", "bad", devices=("bad-data",))
    for victim in ("victim-missing.bin", "victim-corrupt.bin"):
        started = time.monotonic()
        verdict, _ = read_in_child(f"/mnt/bad/{victim}", timeout=30)
        seconds = round(time.monotonic() - started, 2)
        ctx.data[victim] = {"verdict": verdict, "seconds": seconds}
        assert verdict == "EIO", f"{victim}: {verdict} after {seconds} s\n{_log_tail(daemon)}"
        assert seconds < 15
    others = {k: v for k, v in expected.items() if not k.startswith("victim")}
    got = {}
    for rel in others:
        got[rel] = hashlib.sha256(Path("/mnt/bad", rel).read_bytes()).hexdigest()
    assert got == others, "files beside the damaged ones read wrong"
    failed = [e for e in daemon.events("read_completed") if e.get("outcome") != "ok"]
    ctx.data["failed_reads"] = len(failed)
    assert failed, "no failed READ in the daemon log"
    assert daemon.alive(), "daemon died on a bad chunk"
    _umount("/mnt/bad")
    assert daemon.alive()


@guard(240)
def check_parallel_readers(ctx: Any) -> None:
    inp = _inputs(ctx)
    expected = inp["trees"]["big"]
    daemon = _shared(ctx)
    _mount("/mnt/big", "big", devices=("big-data",))
    errors: list[str] = []

    def reader(seed: int) -> None:
        names = sorted(expected)
        random.Random(seed).shuffle(names)
        for rel in names:
            try:
                digest = hashlib.sha256(Path("/mnt/big", rel).read_bytes()).hexdigest()
            except OSError as exc:
                errors.append(f"{rel}: {exc}")
                continue
            if digest != expected[rel]:
                errors.append(f"{rel}: wrong bytes")

    started = time.monotonic()
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctx.data["seconds"] = round(time.monotonic() - started, 2)
    ctx.data["files"] = len(expected)
    ctx.data["bytes"] = sum(Path("/mnt/big", r).stat().st_size for r in expected)
    ctx.data["reads"] = len(daemon.events("read_completed"))
    assert not errors, errors[:10]
    _umount("/mnt/big")
    assert daemon.alive()


@guard(120)
def check_persistence(ctx: Any) -> None:
    inp = _inputs(ctx)
    first = _own_daemon(ctx).start()
    try:
        _mount("/mnt/p", "persist", devices=("persist-data",))
        _check_tree("/mnt/p", inp["trees"]["small"])
        _umount("/mnt/p")
        ctx.data["first_reads"] = len(first.events("read_completed"))
        assert first.stop() == 0
    finally:
        first.kill()
    second = _own_daemon(ctx, "daemon2.log").start()
    try:
        drop_caches()
        _mount("/mnt/p", "persist", devices=("persist-data",))
        _check_tree("/mnt/p", inp["trees"]["small"])
        _umount("/mnt/p")
        reads = second.events("read_completed")
        ctx.data["second_reads"] = len(reads)
        ctx.data["second_read_sample"] = reads[:5]
        assert not reads, f"second pass sent {len(reads)} READs"
        assert second.stop() == 0
    finally:
        second.kill()



@guard(150)
def check_daemon_killed(ctx: Any) -> None:
    inp = _inputs(ctx)
    expected = inp["trees"]["big"]
    names = sorted(expected, key=lambda r: -os.path.getsize(Path(inp["sources"]["big"], r)))
    cached, uncached = names[0], names[1]
    daemon = _own_daemon(ctx).start()
    try:
        _mount("/mnt/k", "killme", devices=("killme-data",))
        data = Path("/mnt/k", cached).read_bytes()
        assert hashlib.sha256(data).hexdigest() == expected[cached]
        daemon.kill()
        started = time.monotonic()
        verdict, _ = read_in_child(f"/mnt/k/{uncached}", timeout=30)
        ctx.data["uncached_read"] = verdict
        ctx.data["seconds"] = round(time.monotonic() - started, 2)
        assert verdict != "hung", "read of uncached data hung after the daemon was killed"
        assert verdict != "ok", "read of uncached data succeeded with no daemon"
    finally:
        daemon.kill()
    rc = umount("/mnt/k")
    ctx.data["umount"] = errname(rc)
    assert rc == 0, f"umount after the daemon died: {errname(rc)}"
    second = _own_daemon(ctx, "daemon2.log").start()
    try:
        _mount("/mnt/k", "killme", devices=("killme-data",))
        for rel in (cached, uncached):
            got = hashlib.sha256(Path("/mnt/k", rel).read_bytes()).hexdigest()
            assert got == expected[rel], f"{rel} wrong after the new daemon started"
        _umount("/mnt/k")
        assert second.stop() == 0
    finally:
        second.kill()

