"""Teach once: the frozen teacher's logits for each training image as the augmentation
showed it, cached on disk and shared by every run that asks the same teacher the same
question.

kdlight's augmentation is discrete: a crop offset ``(dy, dx)`` in 9 x 9 positions and a
flip, 162 variants of each training image (:func:`kdlight.data.augment.random_crop_flip`
says which one a batch drew). So the teacher's answer for ``(image, dy, dx, flip)`` can be
cached exactly: a hit is the same teacher, in eval mode, on the same pixels.

The cache is two memory-mapped files under the data folder, named by a key of everything
that changes the answer (the teacher checkpoint's content, the whole training split's
images, the augmentation, the precision and the number of classes), so another teacher or
data set never reads them. A row is an image's place in the whole training split, so
every seed's train/validation split shares one cache:

- ``<key>.logits``: ``(images, 162, classes)`` in the precision the teacher computes in
  (:func:`storage_dtype`: bfloat16 under ``bf16-mixed``, float32 under ``32-true``), so
  storing loses nothing and a bf16 cache takes half the disk (162 MB for CIFAR-10);
- ``<key>.filled``: ``(images, 162)`` bytes, 1 where the logits are written.

A variant's logits are written before its flag, so a fill killed in between leaves the
flag at 0 and the variant is computed again; processes that fill one cache at once write
the same values. It is filled lazily: a batch computes the teacher only for its misses,
never more teacher forwards than without the cache.
"""

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdlight.data.augment import crop_flip

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


def cache_key(**facts) -> str:
    """A short hash of what the cached answers depend on (JSON-able values)."""
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / key
        self.num_classes, self.dtype = num_classes, dtype
        shape = (num_images, VARIANTS)
        self.logits = self._map(".logits", _ON_DISK[dtype], (*shape, num_classes))
        self.filled = self._map(".filled", np.uint8, shape)
        self.positions = positions.cpu() if positions is not None else None
        self.lookups = self.hits = 0

    def _rows(self, index: Tensor) -> np.ndarray:
        index = index.cpu()
        return (self.positions[index] if self.positions is not None else index).numpy()

    def _map(self, suffix: str, dtype, shape: tuple[int, ...]) -> np.memmap:
        """The file ``<key><suffix>`` mapped as ``shape``: made at its full size (sparse,
        zeros) when missing; a file of another size is not this cache's and is refused."""
        path = self.path.with_suffix(suffix)
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        with open(path, "a+b") as file:  # created if missing, never truncated
            if file.seek(0, 2) == 0:
                file.truncate(size)
            elif file.tell() != size:
                raise ValueError(f"{path} holds {file.tell()} bytes, not {size}")
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    def lookup(self, index: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """The cached logits of a batch (zeros where missing) and which were hits, on the CPU."""
        rows, variants = self._rows(index), variant_of(params.cpu()).numpy()
        hit = torch.from_numpy(self.filled[rows, variants].astype(bool))
        stored = torch.from_numpy(self.logits[rows, variants])  # a copy (fancy indexing)
        self.lookups += len(rows)
        self.hits += int(hit.sum())
        return self._decode(stored), hit

    def store(self, index: Tensor, params: Tensor, logits: Tensor) -> Tensor:
        """Write the logits of these images' variants, then mark them filled; return what
        was stored, as float32 (the logits, rounded to the cache's dtype if they were wider)."""
        return self.write(self._rows(index), variant_of(params.cpu()).numpy(), logits)

    def write(self, rows: np.ndarray, variants: np.ndarray, logits: Tensor) -> Tensor:
        """:meth:`store` by the cache's own rows (places in the whole training split)."""
        encoded = logits.detach().to(self.dtype).cpu()
        if self.dtype == torch.bfloat16:
            encoded = encoded.view(torch.uint16)
        self.logits[rows, variants] = encoded.numpy()
        self.filled[rows, variants] = 1
        return self._decode(encoded)

    def _decode(self, stored: Tensor) -> Tensor:
        """Stored logits (bfloat16 as its uint16 bits) -> float32."""
        if self.dtype == torch.bfloat16:
            stored = stored.view(torch.bfloat16)
        return stored.float()

    def missing(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The ``(rows, variants)`` not filled yet, a thousand rows at a time."""
        for start in range(0, len(self.filled), 1000):
            rows, variants = np.nonzero(self.filled[start : start + 1000] == 0)
            if len(rows):
                yield rows + start, variants

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
    for rows, variants in cache.missing():
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
