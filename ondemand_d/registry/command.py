# SPDX-License-Identifier: Apache-2.0
"""CLI glue for `ondemand-d push` and `ondemand-d add`; cli.py wires these in.

Both print progress to stderr and one summary line to stdout and return 0; a failure is
an OndemandError whose message says why (never a credential). Registry settings come from the
configuration's [registry] table; the flags here override it for one run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ondemand_d.errors import ConfigError, UsageError
from ondemand_d.registry import reference
from ondemand_d.registry.add import AddResult, add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig, default_docker_config
from ondemand_d.registry.push import PushResult, human_size, push
from ondemand_d.store.limits import ImageBudget
from ondemand_d.store.local import LocalStore

if TYPE_CHECKING:
    from ondemand_d.cli import Context


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--docker-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="Docker-style config.json with registry credentials "
        "(default: $DOCKER_CONFIG/config.json or ~/.docker/config.json)",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        metavar="PEM",
        help="extra CA certificates to trust for the registry's TLS",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="speak plain HTTP to this registry (always so for loopback)",
    )


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `push NAME REGISTRY/REPO:TAG` arguments to a subcommand parser."""
    parser.add_argument("name", help="image name in the local store")
    parser.add_argument("reference", help="REGISTRY/REPO:TAG to push to")
    parser.add_argument(
        "--no-compress",
        dest="compress",
        action="store_false",
        help="upload chunks uncompressed (default: zstd per chunk)",
    )
    _connection_arguments(parser)


def add_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `add REGISTRY/REPO:TAG [--name NAME]` arguments to a subcommand parser."""
    parser.add_argument("reference", help="REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:... to add")
    parser.add_argument(
        "--name", default=None, help="local image name / fsid (default: from REPO:TAG)"
    )
    parser.add_argument("--replace", action="store_true", help="replace an image of the same name")
    _connection_arguments(parser)
    from ondemand_d.cli import budget_arguments  # noqa: PLC0415 - cli imports this module

    budget_arguments(parser)


def _config(args: argparse.Namespace, ctx: Context, ref: reference.Reference) -> RegistryConfig:
    base = ctx.cfg.registry
    return dataclasses.replace(
        base,
        docker_config=args.docker_config or base.docker_config or default_docker_config(),
        ca_file=args.ca_file or base.ca_file,
        insecure=base.insecure | ({ref.registry} if args.insecure else set()),
    )


def _reference(text: str) -> reference.Reference:
    """A reference typed on the command line; a malformed one is a usage error."""
    try:
        return reference.parse(text)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_push(args: argparse.Namespace, ctx: Context) -> int:
    """Push image `args.name` from the store; return 0 (errors raise OndemandError)."""
    ref = _reference(args.reference)
    store = ctx.store()
    result = asyncio.run(_push(args, _config(args, ctx, ref), store, ref))
    print(
        f"pushed {args.name} to {ref.registry}/{ref.repository}@{result.manifest_digest}: "
        f"{result.layers} layers, {result.uploaded} uploaded "
        f"({human_size(result.bytes_uploaded)}), {len(result.skipped)} already present; "
        f"image data {human_size(result.bytes_blobs)}"
    )
    return 0


async def _push(
    args: argparse.Namespace, config: RegistryConfig, store: LocalStore, ref: reference.Reference
) -> PushResult:
    async with RegistryClient(config) as client:
        return await push(store, args.name, ref, client, compress=args.compress, progress=_progress)


def run_add(args: argparse.Namespace, ctx: Context) -> int:
    """Register `args.reference` in the store (metadata only); return 0."""
    ref = _reference(args.reference)
    store = ctx.store(create=True)
    result = asyncio.run(_add(args, _config(args, ctx, ref), store, ref, ctx.cfg.max_chunk,
                              ctx.budget(args)))
    print(
        f"added {ref} as {result.name} ({result.manifest_digest}): {result.blobs} blobs, "
        f"{human_size(result.bytes_downloaded)} downloaded, "
        f"{human_size(result.bytes_remote)} left in the registry to fetch on demand"
    )
    return 0


async def _add(args: argparse.Namespace, config: RegistryConfig, store: LocalStore,
               ref: reference.Reference, max_chunk: int, budget: ImageBudget) -> AddResult:
    async with RegistryClient(config) as client:
        return await add(store, ref, client, name=args.name, replace=args.replace,
                         max_chunk=max_chunk, budget=budget)
