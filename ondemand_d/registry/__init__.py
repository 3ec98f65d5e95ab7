# SPDX-License-Identifier: Apache-2.0
"""Lazy pull from OCI registries: push/add images, fetch chunks with HTTP Range GETs.

Module map (no module imports one to its right):

* reference - REGISTRY/REPO:TAG and @sha256 references (pure)
* media     - media types, chunk tables, config blob, manifest (pure; the format doc)
* config    - RegistryConfig (frozen)
* _limiter  - per-registry slots with demand-before-prefetch priority; byte-rate cap
* auth      - docker config.json credentials, WWW-Authenticate challenges, tokens
* _http     - status checks, bounded bodies, Retry-After, error descriptions
* client    - RegistryClient: the request loop (retries, redirects, auth) and reads
* upload    - blob and manifest uploads (push only)
* source    - RegistrySource, the daemon's RemoteSource; make_source()
* push, add - the two commands' logic; command - their CLI glue
"""
