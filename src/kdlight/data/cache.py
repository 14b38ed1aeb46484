"""The decoded-archive cache: one ``.npz`` of uint8 arrays per archive version, in the data
folder (by default one per user, see :func:`kdlight.data.default_data_dir`).

Decoding the 60,000 JPEGs takes about 17 s and reading the cache well under one, so the
cache must never be trusted further than it can be checked:

- Its name carries the archive's :func:`archive_fingerprint`: a changed archive gets a new
  cache instead of the old arrays.
- A cache that cannot be read, or holds anything but a whole decoded archive, is decoded
  again and replaced, after one warning that names it.
- It is written through :func:`kdlight.runs.files.atomic_open`, so readers see it whole or not at
  all; the temporary files of writers killed mid-write are removed by the next load once
  they are :data:`STALE_AFTER_S` old (a younger one may belong to a live writer).
- A folder that cannot be written (read-only, full) costs the cache, not the run: the
  decoded arrays are used as they are, after one warning that names the folder.
"""

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from lightning_utilities.core.rank_zero import rank_zero_only

from kdlight.errors import one_line
from kdlight.runs.files import atomic_open, remove_stale_temporaries

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Part of every fingerprint: change it when the decoded arrays change meaning, so that
#: caches written by older code are not read as current ones.
CACHE_FORMAT = "kdlight-decoded-archive-v2"
#: Temporaries older than this (seconds since their last write) belong to killed writers.
STALE_AFTER_S = 60.0
#: Bytes read from the end of an archive file for its fingerprint; a gzip file ends with
#: the CRC-32 and length of everything it holds.
TAIL_BYTES = 64


def archive_fingerprint(path: Path, tag: str = "") -> str:
    """16 hex digits that change whenever the archive's content may have changed, or ``tag``
    does (the label space it is decoded into: see :class:`kdlight.data.sources.DatasetSpec`;
    no tag, CIFAR-10's, gives the fingerprints of caches written before tags).

    A folder: the relative path, size and modification time (ns) of every file below it,
    hashed. (The folder's own size and time do not change when a class folder deep below it
    is deleted or an image is replaced.) A file: its size, modification time (ns) and last
    :data:`TAIL_BYTES` bytes; for a ``.tar.gz`` these hold the CRC-32 of the whole tar, so
    even a rewrite that keeps the size and the time is noticed.
    """
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0".encode())
    if tag:
        digest.update(f"{tag}\0".encode())
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file():
                stat = file.stat()
                relative = file.relative_to(path).as_posix()
                digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    else:
        stat = path.stat()
        digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with path.open("rb") as file:
            file.seek(max(0, stat.st_size - TAIL_BYTES))
            digest.update(file.read())
    return digest.hexdigest()[:16]


def cache_file(archive: Path, cache_dir: Path, tag: str = "") -> Path:
    """The cache of this version of ``archive`` (decoded for ``tag``):
    ``<cache_dir>/<name>-<fingerprint>.npz``."""
    return cache_dir / f"{archive.name.split('.')[0]}-{archive_fingerprint(archive, tag)}.npz"


def read_cache(cache: Path, parse: Callable[[dict[str, np.ndarray]], T]) -> T | None:
    """``parse`` of the arrays in ``cache``, or None when there is no cache or it cannot be
    read; ``parse`` raises (any exception) on arrays that are not a whole decoded archive.

    Also removes the stale temporaries of killed writers beside it."""
    remove_stale_temporaries(cache.parent, older_than=STALE_AFTER_S)
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as arrays:
            return parse({key: arrays[key] for key in arrays.files})
    except Exception as err:  # a damaged zip raises many types (BadZipFile, EOFError, ...)
        _warn(f"data cache {cache} cannot be read ({one_line(err)}): decoding the archive again")
        return None


def write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``cache`` whole or not at all (a folder that cannot take it is
    not an error: the caller has the arrays already)."""
    try:
        with atomic_open(cache, "wb") as file:
            np.savez(file, **arrays)
    except OSError as err:
        _warn(
            f"cannot write the data cache in {cache.parent} ({one_line(err)}): using the "
            "decoded data uncached; to cache it, set paths.data_dir (or KDLIGHT_DATA) to a "
            "folder that can hold it"
        )


def _warn(message: str) -> None:
    """One warning line, from the first process only: every DDP process loads the data.

    (Lightning sets ``rank_zero_only.rank`` when it is imported, as every DDP process has
    done by now; a process without Lightning is a single process.)"""
    if getattr(rank_zero_only, "rank", 0) == 0:
        log.warning(message)
