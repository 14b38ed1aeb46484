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

- ``<key>.logits``: ``(images, 162, classes)`` float32;
- ``<key>.filled``: ``(images, 162)`` bytes, 1 where the logits are written.

A variant's logits are written before its flag, so a fill killed in between leaves the
flag at 0 and the variant is computed again; processes that fill one cache at once write
the same values. It is filled lazily: a batch computes the teacher only for its misses,
never more teacher forwards than without the cache.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Crop offsets per axis (padding 4: 0..8) and flips: 9 * 9 * 2 variants of an image.
OFFSETS, FLIPS = 9, 2
VARIANTS = OFFSETS * OFFSETS * FLIPS


def variant_of(params: Tensor) -> Tensor:
    """``(N, 3)`` ``(dy, dx, flipped)`` -> ``(N,)`` variant numbers in ``[0, 162)``."""
    dy, dx, flipped = params.long().unbind(1)
    return (dy * OFFSETS + dx) * FLIPS + flipped


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
    """

    def __init__(
        self,
        folder: str | Path,
        key: str,
        num_images: int,
        num_classes: int,
        positions: Tensor | None = None,
    ) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / key
        self.num_classes = num_classes
        shape = (num_images, VARIANTS)
        self.logits = self._map(".logits", np.float32, (*shape, num_classes))
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
        logits = torch.from_numpy(np.array(self.logits[rows, variants]))
        self.lookups += len(rows)
        self.hits += int(hit.sum())
        return logits, hit

    def store(self, index: Tensor, params: Tensor, logits: Tensor) -> None:
        """Write the logits of these images' variants, then mark them filled."""
        rows, variants = self._rows(index), variant_of(params.cpu()).numpy()
        self.logits[rows, variants] = logits.detach().float().cpu().numpy()
        self.filled[rows, variants] = 1

    @property
    def hit_rate(self) -> float | None:
        """Hits per lookup so far in this process (None before the first)."""
        return self.hits / self.lookups if self.lookups else None
