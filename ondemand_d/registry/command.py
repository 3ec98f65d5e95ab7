# SPDX-License-Identifier: Apache-2.0
"""CLI glue for `ondemand-d push` and `ondemand-d add`; cli.py wires these in.

Both print progress to stderr and one summary line to stdout, and return an
exit status: 0 done, 1 failed (the message says why; never a credential).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ondemand_d.errors import OndemandError
from ondemand_d.registry import reference
from ondemand_d.registry.add import AddResult, add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig, default_docker_config
from ondemand_d.registry.push import PushResult, human_size, push
from ondemand_d.store.local import LocalStore


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


def _config(args: argparse.Namespace, ref: reference.Reference) -> RegistryConfig:
    return RegistryConfig(
        docker_config=args.docker_config or default_docker_config(),
        ca_file=args.ca_file,
        insecure=frozenset({ref.registry}) if args.insecure else frozenset(),
    )


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_push(args: argparse.Namespace, store: LocalStore) -> int:
    """Push image `args.name` from `store`; return the exit status."""
    try:
        ref = reference.parse(args.reference)
        result = asyncio.run(_push(args, store, ref))
    except OndemandError as exc:
        print(f"ondemand-d push: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"pushed {args.name} to {ref.registry}/{ref.repository}@{result.manifest_digest}: "
        f"{result.layers} layers, {result.uploaded} uploaded "
        f"({human_size(result.bytes_uploaded)}), {len(result.skipped)} already present; "
        f"image data {human_size(result.bytes_blobs)}"
    )
    return 0


async def _push(
    args: argparse.Namespace, store: LocalStore, ref: reference.Reference
) -> PushResult:
    async with RegistryClient(_config(args, ref)) as client:
        return await push(store, args.name, ref, client, compress=args.compress, progress=_progress)


def run_add(args: argparse.Namespace, store: LocalStore) -> int:
    """Register `args.reference` in `store` (metadata only); return the exit status."""
    try:
        ref = reference.parse(args.reference)
        result = asyncio.run(_add(args, store, ref))
    except OndemandError as exc:
        print(f"ondemand-d add: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"added {ref} as {result.name} ({result.manifest_digest}): {result.blobs} blobs, "
        f"{human_size(result.bytes_downloaded)} downloaded, "
        f"{human_size(result.bytes_remote)} left in the registry to fetch on demand"
    )
    return 0


async def _add(args: argparse.Namespace, store: LocalStore, ref: reference.Reference) -> AddResult:
    async with RegistryClient(_config(args, ref)) as client:
        return await add(store, ref, client, name=args.name, replace=args.replace)
