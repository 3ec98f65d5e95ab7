# SPDX-License-Identifier: Apache-2.0
"""`GET /status`: what the daemon is, what the kernel offers, what is cached, what it did."""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ondemand_d
from ondemand_d import cachedir
from ondemand_d.config import Config
from ondemand_d.control.observe import Observer
from ondemand_d.control.server import ControlServer, json_ok, state
from ondemand_d.device import KernelFeatures
from ondemand_d.errors import StoreError
from ondemand_d.store.locations import remote_places, where

if TYPE_CHECKING:
    from aiohttp import web


@dataclass
class Runtime:
    """The running daemon as the views see it (`server.state["runtime"]`)."""

    cfg: Config
    service: Any  # ondemand_d.service.Service
    device: Any  # ondemand_d.device.Device, or a test's fake
    features: KernelFeatures
    observer: Observer
    restored: bool = False
    backend: str = ""
    frontends: dict[str, Any] = field(default_factory=dict)  # e.g. fanotify's mounts
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)


def runtime(request: web.Request) -> Runtime:
    return state(request)["runtime"]  # type: ignore[no-any-return]


def open_objects(service: Any) -> list[dict[str, Any]]:
    """The objects the kernel holds open now: id, fd, blob, key (loop thread only)."""
    return [
        {"object_id": o.object_id, "fd": o.fd, "blob": o.blob_id, "size": o.size,
         "key": o.cookie_key.decode("utf-8", "backslashreplace"),
         "volume": o.volume_key.decode("utf-8", "backslashreplace")}
        for o in service.objects.open_objects()
    ]


def cached_by_blob(rt: Runtime, objects: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """blob id -> bytes cached and cache files (I/O: run in a thread).

    Open objects are measured through their anon fds (the kernel forwards lseek to the
    cache file, which may not be linked into the tree yet); the others through the
    files under `cache/`, matched to blobs by cookie key.
    """
    out: dict[str, dict[str, int]] = {}

    def note(blob_id: str, cached: int) -> None:
        entry = out.setdefault(blob_id, {"cached_bytes": 0, "cache_files": 0})
        entry["cached_bytes"] = max(entry["cached_bytes"], cached)
        entry["cache_files"] += 1

    open_keys = set()
    for obj in objects:
        try:
            note(obj["blob"], cachedir.data_bytes(obj["fd"]))
            open_keys.add((obj["volume"], obj["key"]))
        except OSError:
            continue  # closed meanwhile; the file below counts it
    store = rt.service.store
    for f in cachedir.cache_files(rt.cfg.cache_dir):
        if f.key is None or (f.volume, f.key) in open_keys:
            continue
        try:
            blob_id = store.resolve(f.key.encode()).blob_id
            note(blob_id, cachedir.file_data_bytes(f.path))
        except (StoreError, OSError):
            continue  # a key the store no longer knows, or a file culled meanwhile
    return out


def images(rt: Runtime, cached: dict[str, dict[str, int]],
           open_blobs: set[str]) -> list[dict[str, Any]]:
    out = []
    store = rt.service.store
    for image in store.images():
        blobs = []
        for role, key, blob_id in [("bootstrap", image.name, image.bootstrap),
                                   *(("data", k, b) for k, b in image.devices)]:
            try:
                blob = store.get_blob(blob_id)
                size, place = blob.size, where(store, image, blob)
            except (StoreError, OSError):
                size, place = -1, "none (its blob record is damaged)"
            c = cached.get(blob_id) or {
                # After a restart, an object the previous instance opened may still be held by
                # the kernel; its cache file is an unlinked tmpfile until the kernel lets go of
                # it (umount) and no fd of ours reaches it until it is reopened: unknown, not 0.
                "cached_bytes": None if rt.restored else 0, "cache_files": 0}
            blobs.append({"role": role, "key": key, "blob": blob_id, "size": size,
                          "open": blob_id in open_blobs, "location": place, **c})
        out.append({"name": image.name, "blobs": blobs,
                    "locations": remote_places(b["location"] for b in blobs),
                    "size": sum(b["size"] for b in blobs if b["size"] > 0),
                    "cached_bytes": sum(b["cached_bytes"] or 0 for b in blobs),
                    "cached_unknown": sum(b["cached_bytes"] is None for b in blobs)})
    return out


async def images_now(rt: Runtime) -> tuple[list[dict[str, Any]], int]:
    """Every image with its blobs and bytes cached, and the number of open objects.

    The object table is read here, on the loop; the files in a thread.
    """
    objects = open_objects(rt.service)
    open_blobs = {o["blob"] for o in objects}

    def collect() -> list[dict[str, Any]]:
        return images(rt, cached_by_blob(rt, objects), open_blobs)

    return await asyncio.get_running_loop().run_in_executor(None, collect), len(objects)


def kernel_view(rt: Runtime) -> dict[str, Any]:
    """The kernel features of the front ends that run: fscache's (restore, share domains,
    tracing) only when /dev/cachefiles is served, fanotify's when its front end runs."""
    fscache = not getattr(rt.device, "absent", False)
    out: dict[str, Any] = (rt.features.as_dict() if fscache
                           else {"release": rt.features.release})
    out["fscache"] = fscache
    fan = rt.frontends.get("fanotify")
    out["fanotify_pre_content"] = fan is not None
    if fan is None and rt.frontends.get("fanotify_unavailable"):
        out["fanotify_unavailable"] = rt.frontends["fanotify_unavailable"]
    return out


async def status_view(request: web.Request) -> web.Response:
    rt = runtime(request)
    found, n_open = await images_now(rt)
    kernel = kernel_view(rt)
    return json_ok({
        "version": ondemand_d.__version__,
        "pid": os.getpid(),
        "started": rt.started,
        "uptime_s": round(time.monotonic() - rt.started_monotonic, 3),
        "kernel": kernel,
        "device": str(rt.cfg.device) if kernel["fscache"] else None,
        "cache_dir": str(rt.cfg.cache_dir),
        "tag": rt.cfg.tag,
        "store": str(rt.cfg.store),
        "backend": rt.backend,
        "restored": rt.restored,
        "objects_open": n_open,
        "reads_in_flight": rt.service.objects.reads_in_flight,
        # I/O threads stuck in a local store read past local_read_timeout (a hung store)
        "stuck_local_reads": rt.service.fetcher.stuck_reads,
        "images": found,
        "counters": rt.observer.snapshot(),
        "frontends": {name: fe.status() for name, fe in rt.frontends.items()
                      if hasattr(fe, "status")},
    })


def add_routes(server: ControlServer) -> None:
    server.add_route("GET", "/status", status_view)
