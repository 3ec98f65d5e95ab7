# SPDX-License-Identifier: Apache-2.0
"""The `ondemand-d` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ondemand_d
from ondemand_d.config import DEFAULT_CONFIG_PATH, Config, load
from ondemand_d.errors import ConfigError, DeviceError, OndemandError
from ondemand_d.store.local import DEFAULT_CHUNK_SIZE, LocalStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_DEVICE = 0, 1, 2, 3, 4


def _size(text: str) -> int:
    """`1048576`, `64K`, `1M`, `1G`."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        if text[-1:].lower() in units:
            return int(text[:-1]) * units[text[-1].lower()]
        return int(text)
    except ValueError:
        msg = f"not a size: {text!r} (e.g. 1048576, 64K, 1M)"
        raise argparse.ArgumentTypeError(msg) from None


class _Version(argparse.Action):
    """--version, resolved only when asked for (the lookup is slow)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"ondemand-d {ondemand_d.__version__}")
        parser.exit()


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ondemand-d",
        description="A cachefiles on-demand daemon: serves EROFS images, lazily, from a "
        "content-addressed store of verified chunks.",
        epilog="Run 'ondemand-d COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    p.add_argument(
        "--store", type=Path, default=None,
        help="store directory (default: $ONDEMAND_D_STORE, the config file's 'store', "
        "or /var/lib/ondemand-d/store)",
    )
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config file (default: {DEFAULT_CONFIG_PATH} if it exists)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", help="serve images to the kernel over /dev/cachefiles",
                       description="Bind /dev/cachefiles in on-demand mode and answer the "
                       "kernel's OPEN/READ/CLOSE requests from the store until SIGTERM.")
    s.add_argument("--cache-dir", type=Path, help="cachefiles cache directory (ext4/xfs/btrfs, "
                   "not tmpfs; default /var/cache/ondemand-d)")
    s.add_argument("--tag", help="cachefiles cache tag (default ondemand-d)")
    s.add_argument("--device", type=Path, help="the devnode (default /dev/cachefiles)")
    s.add_argument("--concurrency", type=int, help="READs filled at once (default 64)")
    s.add_argument("--io-threads", type=int, help="threads for store and cache I/O (default 4)")
    s.add_argument("--prefetch", action="store_true", default=None,
                   help="write whole data blobs in the background after OPEN")
    s.add_argument("--readahead", type=_size, metavar="SIZE",
                   help="after each READ, write this much of what follows (default 4M; 0: off)")
    s.add_argument("--no-prefill-bootstrap", dest="prefill_bootstrap", action="store_false",
                   default=None, help="do not write bootstraps whole after OPEN")
    s.add_argument("--log-format", choices=("auto", "json", "console"),
                   help="auto: readable on a TTY, JSON lines otherwise")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="debug shows each step of every READ")
    s.add_argument("--native", choices=("auto", "cffi", "python"),
                   help="READ fill backend (default auto: the C shim when built)")
    s.add_argument("--images", dest="images_dir", type=Path, metavar="DIR",
                   help="serve the EROFS image files in DIR by name (fsid=FILE), without "
                   "importing and WITHOUT verifying anything (for debugging kernels and images)")

    i = sub.add_parser("import", help="ingest an EROFS image made by mkfs.erofs",
                       description="Ingest an EROFS image (and the data blobs of a --blobdev "
                       "image) into the store, mountable with fsid=NAME.")
    i.add_argument("image", type=Path, help="the EROFS image (the metadata image for --blobdev)")
    i.add_argument("--name", required=True, help="image name; mount with -o fsid=NAME")
    i.add_argument("--blob", action="append", default=[], metavar="PATH[=KEY]",
                   help="a data blob, in device-table order; KEY is the device= name to "
                   "mount with (default: the slot's tag, else the blob's id)")
    i.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE,
                   help="chunk size in the store (default 1M; a multiple of 4K)")
    i.add_argument("--replace", action="store_true", help="replace an image of the same name")

    ls = sub.add_parser("ls", help="list images and blobs in the store")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    _add_lazy_commands(sub, argv)
    return p


# Commands whose modules pull in heavy imports (aiohttp, the builder): each is
# imported only when it is the command being run, so `serve` starts fast.
_LAZY_COMMANDS = {
    "build": ("ondemand_d.image.command", "add_arguments", "run",
              "build a deduplicated EROFS image into the store"),
    "push": ("ondemand_d.registry.command", "add_push_arguments", "run_push",
             "push an image to an OCI registry"),
    "add": ("ondemand_d.registry.command", "add_add_arguments", "run_add",
            "register a remote image; its data is fetched lazily on READ"),
    "demo": ("ondemand_d.guest.demo", "add_arguments", "run",
             "show the whole flow end to end (in the test guest when this kernel "
             "lacks on-demand support)"),
    "status": ("ondemand_d.control.commands", "add_status_arguments", "run_status",
               "the running daemon: kernel features, images and bytes cached, counters"),
    "inflight": ("ondemand_d.control.commands", "add_inflight_arguments", "run_inflight",
                 "the running daemon's READs not yet completed, oldest first"),
    "metrics": ("ondemand_d.control.commands", "add_metrics_arguments", "run_metrics",
                "the running daemon's counters in the Prometheus text format"),
    "trace": ("ondemand_d.control.trace_cli", "add_arguments", "run",
              "the running daemon's request flow, live (--kernel: with the kernel's side)"),
    "cull": ("ondemand_d.control.cull", "add_arguments", "run",
             "free the cache files of an image, or of every unused blob (--unused)"),
}
# Commands that talk to a running daemon (or run the demo) and do not open the store.
_NO_STORE = {"demo", "status", "inflight", "metrics", "trace", "cull"}


def _add_lazy_commands(sub: Any, argv: Sequence[str]) -> None:
    import importlib  # noqa: PLC0415

    for name, (module, add_args, run, text) in _LAZY_COMMANDS.items():
        parser = sub.add_parser(name, help=text, description=text)
        if name in argv:
            mod = importlib.import_module(module)
            getattr(mod, add_args)(parser)
            parser.set_defaults(run=getattr(mod, run), no_store=name in _NO_STORE)


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    text = None
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    flags = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
    return load(text, os.environ, flags, source=str(path))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return its exit code (0 ok, 1 failed, 2 usage, 3 config, 4 device)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(argv).parse_args(argv)
    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"ondemand-d: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command != "serve":
        # Other commands talk to a person: warnings on stderr, stdout keeps the result.
        from ondemand_d import log  # noqa: PLC0415

        log.configure("console" if sys.stderr.isatty() else "json", "warning", stream="stderr",
                      cache=False)
    try:
        if args.command == "serve":
            return _serve(cfg)
        if getattr(args, "no_store", False):
            return int(args.run(args, cfg))
        store = LocalStore(cfg.store)
        if args.command == "import":
            return _import(args, store)
        if args.command == "ls":
            return _ls(args, store)
        return int(args.run(args, store))
    except DeviceError as exc:
        print(f"ondemand-d: {exc}", file=sys.stderr)
        return EXIT_DEVICE
    except OndemandError as exc:
        print(f"ondemand-d {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PermissionError as exc:
        print(f"ondemand-d {args.command}: {exc.filename}: permission denied "
              "(the store and the device need root)", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _serve(cfg: Config) -> int:
    from ondemand_d import daemon, log  # noqa: PLC0415 - keep other commands light

    log.configure(cfg.log_format, cfg.log_level, observe=True)  # type: ignore[arg-type]
    return daemon.run(cfg)


def _import(args: argparse.Namespace, store: LocalStore) -> int:
    from ondemand_d.importer import import_image, mount_command  # noqa: PLC0415

    blobs: list[tuple[Path, str | None]] = []
    for spec in args.blob:
        path, _, key = spec.partition("=")
        blobs.append((Path(path), key or None))
    image = import_image(store, args.name, args.image, blobs, chunk_size=args.chunk_size,
                         replace=args.replace)
    sizes = [store.get_blob(b).size for b in image.blob_ids]
    print(f"imported {image.name}: bootstrap {image.bootstrap[:12]} ({sizes[0]} bytes), "
          f"{len(image.devices)} data blob(s) ({sum(sizes[1:])} bytes) into {store.root}")
    print(f"mount it with: {mount_command(image)}")
    return EXIT_OK


def _ls(args: argparse.Namespace, store: LocalStore) -> int:
    images: list[dict[str, Any]] = []
    for image in store.images():
        blobs: list[dict[str, Any]] = []
        for role, key, blob_id in [("bootstrap", image.name, image.bootstrap),
                                   *(("data", k, b) for k, b in image.devices)]:
            blob = store.get_blob(blob_id)
            local = sum(1 for c in blob.chunks if store.has_chunk(c.digest))
            blobs.append({"role": role, "key": key, "blob": blob_id, "size": blob.size,
                          "chunks": len(blob.chunks), "chunks_local": local})
        images.append({"name": image.name, "blobs": blobs})
    if args.json:
        print(json.dumps({"store": str(store.root), "images": images}, indent=2))
        return EXIT_OK
    for img in images:
        total = sum(b["size"] for b in img["blobs"])
        print(f"{img['name']}  {len(img['blobs'])} blob(s), {total} bytes")
        for b in img["blobs"]:
            print(f"  {b['role']:9} {b['blob'][:16]}  {b['size']:>12} bytes  "
                  f"{b['chunks']:>6} chunks ({b['chunks_local']} local)  key={b['key']}")
    print(f"{len(images)} image(s) in {store.root}")
    return EXIT_OK
