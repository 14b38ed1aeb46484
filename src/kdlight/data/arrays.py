"""Splits held in memory: :class:`ArrayDataset` batches (or, for a split kept on the
accelerator, :class:`IndexBatch` indices) and the seeded class-stratified subsets that small
evaluations use."""

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdlight.data.sources import Split

#: The seed of every evaluation subset (``data.eval_subset``), apart from the run's seed, so
#: that every run with the same subset size evaluates the same images.
EVAL_SUBSET_SEED = 0


def image_digests(split: Split) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each image's pixels and label."""
    pixels = split.images.reshape(len(split), -1)
    return [
        hashlib.blake2b(image.tobytes() + label.tobytes(), digest_size=16).digest()
        for image, label in zip(pixels, split.labels, strict=True)
    ]


def split_digest(split: Split) -> str:
    """The content of a whole split (its images and labels, in order), for caches keyed by
    it (about 0.3 s for CIFAR's 50,000 training images)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(split.images).tobytes())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()[:16]


def images_id(source: str, digests: list[bytes], total: int) -> str:
    """``<source>:<len(digests)>/<total>:<16 hex digits>``: the hash of the images' sorted
    ``digests``, so the same images give the same string in whatever order they come."""
    combined = hashlib.sha256(b"".join(sorted(digests))).hexdigest()[:16]
    return f"{source}:{len(digests)}/{total}:{combined}"


def stratified_subset(split: Split, size: int, digests: list[bytes] | None = None) -> np.ndarray:
    """Sorted indices of ``size`` images of ``split``, an equal share of each class as far as
    possible (class sizes differ by at most one unless a class runs out of images).

    The choice depends on the images alone: they are put in an order fixed by their
    ``digests`` (:func:`image_digests`), so an archive stored in another order gives the same
    subset, then shuffled within each class by a generator seeded with
    :data:`EVAL_SUBSET_SEED`. The subset takes every class's first image, then every class's
    second, and so on (classes in a seeded order, which decides who gets the leftover
    images), so the subset of ``size`` images is part of the subset of ``size + 1``.
    """
    digests = image_digests(split) if digests is None else digests
    canonical = np.array(sorted(range(len(split)), key=digests.__getitem__), dtype=np.int64)
    labels = split.labels[canonical]
    rng = np.random.default_rng(EVAL_SUBSET_SEED)
    classes, class_of = np.unique(labels, return_inverse=True)
    class_turn = rng.permutation(len(classes))[class_of]
    position = np.empty(len(labels), dtype=np.int64)  # the image's place in its class's queue
    for index in range(len(classes)):
        members = np.flatnonzero(class_of == index)
        position[members] = rng.permutation(len(members))
    chosen = np.lexsort((class_turn, position))[:size]  # by position, then by class turn
    return np.sort(canonical[chosen])


@dataclass
class IndexBatch:
    """A batch of indices into a split that is kept whole on the accelerator
    (``on_device=True``): only the indices travel, the images never leave the device.
    ``with_index``: the batch keeps its indices once gathered (see ``ArrayDataset``)."""

    split: str
    indices: Tensor
    with_index: bool = False

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "IndexBatch":
        """The indices on ``device``, copied without waiting on a GPU. (Lightning passes
        ``non_blocking`` only to plain tensors; a blocking copy would wait, every step, for
        the GPU to finish all the work queued before it.)"""
        device = torch.device(device)
        non_blocking = non_blocking and device.type == "cuda"
        indices = self.indices.to(device, non_blocking=non_blocking)
        return IndexBatch(self.split, indices, self.with_index)


class ArrayDataset(Dataset):
    """uint8 ``(N, 3, 32, 32)`` images and int64 labels, fetched a whole batch at a time.

    ``__getitems__`` lets a ``DataLoader`` index a batch with one tensor gather instead of
    ``batch_size`` Python calls; :func:`collate_batch` then passes the batch through. With
    ``indices_only`` it yields an :class:`IndexBatch` instead, for data held on the device.
    With ``with_index`` (off unless set) a batch also holds the images' positions in the
    dataset, int64: ``(images, labels, indices)``, or an ``IndexBatch`` that keeps them.
    """

    def __init__(self, split: Split, name: str, indices_only: bool = False) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(split.labels)
        self.name = name
        self.indices_only = indices_only
        self.with_index = False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...] | IndexBatch:
        index = torch.as_tensor(indices, dtype=torch.int64)
        if self.indices_only:
            return IndexBatch(self.name, index, self.with_index)
        batch = self.images[index], self.labels[index]
        return (*batch, index) if self.with_index else batch


def collate_batch(batch: tuple[Tensor, ...] | IndexBatch) -> tuple[Tensor, ...] | IndexBatch:
    """The batch is already stacked by :meth:`ArrayDataset.__getitems__`."""
    return batch
