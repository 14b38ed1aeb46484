"""Teach once: the frozen teacher's logits for each training image as the augmentation
showed it, cached on disk and shared by every run that asks the same teacher the same
question.

kdlight's augmentation is discrete: a crop offset ``(dy, dx)`` in 9 x 9 positions and a
flip, 162 variants of each training image (:func:`kdlight.data.augment.random_crop_flip`
says which one a batch drew). So the teacher's answer for ``(image, dy, dx, flip)`` can be
cached exactly: a hit is the same teacher, in eval mode, on the same pixels.

The cache is two memory-mapped files under the data folder, named by a key of everything
that changes the answer (:func:`kdlight.teacher.frozen.teacher_cache_for`), so another
teacher or data set never reads them. A row is an image's place in the whole training
split, so every seed's train/validation split shares one cache:

- ``<key>.logits``: ``(images, 162, classes)`` in the precision the teacher computes in
  (:func:`storage_dtype`: bfloat16 under ``bf16-mixed``, float32 under ``32-true``), so
  storing loses nothing and a bf16 cache takes half the disk (162 MB for CIFAR-10);
- ``<key>.filled``: ``(images, 162)`` bytes, 1 where the logits are written.

A variant's logits are written before its flag, so a fill killed in between leaves the
flag at 0 and the variant is computed again; processes that fill one cache at once write
the same values. It is filled lazily: a batch computes the teacher only for its misses,
never more teacher forwards than without the cache.

Faults: the files' whole space is reserved on disk when they are made
(``posix_fallocate``), so a write into the map never meets a full disk (which would kill
the process with SIGBUS); they are made beside their place and renamed into it, logits
last, so a cache is never seen half made. A cache whose files have the wrong size is
damaged and made again empty; one on a read-only folder is opened read-only (its hits
used, nothing stored). What cannot be opened or made raises :class:`CacheUnavailable`.
Copy-on-write filesystems (btrfs, ZFS) cannot promise reserved space for overwrites.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdlight.data.augment import crop_flip
from kdlight.errors import KDLightError
from kdlight.runs.files import TEMP_SUFFIX, atomic_open

#: Crop offsets per axis (padding 4: 0..8) and flips: 9 * 9 * 2 variants of an image.
OFFSETS, FLIPS = 9, 2
VARIANTS = OFFSETS * OFFSETS * FLIPS


def variant_of(params: Tensor) -> Tensor:
    """``(N, 3)`` ``(dy, dx, flipped)`` -> ``(N,)`` variant numbers in ``[0, 162)``."""
    dy, dx, flipped = params.long().unbind(1)
    return (dy * OFFSETS + dx) * FLIPS + flipped


def params_of(variants: Tensor) -> Tensor:
    """``(N,)`` variant numbers -> ``(N, 3)`` ``(dy, dx, flipped)``: :func:`variant_of` undone."""
    variants = variants.long()
    return torch.stack(
        [variants // (OFFSETS * FLIPS), variants // FLIPS % OFFSETS, variants % FLIPS], 1
    )


def storage_dtype(precision: str) -> torch.dtype:
    """The dtype a Trainer ``precision`` (``bf16-mixed``, ``32-true``...) computes the
    teacher's logits in, and the cache stores them in: the last layer's output under
    autocast is bfloat16 (``bf16-*``) or float16 (``16-*``), so nothing is rounded away."""
    prefix = str(precision).split("-")[0]
    return {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}.get(
        prefix, torch.float32
    )


#: how each storage dtype lies in its memory map (numpy has no bfloat16: its bits, uint16)
_ON_DISK = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: np.uint16,
}


#: How far a cached logit may lie from the live teacher's before the cache is called
#: damaged (:func:`agreement_tolerance`), as a fraction of the row's largest ``|logit|``.
#: Measured on the 2-core CPU against float64, on resnet8, resnet14, resnet18_half,
#: resnet56, wrn_40_2, vgg13 and mobilenetv2 after a few SGD steps on synthetic images:
#: float32 lies within 1e-6 of the row's scale, float16 within 3e-3, bfloat16 within 2e-2
#: (batch sizes 7 and 512 gave 3e-7 apart in float32, nothing in bfloat16). Two
#: computations (another batch size, kernel, or device of the same precision; not
#: measured on a GPU) differ by up to twice that, and each tolerance leaves a margin of
#: 3.5x (bfloat16) to 30x (float32) over it; garbage, zeros or another image's logits
#: differ by about the row's scale itself.
AGREEMENT = {
    torch.float64: 2.0**-40,
    torch.float32: 2.0**-14,  # 6.1e-5
    torch.float16: 2.0**-5,  # 0.031: also TF32, float32's matmuls on a 10-bit mantissa
    torch.bfloat16: 2.0**-3,  # 0.125
}


def agreement_tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """The tolerance of :data:`AGREEMENT` for logits computed in ``dtype`` on ``device``:
    float32 on a CUDA device that lets convolutions or matmuls use TF32 (PyTorch's default
    for cuDNN convolutions) is computed on a 10-bit mantissa, float16's tolerance."""
    if (
        dtype == torch.float32
        and torch.device(device).type == "cuda"
        and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    ):
        return AGREEMENT[torch.float16]
    return AGREEMENT[dtype]


def disagreement(cached: Tensor, live: Tensor, tolerance: float) -> tuple[int, float]:
    """How many rows of ``cached`` lie farther from ``live`` than ``tolerance`` times the
    row's largest ``|live|`` logit, and the largest such distance (in those units)."""
    scale = live.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    distance = ((cached - live).abs().amax(1) / scale).nan_to_num(nan=float("inf"))
    return int((distance > tolerance).sum()), float(distance.max()) if len(distance) else 0.0


def cache_key(**facts) -> str:
    """A short hash of what the cached answers depend on (JSON-able values)."""
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CacheUnavailable(KDLightError):
    """The cache's files cannot be opened or made here: a full disk, a read-only folder
    without a whole cache in it, a path that is not a folder. A run goes on with the live
    teacher (one warning); ``kdlight-cache-teacher`` stops (one error line)."""


#: errors that say a file may be read but not written
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's ``flock`` while the cache's files are checked or made, so that
    processes opening one cache at once (DDP, runs launched together) do not make or
    rebuild it twice; where the filesystem does not lock, it goes on unlocked."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class TeacherCache:
    """The cached logits of one teacher on one training set (see the module docstring).

    Args:
        folder: where the two files are (made if missing).
        key: their name (:func:`cache_key`).
        num_images, num_classes: the size of the image set the rows stand for and the
            logits' width.
        positions: each training image's row (its place in the whole training split, the
            same whatever the seed's train/validation split); None: the index is the row.
        dtype: what the logits are stored as (:func:`storage_dtype`); the key must say it,
            since the files' size depends on it.

    Raises:
        CacheUnavailable: the files cannot be opened or made (see the module docstring).

    ``writable`` is False for a cache opened read-only (a read-only folder or files, or
    files whose space cannot be reserved): :meth:`lookup` works, :meth:`store` raises.
    ``notes`` says, in lines for the user, what opening it found (rebuilt, read-only).
    """

    def __init__(
        self,
        folder: str | Path,
        key: str,
        num_images: int,
        num_classes: int,
        positions: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.path = Path(folder) / key
        self.dtype = dtype
        shape = (num_images, VARIANTS)
        self.layout = {
            ".logits": (np.dtype(_ON_DISK[dtype]), (*shape, num_classes)),
            ".filled": (np.dtype(np.uint8), shape),
        }
        self.notes: list[str] = []
        self.logits, self.filled = self._open()
        self.writable = self.logits.flags.writeable and self.filled.flags.writeable
        self.positions = positions.cpu() if positions is not None else None
        #: lookups and hits so far; non-finite stored logits found (read as misses)
        self.lookups = self.hits = self.non_finite = 0

    def _rows(self, index: Tensor) -> np.ndarray:
        index = index.cpu()
        return (self.positions[index] if self.positions is not None else index).numpy()

    def _size(self, suffix: str) -> int:
        dtype, shape = self.layout[suffix]
        return int(np.prod(shape)) * dtype.itemsize

    def _open(self) -> tuple[np.memmap, np.memmap]:
        """The two files mapped, read-write where they can be written, else read-only;
        missing ones made, and a damaged pair (a file of another size, or one without
        the other) made again, empty."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a regular file in its place, a read-only parent
            raise CacheUnavailable(f"cannot make the folder {folder}: {_reason(err)}") from None
        with _folder_lock(folder):
            sizes = {suffix: self._size(suffix) for suffix in self.layout}
            found = {suffix: self._found(suffix) for suffix in self.layout}
            if found == sizes:
                return self._map()
            wrong = "; ".join(
                f"{self.path.name}{suffix} "
                + ("is missing" if size is None else f"holds {size} bytes, not {sizes[suffix]}")
                for suffix, size in found.items()
                if size != sizes[suffix]
            )
            damaged = any(size is not None for size in found.values())
            try:
                self._make()
            except OSError as err:
                what = (
                    f"is damaged ({wrong}) and cannot be made again"
                    if damaged
                    else "cannot be made"
                )
                raise CacheUnavailable(
                    f"teacher cache {self.path} {what} here: {_reason(err)}"
                ) from None
            if damaged:
                self.notes.append(
                    f"teacher cache {self.path} was damaged ({wrong}): made again, empty"
                )
            return self._map()

    def _found(self, suffix: str) -> int | None:
        """The size of the file ``<key><suffix>``, None if there is none; something that is
        not a regular file (a folder, a FIFO) cannot be used."""
        path = self.path.with_suffix(suffix)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise CacheUnavailable(f"cannot read {path}: {_reason(err)}") from None
        if not stat.S_ISREG(info.st_mode):
            raise CacheUnavailable(f"{path} is not a regular file")
        return info.st_size

    def _make(self) -> None:
        """Make both files empty at their full size, their space reserved, beside their
        place; rename ``.filled`` into place first and ``.logits`` last, so that a process
        killed in between leaves a pair that reads as damaged, never old flags over new
        logits. Called under the folder's lock: a temporary of this key left in the folder
        is a killed maker's, and goes."""
        for temporary in self.path.parent.glob(f".{self.path.name}.*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                temporary.unlink()
        with atomic_open(self.path.with_suffix(".logits")) as logits:
            os.posix_fallocate(logits.fileno(), 0, self._size(".logits"))
            with atomic_open(self.path.with_suffix(".filled")) as filled:
                os.posix_fallocate(filled.fileno(), 0, self._size(".filled"))

    def _map(self) -> tuple[np.memmap, np.memmap]:
        """Both files mapped read-write, or both read-only where one cannot be written or
        its space cannot be reserved (a cache made by an older kdlight is sparse)."""
        with contextlib.ExitStack() as files:  # the maps keep their own references
            try:
                opened = [files.enter_context(self._open_file(s, os.O_RDWR)) for s in self.layout]
            except OSError as err:
                if err.errno not in _READ_ONLY:
                    raise CacheUnavailable(f"cannot open {err.filename}: {_reason(err)}") from None
                why = f"is read-only ({_reason(err)})"
            else:
                try:
                    for suffix, file in zip(self.layout, opened, strict=True):
                        if os.fstat(file.fileno()).st_blocks * 512 < self._size(suffix):
                            os.posix_fallocate(file.fileno(), 0, self._size(suffix))
                except OSError as err:
                    why = f"cannot reserve its space on disk ({_reason(err)})"
                else:
                    return tuple(
                        np.memmap(file, dtype=dtype, mode="r+", shape=shape)
                        for file, (dtype, shape) in zip(opened, self.layout.values(), strict=True)
                    )
        self.notes.append(
            f"teacher cache {self.path} {why}: its hits are used, the misses computed live "
            "and not stored"
        )
        maps = []
        for suffix, (dtype, shape) in self.layout.items():
            try:
                with self._open_file(suffix, os.O_RDONLY) as file:
                    maps.append(np.memmap(file, dtype=dtype, mode="r", shape=shape))
            except OSError as err:
                raise CacheUnavailable(f"cannot read {err.filename}: {_reason(err)}") from None
        return tuple(maps)

    def _open_file(self, suffix: str, flags: int):
        """``<key><suffix>`` opened with ``flags`` (never blocking on a FIFO put in its place)."""
        path = self.path.with_suffix(suffix)
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CacheUnavailable(f"{path} is not a regular file")
        return os.fdopen(fd, "r+b" if flags & os.O_RDWR else "rb")

    def lookup(self, index: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """The cached logits of a batch (zeros where missing) and which were hits, on the CPU.
        A stored entry that is not finite (NaN, inf: the file was damaged) is read as a
        miss and counted in ``non_finite``, for the caller to report."""
        rows, variants = self._rows(index), variant_of(params.cpu()).numpy()
        hit = torch.from_numpy(self.filled[rows, variants].astype(bool))
        stored = self._decode(torch.from_numpy(self.logits[rows, variants]))  # a copy
        finite = stored.isfinite().all(1)
        self.non_finite += int((hit & ~finite).sum())
        hit &= finite
        self.lookups += len(rows)
        self.hits += int(hit.sum())
        return stored.where(hit.unsqueeze(1), 0.0), hit

    def store(self, index: Tensor, params: Tensor, logits: Tensor) -> Tensor:
        """Write the logits of these images' variants, then mark them filled; return what
        was stored, as float32 (the logits, rounded to the cache's dtype if they were wider)."""
        return self.write(self._rows(index), variant_of(params.cpu()).numpy(), logits)

    def write(self, rows: np.ndarray, variants: np.ndarray, logits: Tensor) -> Tensor:
        """:meth:`store` by the cache's own rows (places in the whole training split)."""
        if not self.writable:
            raise ValueError(f"teacher cache {self.path} is open read-only")
        encoded = self._encode(logits)
        self.logits[rows, variants] = encoded.numpy()
        self.filled[rows, variants] = 1
        return self._decode(encoded)

    def round(self, logits: Tensor) -> Tensor:
        """``logits`` as a hit would read them back (rounded to the cache's dtype, float32,
        on the CPU), without storing them."""
        return self._decode(self._encode(logits))

    def _encode(self, logits: Tensor) -> Tensor:
        """Logits -> what the file holds (bfloat16 as its uint16 bits), on the CPU."""
        encoded = logits.detach().to(self.dtype).cpu()
        return encoded.view(torch.uint16) if self.dtype == torch.bfloat16 else encoded

    def _decode(self, stored: Tensor) -> Tensor:
        """Stored logits (bfloat16 as its uint16 bits) -> float32."""
        if self.dtype == torch.bfloat16:
            stored = stored.view(torch.bfloat16)
        return stored.float()

    @property
    def hit_rate(self) -> float | None:
        """Hits per lookup so far in this process (None before the first)."""
        return self.hits / self.lookups if self.lookups else None


def fill_all(
    cache: TeacherCache,
    images: Tensor,
    teacher: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Fill every entry of ``cache`` not filled yet: each of ``images``' 162 variants
    (:func:`kdlight.data.augment.crop_flip`), through ``teacher`` in batches.

    Args:
        images: the whole training split's uint8 images, ``(rows, C, H, W)``, row ``i``
            being the cache's row ``i``, on the device the teacher runs on.
        teacher: an augmented uint8 batch -> its logits: normalisation and the teacher,
            in the run's precision (under its autocast), as a training step computes them.
        progress: called with (entries done, entries to do) after each batch.
    Returns:
        ``entries`` (all), ``computed`` (this call), ``seconds`` and ``images_per_second``.
    """
    total = int((cache.filled[:] == 0).sum())
    done, start = 0, time.perf_counter()
    for first in range(0, len(cache.filled), 1000):  # a thousand rows' flags at a time
        rows, variants = np.nonzero(cache.filled[first : first + 1000] == 0)
        rows += first
        for at in range(0, len(rows), batch_size):
            chunk, drawn = rows[at : at + batch_size], variants[at : at + batch_size]
            params = params_of(torch.from_numpy(drawn))
            batch = crop_flip(images[torch.from_numpy(chunk).to(images.device)], params)
            cache.write(chunk, drawn, teacher(batch))
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    seconds = time.perf_counter() - start
    return {
        "entries": cache.filled.size,
        "computed": done,
        "seconds": seconds,
        "images_per_second": done / seconds if seconds > 0 else None,
    }
