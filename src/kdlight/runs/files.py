"""Files written whole or not at all.

Every file kdlight writes (checkpoints, ``metrics.json``, ``config.yaml``, ``error.txt``,
data caches, reports) goes through :func:`atomic_write`: the bytes go to a temporary file
*next to* the destination (same folder, so same filesystem), are flushed to disk, and the
file is renamed into place. A reader, or a run relaunched after a kill or a full disk, sees
either the old whole file or the new whole file, never a part of one, and no temporary
file is left behind when writing fails.
"""

import contextlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

#: Temporary files are named ``.<name>.<random>.tmp`` beside their destination.
TEMP_SUFFIX = ".tmp"
#: The process's umask, read once at import (reading it means setting it, which is not
#: safe while other threads create files).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed,
    synced and renamed onto ``path``; on any error (a full disk, a signal that raises) it is
    removed and ``path`` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes files ('w' or 'wb'), not mode {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        _give_mode(fd, path)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(error, OSError) and error.errno and not error.filename:  # a write names none
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    _sync_folder(path.parent)


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes into a binary file) to
    ``path`` atomically; see :func:`atomic_open`."""
    with atomic_open(path, "wb") as file:
        if callable(data):
            data(file)
        else:
            file.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, record: dict) -> Path:
    """Strict JSON (no ``NaN`` or ``Infinity``: they raise), indented, written atomically."""
    return atomic_write(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def remove_stale_temporaries(folder: str | Path, older_than: float = 0.0) -> None:
    """Delete temporary files that a killed writer left in ``folder`` (not recursively).

    ``older_than``: keep those modified less than this many seconds ago. In a folder that
    other processes write to at the same time (a shared data cache), a recent temporary may
    be one that a live writer is still filling."""
    now = time.time()
    for temp in Path(folder).glob(f".*{TEMP_SUFFIX}"):  # none where there is no folder
        with contextlib.suppress(OSError):
            if older_than <= 0 or now - temp.stat().st_mtime >= older_than:
                temp.unlink()


def _give_mode(fd: int, path: Path) -> None:
    """Give the temporary file the permissions ``open(path, "w")`` would leave: those of the
    file it replaces, or the umask's for a new one. (``mkstemp`` makes it private, 0600,
    which would lock the rest of a group out of checkpoints on shared storage.)"""
    if not hasattr(os, "fchmod"):  # Windows: no POSIX permissions to keep
        return
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_UMASK
    with contextlib.suppress(OSError):  # a filesystem without permissions (FAT, some mounts)
        os.fchmod(fd, mode)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
