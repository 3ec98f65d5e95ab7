# SPDX-License-Identifier: Apache-2.0
"""Lazy pull from OCI registries: push/add images, fetch chunks with HTTP Range GETs.

Module map: reference (REGISTRY/REPO:TAG), media (media types, chunk tables; no
I/O), config (RegistryConfig), auth (docker config.json, challenges, tokens),
client (the HTTP client), source (RegistrySource for the daemon), push, add,
command (CLI glue).
"""
