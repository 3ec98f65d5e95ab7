# SPDX-License-Identifier: Apache-2.0
"""The images whose bootstrap each cachefiles volume opened, in order, kept across restarts.

A data blob of a share domain is fetched from the location of the domain's first
image (mount order) that lists it (store/locations.py). After a restart the kernel
re-sends a data blob's OPEN on its next READ, maybe long before a bootstrap that is
cached whole is opened again, or never. So the order is written to a file in the
cache directory before a new bootstrap's OPEN is answered, and read back at start:
the successor locates each blob where its predecessor did.

The file is checked on load like any input: a regular file of bounded size, image
names that are names, at most MAX_PER_VOLUME of them per volume and MAX_NAMES in
all; anything else is dropped with a log line. A volume it does not explain reads
from the one location all its images agree on, or fails (EIO), never elsewhere.
"""
from __future__ import annotations

import itertools
import json
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import structlog

from ondemand_d.errors import StoreError
from ondemand_d.store.model import check_name

log = structlog.get_logger()

FILE_NAME = "volume-images.json"
MAX_PER_VOLUME = 256  # images noted per volume; later ones are not (their blobs fail closed)
MAX_NAMES = 16384  # names noted in all; the least recently noted volumes go first
MAX_VOLUME_KEY = 1024  # bytes (the kernel's are "erofs,<domain or fsid>")
MAX_FILE_BYTES = 8 << 20
_tmp_names = itertools.count()


class VolumeImages:
    """volume key -> image names in the order their bootstraps were opened there.

    Thread-safe: the service notes and asks from its I/O threads.

    Args:
        path: where the order is kept across restarts; None keeps it in memory only.
    """

    def __init__(self, path: Path | None = None, *, max_names: int = MAX_NAMES,
                 max_per_volume: int = MAX_PER_VOLUME) -> None:
        self.path = path
        self._max_names = max_names
        self._max_per_volume = max_per_volume
        self._volumes: OrderedDict[bytes, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, **limits: int) -> VolumeImages:
        """The order a previous instance left at `path` (none if absent or unusable)."""
        volumes = cls(path, **limits)
        try:
            raw = _read_bounded(path)
        except FileNotFoundError:
            return volumes
        except (OSError, ValueError) as exc:
            log.warning("volume_images_ignored", path=str(path), error=str(exc),
                        consequence="blobs reopened before their bootstrap read from the "
                        "location all their images agree on, or EIO")
            return volumes
        dropped = volumes._restore(raw)
        if dropped:
            log.warning("volume_images_dropped", path=str(path), entries=dropped,
                        reason="malformed or over the limits")
        return volumes

    def opened(self, volume: bytes) -> tuple[str, ...]:
        """The images `volume` opened a bootstrap of, first mount first."""
        with self._lock:
            return tuple(self._volumes.get(volume, ()))

    def note(self, volume: bytes, image: str) -> None:
        """`volume` opened the bootstrap of `image`: remember it (and save) if it is new."""
        with self._lock:
            names = self._volumes.get(volume)
            if names is not None and image in names:
                return
            if len(volume) > MAX_VOLUME_KEY:
                return
            if names is None:
                names = self._volumes[volume] = []
            elif len(names) >= self._max_per_volume:
                log.warning("volume_images_full", volume=_text(volume), image=image,
                            consequence="its blobs that other images of the volume also list "
                            "read from the location they all agree on, or EIO")
                return
            names.append(image)
            self._volumes.move_to_end(volume)
            self._evict()
            self._save()

    # -- the file ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"volumes": [{"volume": k.decode("utf-8", "surrogateescape"), "images": v}
                            for k, v in self._volumes.items()]}

    def _restore(self, raw: Any) -> int:
        """Take the sound entries of a loaded file; return how many were dropped."""
        entries = raw.get("volumes") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            return 1
        dropped = 0
        for entry in entries:
            try:
                volume, images = entry["volume"], entry["images"]
                if not isinstance(volume, str) or not isinstance(images, list):
                    raise TypeError
                key = volume.encode("utf-8", "surrogateescape")
                if len(key) > MAX_VOLUME_KEY:
                    raise TypeError
                names = list(dict.fromkeys(check_name(str(n)) for n in images))
            except (KeyError, TypeError, StoreError, UnicodeError):
                dropped += 1
                continue
            if names and len(names) <= self._max_per_volume:
                self._volumes[key] = names
                self._volumes.move_to_end(key)
            else:
                dropped += 1
        return dropped + self._evict()

    def _evict(self) -> int:
        """Forget the least recently noted volumes over MAX_NAMES (they fail closed)."""
        evicted = 0
        total = sum(len(v) for v in self._volumes.values())
        while total > self._max_names:
            volume, names = self._volumes.popitem(last=False)
            total -= len(names)
            log.warning("volume_images_evicted", volume=_text(volume))
            evicted += 1
        return evicted

    def _save(self) -> None:
        """Replace the file atomically (no fsync: after a power loss nothing is mounted)."""
        if self.path is None:
            return
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{next(_tmp_names)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("volume_images_not_saved", path=str(self.path), error=str(exc),
                        consequence="after a restart, blobs reopened before their bootstrap "
                        "read from the location all their images agree on, or EIO")


def _read_bounded(path: Path) -> Any:
    """JSON from a regular file of at most MAX_FILE_BYTES (no FIFO, no symlink, no giant).

    Raises:
        FileNotFoundError: there is no file.
        OSError, ValueError: it is not a small regular file of JSON.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            msg = "not a regular file"
            raise ValueError(msg)
        if st.st_size > MAX_FILE_BYTES:
            msg = f"{st.st_size} bytes, more than the {MAX_FILE_BYTES} allowed"
            raise ValueError(msg)
        data = b""
        while len(data) <= MAX_FILE_BYTES and (part := os.read(fd, MAX_FILE_BYTES + 1 - len(data))):
            data += part
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        msg = f"more than the {MAX_FILE_BYTES} bytes allowed"
        raise ValueError(msg)
    try:
        return json.loads(data)
    except RecursionError:
        msg = "nested too deeply"
        raise ValueError(msg) from None


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")
