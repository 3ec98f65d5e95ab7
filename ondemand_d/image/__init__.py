# SPDX-License-Identifier: Apache-2.0
"""EROFS image builder: chunk-based, multi-blob, dedup-aware images into the store.

A build turns a source (directory, layer tarballs, OCI layout) into a tree,
places every regular file's chunks (reusing what any blob in the store already
holds), writes at most one new data blob, then the bootstrap (all metadata,
small files inline), then the Image record, all in one store transaction.

Module map, in the order data flows::

    sources.py      picks the source kind -> tree.Node
      source_dir.py   a directory (lstat, xattrs, hard links by st_ino)
      source_tar.py   layer tarballs, whiteouts, opaque dirs, hostile-path checks
      source_oci.py   index.json -> manifest -> layer blobs, digests verified
    tree.py         the in-memory tree; Content reads file bytes on demand
    chunking.py     per-file chunk size and placement (policy in its docstring)
    dedup.py        the chunk dictionary, from the store's locally hashed dedup index
    blobwriter.py   bytes -> 4 KiB aligned, <= 1 MiB store chunks -> Blob
    layout.py       inodes, nids, directory blocks, device table -> bootstrap
    dirent.py       directory block encoding
    xattrs.py       inline xattr bodies, fingerprint prefix
    format.py       the on-disk structs (no I/O), cited from the spec
    build.py        the transaction: place, write blob, bootstrap, Image record
    report.py       BuildReport: summary line and JSON
    command.py      `ondemand-d build` argument parsing and output
    reader.py       reads the images back (tests, tools); materialize.py: blob files
"""
