# SPDX-License-Identifier: Apache-2.0
"""The `ondemand-d` command line.

Conventions every subcommand follows (so that there is one CLI):

* A subcommand is one entry of :data:`COMMANDS`: its name, a one-line help and the module that
  has ``add_arguments(parser)`` and ``run(args, ctx) -> int``. The module is imported only when
  its command runs (``serve`` starts fast).
* ``run`` prints its result on stdout and progress on stderr, ends by saying what it did, and
  returns 0. On failure it raises an :class:`~ondemand_d.errors.OndemandError` whose message is
  one sentence (what is wrong, what to do). :func:`main` prints it as
  ``ondemand-d COMMAND: error: MESSAGE`` (one line, never a traceback) and exits with the
  error's ``exit_code``: 1 failed, 2 usage, 3 configuration, 4 device (README, "Exit codes").
* Global options (``--store``, ``--config``, ``--log-level``) work before or after the command.
* The store: ``ctx.store()`` for commands that read it (there must be one), ``ctx.store(
  create=True)`` for commands that write it. Check inputs before opening it, so that bad input
  leaves the store as it was.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import ondemand_d
from ondemand_d.config import DEFAULT_CONFIG_PATH, KEYS, Config, Key, convert, load
from ondemand_d.errors import (
    EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError, OndemandError, StoreError, UsageError,
)
from ondemand_d.setting import parse_size, show_size
from ondemand_d.store.limits import ImageBudget
from ondemand_d.store.local import DEFAULT_CHUNK_SIZE, LocalStore
from ondemand_d.store.model import PAGE


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: its help line and where its ``add_arguments`` and ``run`` live."""

    help: str
    module: str = __name__
    add_arguments: str = "add_arguments"
    run: str = "run"


#: Every subcommand. Adding one: an entry here and a module with add_arguments and run.
COMMANDS: dict[str, Command] = {
    "serve": Command("serve images to the kernel over /dev/cachefiles",
                     add_arguments="_serve_arguments", run="_serve"),
    "import": Command("ingest an EROFS image made by mkfs.erofs into the store",
                      add_arguments="_import_arguments", run="_import"),
    "build": Command("build a deduplicated EROFS image from a directory, tarballs or an "
                     "OCI layout", "ondemand_d.image.command"),
    "ls": Command("list the store's images and their blobs",
                  add_arguments="_ls_arguments", run="_ls"),
    "push": Command("push an image from the store to an OCI registry",
                    "ondemand_d.registry.command", "add_push_arguments", "run_push"),
    "add": Command("register an image from an OCI registry; its data is fetched on READ",
                   "ondemand_d.registry.command", "add_add_arguments", "run_add"),
    "demo": Command("serve two sample images end to end and show the request flow",
                    "ondemand_d.guest.demo"),
    "mount": Command("mount an image through the running daemon's fanotify front end",
                     "ondemand_d.fanotify.control", "add_mount_arguments", "run_mount"),
    "umount": Command("unmount an image the running daemon mounted (fanotify front end)",
                      "ondemand_d.fanotify.control", "add_umount_arguments", "run_umount"),
    "status": Command("the running daemon: kernel features, images and bytes cached, counters",
                      "ondemand_d.control.commands", "add_status_arguments", "run_status"),
    "inflight": Command("the running daemon's READs not yet completed, oldest first",
                        "ondemand_d.control.commands", "add_inflight_arguments", "run_inflight"),
    "metrics": Command("the running daemon's counters in the Prometheus text format",
                       "ondemand_d.control.commands", "add_metrics_arguments", "run_metrics"),
    "trace": Command("the running daemon's request flow, live (--kernel: with the kernel's "
                     "side)", "ondemand_d.control.trace_cli"),
    "cull": Command("free the cache files of an image, or of every unused blob (--unused)",
                    "ondemand_d.control.cull"),
    "rm": Command("remove images from the store ('gc' then frees what no image uses)",
                  "ondemand_d.store.command", "add_rm_arguments", "run_rm"),
    "gc": Command("free the blobs and chunks no image and no running daemon uses",
                  "ondemand_d.store.command", "add_gc_arguments", "run_gc"),
    "fsck": Command("check every record and chunk of the store; --repair quarantines damage",
                    "ondemand_d.store.command", "add_fsck_arguments", "run_fsck"),
}
#: Global options that take a value (to find the command in argv without parsing it).
_GLOBAL_VALUED = ("--store", "--config", "--log-level")
LOG_LEVELS = KEYS["log_level"].meta["choices"]


@dataclass
class Context:
    """What a command's ``run`` gets besides its arguments: the configuration and the store."""

    cfg: Config
    _stores: dict[bool, LocalStore] = field(default_factory=dict)

    def budget(self, args: argparse.Namespace) -> ImageBudget:
        """The image budget: --max-bootstrap/--max-image if given, else the configuration's."""
        return ImageBudget(args.max_bootstrap or self.cfg.max_bootstrap,
                           args.max_image or self.cfg.max_image)

    def store(self, *, create: bool = False) -> LocalStore:
        """The store named by --store/ONDEMAND_D_STORE/the config file.

        Args:
            create: the command writes: create the store if there is none, and check that
                it can be written (else there must already be a store there).

        Raises:
            ConfigError: no store there, not a directory, or not writable.
        """
        if create not in self._stores:
            self._stores[create] = open_store(self.cfg.store, create=create)
        return self._stores[create]


def open_store(root: Path, *, create: bool) -> LocalStore:
    """Open (or create) the store at ``root``; every problem is one ConfigError sentence."""
    hint = "check --store (or ONDEMAND_D_STORE, or 'store' in the config file)"
    if root.exists() and not root.is_dir():
        msg = f"the store {root} is a file, not a directory: {hint}"
        raise ConfigError(msg)
    if not create and not root.exists():
        msg = f"there is no store at {root}: {hint}; import or build creates one"
        raise ConfigError(msg)
    if create:
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            why = ("is on a read-only filesystem" if _read_only(existing)
                   else "is not writable by this user")
            msg = f"cannot write the store {root}: {existing} {why}; {hint}"
            raise ConfigError(msg)
    try:
        return LocalStore(root, create=create)
    except StoreError as exc:
        msg = f"{exc}: {hint}"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"cannot use the store {root}: {exc.strerror}; {hint}"
        raise ConfigError(msg) from None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ------------------------------------------------------------------------ parsing


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line, exit 2, via UsageError."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Version(argparse.Action):
    """--version, resolved only when asked for (the lookup is slow)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"ondemand-d {ondemand_d.__version__}")
        parser.exit()


def _global_options() -> argparse.ArgumentParser:
    """Options accepted before and after the command (SUPPRESS: a later place never unsets)."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument("--store", default=argparse.SUPPRESS, metavar="DIR",
                   help=f"the store directory (default: $ONDEMAND_D_STORE, the config file's "
                   f"'store', or {KEYS['store'].default})")
    g.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                   help=f"TOML config file (default: {DEFAULT_CONFIG_PATH} if it exists)")
    g.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                   help="log level (serve: default info; other commands: warning)")
    return p


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (the first word that is not a global option)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _GLOBAL_VALUED:
            skip = True
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    common = _global_options()
    p = _Parser(prog="ondemand-d", parents=[common],
                description="A cachefiles on-demand daemon: serves EROFS images, lazily, from "
                "a content-addressed store of verified chunks.",
                epilog="Run 'ondemand-d COMMAND --help' for a command's options. Exit codes: "
                "0 done, 1 failed, 2 usage, 3 configuration, 4 device.")
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        parser = sub.add_parser(name, help=spec.help, description=spec.help + ".",
                                parents=[common])
        if name == command:
            module = importlib.import_module(spec.module)
            getattr(module, spec.add_arguments)(parser)
            parser.set_defaults(run=getattr(module, spec.run))
    return p


def _config(args: argparse.Namespace) -> Config:
    path = getattr(args, "config", None)
    text = None
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            msg = f"cannot read the config file {path}: {why}"
            raise ConfigError(msg) from None
    flags = {k: v for k, v in vars(args).items() if k in KEYS}
    return load(text, os.environ, flags, source=f"config file {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return its exit code (0 done, 1 failed, 2 usage, 3 config, 4 device)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_in(argv)
    prefix = f"ondemand-d {command}" if command else "ondemand-d"
    try:
        args = build_parser(command).parse_args(argv)
        ctx = Context(_config(args))
        if args.command != "serve":
            # Other commands talk to a person: warnings on stderr, stdout keeps the result.
            from ondemand_d import log  # noqa: PLC0415

            log.configure("console" if sys.stderr.isatty() else "json",
                          getattr(args, "log_level", "warning"), stream="stderr", cache=False)
        return int(args.run(args, ctx))
    except OndemandError as exc:
        return _fail(prefix, str(exc), exc.exit_code)
    except OSError as exc:
        return _fail(prefix, _os_error(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail(prefix, "interrupted", EXIT_INTERRUPTED)


def _fail(prefix: str, message: str, code: int) -> int:
    print(f"{prefix}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}{what.lower()}: run as root or fix the permissions"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}{what.lower()}: free some space and run it again"
    return f"{where}{what}"


def size_argument(low: int, high: int, multiple: int = 1) -> Any:
    """An argparse ``type``: a size (``64K``, ``1M``) in low..high, a multiple of ``multiple``."""
    def parse(text: str) -> int:
        try:
            size = parse_size(text)
        except ValueError:
            msg = f"not a size: {text!r} (e.g. 1048576, 64K, 1M)"
            raise argparse.ArgumentTypeError(msg) from None
        if not low <= size <= high or size % multiple:
            unit = f", a multiple of {show_size(multiple)}" if multiple > 1 else ""
            msg = f"{text} is out of range (from {show_size(low)} to {show_size(high)}{unit})"
            raise argparse.ArgumentTypeError(msg)
        return size
    return parse


def budget_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-bootstrap and --max-image of the commands that bring an image into the store."""
    parser.add_argument("--max-bootstrap", type=size_argument(PAGE, 1 << 50), default=None,
                        metavar="SIZE", help="refuse a bootstrap larger than this, decoded "
                        "(default: max_bootstrap of the configuration, 256M)")
    parser.add_argument("--max-image", type=size_argument(PAGE, 1 << 60), default=None,
                        metavar="SIZE", help="refuse an image declaring more than this in all "
                        "(default: max_image of the configuration, 64G)")


# ------------------------------------------------------------------------ serve


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration key (config.py): the same names, types and checks."""
    parser.description = ("Bind /dev/cachefiles in on-demand mode and answer the kernel's "
                          "OPEN/READ/CLOSE requests from the store until SIGTERM. Every flag "
                          "is also a config file key and an ONDEMAND_D_* variable.")
    for key in KEYS.values():
        if key.meta.get("flag"):
            _key_flag(parser, key)


def _key_flag(parser: argparse.ArgumentParser, key: Key) -> None:
    default = key.default
    shown = show_size(default) if key.meta.get("size") and default else default
    text = f"{key.meta.get('doc', '')} (default {shown})" if default not in (None, "") else \
        key.meta.get("doc", "")
    flag = key.flag
    if str(key.field.type) == "bool":
        parser.add_argument(flag, dest=key.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=text)
        return

    def check(raw: str) -> str:
        try:
            convert(key, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{raw!r} {exc}") from None
        return raw

    parser.add_argument(flag, dest=key.name, type=check, default=argparse.SUPPRESS,
                        metavar=key.name.upper().removeprefix("REGISTRY_"),
                        help=text.replace("%", "%%"))


def _serve(args: argparse.Namespace, ctx: Context) -> int:
    from ondemand_d import daemon, log  # noqa: PLC0415 - keep other commands light

    if ctx.cfg.store.exists() or ctx.cfg.store.is_symlink():
        ctx.store()  # a store that cannot be used is a sentence, not a traceback
    # else: the daemon creates it once the device is bound (a fresh StateDirectory= under systemd)
    log.configure(ctx.cfg.log_format, ctx.cfg.log_level,  # type: ignore[arg-type]
                  stream=ctx.cfg.log_target, observe=True)
    return daemon.run(ctx.cfg)


# ------------------------------------------------------------------------ import


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Ingest an EROFS image (and the data blobs of a --blobdev image) into "
                          "the store, mountable with fsid=NAME.")
    parser.add_argument("image", type=Path, help="the EROFS image (the metadata image for "
                        "--blobdev)")
    parser.add_argument("--name", required=True, help="image name; mount with -o fsid=NAME")
    parser.add_argument("--blob", action="append", default=[], metavar="PATH[=KEY]",
                        help="a data blob, in device-table order; KEY is the device= name to "
                        "mount with (default: the slot's tag, else the blob's id)")
    parser.add_argument("--chunk-size", type=size_argument(PAGE, 64 << 20, PAGE),
                        default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                        help="chunk size in the store (4K to 64M, a multiple of 4K; default 1M)")
    parser.add_argument("--replace", action="store_true",
                        help="replace an image of the same name")
    budget_arguments(parser)


def _import(args: argparse.Namespace, ctx: Context) -> int:
    from ondemand_d.importer import check_inputs, import_image, mount_command  # noqa: PLC0415

    blobs: list[tuple[Path, str | None]] = []
    for spec in args.blob:
        path, _, key = spec.partition("=")
        blobs.append((Path(path), key or None))
    budget = ctx.budget(args)
    check_inputs(args.name, args.image, blobs, budget)
    store = ctx.store(create=True)
    image = import_image(store, args.name, args.image, blobs, chunk_size=args.chunk_size,
                         replace=args.replace, max_chunk=ctx.cfg.max_chunk, budget=budget)
    sizes = [store.get_blob(b).size for b in image.blob_ids]
    print(f"imported {image.name}: bootstrap {image.bootstrap[:12]} ({sizes[0]} bytes), "
          f"{len(image.devices)} data blob(s) ({sum(sizes[1:])} bytes) into {store.root}")
    print(f"mount it with: {mount_command(image)}")
    return EXIT_OK


# ------------------------------------------------------------------------ ls


def _ls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _ls(args: argparse.Namespace, ctx: Context) -> int:
    from ondemand_d.errors import StoreError  # noqa: PLC0415
    from ondemand_d.store.locations import remote_places, where  # noqa: PLC0415

    store = ctx.store()
    found, damaged = store.scan_images()
    images: list[dict[str, Any]] = []
    for image in found:
        blobs: list[dict[str, Any]] = []
        for role, key, blob_id in [("bootstrap", image.name, image.bootstrap),
                                   *(("data", k, b) for k, b in image.devices)]:
            try:
                blob = store.get_blob(blob_id)
            except StoreError as exc:
                blobs.append({"role": role, "key": key, "blob": blob_id, "error": str(exc)})
                continue
            local = sum(1 for c in blob.chunks if store.has_chunk(c.digest))
            blobs.append({"role": role, "key": key, "blob": blob_id, "size": blob.size,
                          "chunks": len(blob.chunks), "chunks_local": local,
                          "location": where(store, image, blob)})
        images.append({"name": image.name, "blobs": blobs,
                       "locations": remote_places(b.get("location", "") for b in blobs)})
    bad = [{"record": str(d.path), "error": d.error} for d in damaged]
    if args.json:
        print(json.dumps({"store": str(store.root), "images": images, "damaged": bad}, indent=2))
        return EXIT_OK
    for img in images:
        total = sum(b.get("size", 0) for b in img["blobs"])
        origin = f"  from {', '.join(img['locations'])}" if img["locations"] else ""
        print(f"{img['name']}  {len(img['blobs'])} blob(s), {total} bytes{origin}")
        for b in img["blobs"]:
            if "error" in b:
                print(f"  {b['role']:9} {b['blob'][:16]}  DAMAGED: {b['error']}  key={b['key']}")
                continue
            print(f"  {b['role']:9} {b['blob'][:16]}  {b['size']:>12} bytes  "
                  f"{b['chunks']:>6} chunks ({b['chunks_local']} local)  key={b['key']}")
    for d in bad:
        print(f"damaged record {d['record']}: {d['error']}")
    hint = f"; {len(bad)} damaged record(s): run 'ondemand-d fsck'" if bad else ""
    print(f"{len(images)} image(s) in {store.root}{hint}")
    return EXIT_OK
