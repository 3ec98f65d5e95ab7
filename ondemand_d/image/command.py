# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d build SOURCE... --name NAME`: the CLI edge of the image builder."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, TextIO

from ondemand_d import setting
from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.chunking import DEFAULT_BASE_CHUNK, check_base_chunk
from ondemand_d.image.report import human_bytes
from ondemand_d.image.sources import open_source
from ondemand_d.image.xattrs import DEFAULT_FINGERPRINT_NAME, FingerprintPrefix

if TYPE_CHECKING:
    from ondemand_d.cli import Context


#: The daemon reads, verifies and writes a whole chunk per READ: keep chunks in memory's reach.
MAX_CHUNK_FLAG = 64 << 20


def parse_size(text: str) -> int:
    """`1048576`, `64K`, `1M`, `1MiB` -> bytes; a power of two from 4 KiB to 64 MiB."""
    try:
        size = setting.parse_size(text)
    except ValueError:
        msg = f"not a size: {text!r} (e.g. 65536, 64K, 1M)"
        raise argparse.ArgumentTypeError(msg) from None
    try:
        if size > MAX_CHUNK_FLAG:
            raise ValueError(f"at most {setting.show_size(MAX_CHUNK_FLAG)}")
        return check_base_chunk(size)
    except ValueError as exc:
        msg = f"bad chunk size {text!r}: {exc} (a power of two from 4K to 64M)"
        raise argparse.ArgumentTypeError(msg) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build an EROFS image into the store: a bootstrap with all metadata and at most one "
        "new data blob holding only the chunks the store does not have yet."
    )
    parser.add_argument(
        "source", nargs="+", metavar="SOURCE",
        help="a directory, an OCI image layout directory, or layer tarballs "
        "(tar, tar.gz, tar.zst) applied in the order given",
    )
    parser.add_argument("--name", required=True, help="image name; mount with -o fsid=NAME")
    parser.add_argument(
        "--chunk-size", type=parse_size, default=DEFAULT_BASE_CHUNK, metavar="SIZE",
        help="base chunk size large shareable files are split at (a power of two from 4K to "
        "64M; default 1M)",
    )
    parser.add_argument(
        "--fingerprint", action="store_true",
        help="add per-file fingerprint xattrs (odfp2: size + store chunk digests) for "
        "page-cache sharing (Linux 7.0 -o inode_share,domain_id=; needs erofs-utils >= 1.7 to fsck)",
    )
    parser.add_argument(
        "--fingerprint-name", default=DEFAULT_FINGERPRINT_NAME.decode(), metavar="XATTR",
        help=f"fingerprint xattr name (default {DEFAULT_FINGERPRINT_NAME.decode()}, hidden "
        "from userspace; e.g. trusted.erofs.fingerprint to make it visible)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--replace", action="store_true", help="replace an image of the same name")


def run(args: argparse.Namespace, ctx: Context) -> int:
    """Build; print the report (stdout) and progress (stderr). Errors propagate as ImageError."""
    store = ctx.store(create=True)
    options = BuildOptions(
        base_chunk=args.chunk_size,
        fingerprint=FingerprintPrefix(args.fingerprint_name.encode()) if args.fingerprint else None,
        replace=args.replace,
    )
    progress = _Progress(args.name, sys.stderr)
    with open_source(args.source, spool_dir=store.root / "tmp") as root:
        report = build_image(root, store, args.name, options, progress)
    progress.done()
    if report.new_blob:  # the store's count of chunks, as `ls` shows it
        report.new_blob_chunks = len(store.get_blob(report.new_blob).chunks)
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True))
    else:
        print(report.summary())
        # The device tags are the blob ids, which the daemon resolves: no device= needed.
        print(f"mount it with: mount -t erofs none -o fsid={args.name} /mnt")
    return 0


class _Progress:
    """A line on stderr every couple of seconds, only for builds that take that long."""

    INTERVAL = 2.0

    def __init__(self, name: str, out: TextIO) -> None:
        self._name = name
        self._out = out
        self._start = self._last = time.monotonic()
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < self.INTERVAL:
            return
        self._last = now
        self._shown = True
        pct = 100 * done // total if total else 100
        rate = done / max(now - self._start, 1e-9)
        print(f"building {self._name}: {human_bytes(done)} of {human_bytes(total)} ({pct}%), "
              f"{human_bytes(int(rate))}/s", file=self._out, flush=True)

    def done(self) -> None:
        if self._shown:
            print(f"building {self._name}: done", file=self._out, flush=True)
