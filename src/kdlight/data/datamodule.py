"""``CIFAR10DataModule``: CIFAR-10 held in memory as uint8 tensors, augmented per batch,
training batches with each image's index on request, and the seeded class-stratified
subsets that small evaluations use."""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from kdlight.data import default_data_dir
from kdlight.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    normalize,
    process_generator,
    random_crop_flip,
)
from kdlight.data.sources import (
    CIFAR10_CLASSES,
    Split,
    load_archive,
    load_torchvision,
    make_synthetic,
)
from kdlight.errors import KDLightError

Source = Literal["torchvision", "archive", "synthetic"]

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


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 (or a synthetic stand-in) for training, validation and testing.

    Args:
        source: ``torchvision`` (the official release), ``archive`` (an image-folder tree or a
            ``.tar.gz`` of one, such as ``shared/data/cifar10-jpeg.tar.gz``) or ``synthetic``.
        data_dir: where torchvision's files and the decoded-archive cache live; None: the
            per-user cache, :func:`kdlight.data.default_data_dir`.
        archive_path: the archive, for ``source=archive``.
        download: let torchvision download the official release.
        val_size: images held out of the 50,000 training images for validation (seeded);
            0 validates on the test set, as the reference study did.
        train_subset: train on this many (seeded) training images only, e.g. for a CPU demo.
        eval_subset: validate and test on this many images only, an equal share per class
            (:func:`stratified_subset`), the same images in every run whatever its seed (the
            validation images are chosen among the seeded held-out ones, all of them if they
            are fewer); None: all of them.
            A shortened evaluation should use this rather than ``limit_test_batches``: the
            test split of an archive is stored class by class, so its first batches hold
            only the first classes.
        batch_size: images per batch (per process when several train together).
        augment: pad-4 random crop and horizontal flip on training batches, drawn under DDP
            from a stream per process (:func:`kdlight.data.augment.process_generator`).
        on_device: keep each split whole on the training device (a GPU) and gather batches
            there; only indices are loaded, so no per-batch host-to-device copy is made.
        drop_last: leave out each epoch's last, smaller training batch (at most
            ``batch_size - 1`` images, different ones each epoch), so that every training
            batch has one shape and torch.compile builds one training graph, not two.
        synthetic_train_size, synthetic_test_size: sizes for ``source=synthetic``.

    Attributes:
        with_index: training batches are ``(images, labels, indices)``, ``indices`` the int64
            positions of their images in ``train_set`` (and in :attr:`train_labels`);
            validation and test batches stay ``(images, labels)``. Off by default, and not a
            setting: a method that needs each image's index (CRD's memory bank) sets it in its
            module's ``setup`` hook, before Lightning asks for the training loader (the loader
            takes it then, so that its worker processes have it too).
    """

    classes = CIFAR10_CLASSES
    num_classes = len(CIFAR10_CLASSES)

    def __init__(
        self,
        source: Source = "archive",
        data_dir: str | Path | None = None,
        archive_path: str | None = None,
        download: bool = False,
        val_size: int = 5000,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        augment: bool = True,
        on_device: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        synthetic_train_size: int = 10000,
        synthetic_test_size: int = 2000,
    ) -> None:
        super().__init__()
        if source not in ("torchvision", "archive", "synthetic"):
            raise KDLightError(
                f"unknown data.source '{source}'; choose torchvision, archive or synthetic"
            )
        if source == "archive" and not archive_path:
            raise KDLightError(
                "data.source=archive needs data.archive_path=PATH (a CIFAR-10 image-folder .tar.gz)"
            )
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value <= 0:
                raise KDLightError(f"data.{key} must be > 0, got {value}")
        if train_subset is not None and train_subset <= 0:
            raise KDLightError(
                f"data.train_subset must be > 0 (or null for all images), got {train_subset}"
            )
        if eval_subset is not None and eval_subset <= 0:
            raise KDLightError(
                f"data.eval_subset must be a number of images > 0 (or null for all images), "
                f"got {eval_subset}"
            )
        if val_size < 0:
            raise KDLightError(f"data.val_size must be >= 0, got {val_size}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.train_set = self.val_set = self.test_set = None
        self._prepared: dict[str, Split] | None = None
        self._test_set_id: str | None = None
        self._on_device: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}
        self._generators: dict[tuple[int, torch.device], torch.Generator | None] = {}
        self._saved_generator_states: dict[str, Tensor] = {}  # from a checkpoint, until used
        self.with_index = False

    # ------------------------------------------------------------------------ loading
    def _load(self) -> dict[str, Split]:
        hp = self.hparams
        if hp.source == "synthetic":
            # one fixed data set, like CIFAR-10 itself: the run's seed changes the split, the
            # order, the augmentation and the weights, never the images a run is tested on
            return make_synthetic(hp.synthetic_train_size, hp.synthetic_test_size)
        if hp.source == "torchvision":
            return load_torchvision(self.data_dir, hp.download)
        return load_archive(Path(hp.archive_path).expanduser(), self.data_dir)

    def prepare_data(self) -> None:
        """Download or decode once (on one process); ``setup`` then uses what was loaded here
        (read again where another process calls it)."""
        if self.train_set is None and self._prepared is None:
            self._prepared = self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self._prepared if self._prepared is not None else self._load()
        self._prepared = None  # the datasets below keep what they need
        train, test = splits["train"], splits["test"]
        hp = self.hparams
        if hp.val_size >= len(train):
            raise KDLightError(
                f"data.val_size={hp.val_size} leaves no training images (of {len(train)})"
            )
        if hp.eval_subset is not None and hp.eval_subset > len(test):
            raise KDLightError(
                f"data.eval_subset={hp.eval_subset} is more than the {len(test)} test images; "
                f"choose 1 to {len(test)}, or null for all"
            )
        order = np.random.default_rng(hp.seed).permutation(len(train))
        train_index, val_index = (
            order[: len(train) - hp.val_size],
            order[len(train) - hp.val_size :],
        )
        if hp.train_subset is not None:
            train_index = train_index[: hp.train_subset]
        self.train_set = ArrayDataset(train.take(train_index), "train", hp.on_device)
        test_digests = image_digests(test)
        subset = self._eval_subset(test, test_digests)
        self.test_set = ArrayDataset(test.take(subset), "test", hp.on_device)
        self._test_set_id = images_id(hp.source, [test_digests[i] for i in subset], len(test))
        if hp.val_size:
            val = train.take(val_index)
            self.val_set = ArrayDataset(val.take(self._eval_subset(val)), "val", hp.on_device)
        else:
            self.val_set = self.test_set

    def _eval_subset(self, split: Split, digests: list[bytes] | None = None) -> np.ndarray:
        """The indices of ``split`` to evaluate on: ``data.eval_subset`` of them, or all."""
        size = self.hparams.eval_subset
        if size is None or size >= len(split):
            return np.arange(len(split))
        return stratified_subset(split, size, digests)

    @property
    def test_set_id(self) -> str:
        """Which test images this DataModule tests on: equal strings mean the same images
        with the same labels, in whatever order they are stored. Known after ``setup``
        (before it, an ``AttributeError``, so ``getattr(dm, "test_set_id", None)`` is None).

        ``<source>:<images tested>/<test images>:<hash>``, e.g. ``archive:1000/10000:9c0e...``;
        the hash (16 hex digits) covers every tested image's pixels and label.
        """
        if self._test_set_id is None:
            raise AttributeError("CIFAR10DataModule.test_set_id is known after setup()")
        return self._test_set_id

    @property
    def train_labels(self) -> Tensor:
        """The training images' labels, int64, in the order of ``train_set`` (which the
        indices of a ``with_index`` batch point into). Known after ``setup`` (before it, an
        ``AttributeError``, so ``getattr(dm, "train_labels", None)`` is None)."""
        if self.train_set is None:
            raise AttributeError("CIFAR10DataModule.train_labels is known after setup()")
        return self.train_set.labels.long()

    # ---------------------------------------------------------------------- loaders
    def _loader(
        self, dataset: ArrayDataset, batch_size: int, shuffle: bool, drop_last: bool = False
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            sampler=None if shuffle else self._eval_sampler(dataset),
            num_workers=self.hparams.num_workers,
            collate_fn=collate_batch,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _eval_sampler(self, dataset: ArrayDataset) -> Sampler | None:
        """Under DDP each process evaluates its own share of the images and none twice
        (Lightning's default sampler pads the last share with repeats, which metrics count)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return None
        return UnrepeatedDistributedSampler(
            dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        self.train_set.with_index = self.with_index  # before worker processes copy the dataset
        return self._loader(self.train_set, hp.batch_size, shuffle=True, drop_last=hp.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ augmentation
    def on_after_batch_transfer(
        self, batch: tuple[Tensor, ...] | IndexBatch, dataloader_idx: int
    ) -> tuple[Tensor, ...]:
        """Gather (on-device data), augment (training only) and normalise on the batch's
        device; a training batch with ``with_index`` keeps its indices, last."""
        if isinstance(batch, IndexBatch):
            images, labels = self.split_on_device(batch.split, batch.indices.device)
            images, labels = images[batch.indices], labels[batch.indices]
            indices = [batch.indices] if batch.with_index else []
        else:
            images, labels, *indices = batch
        if self.trainer is not None and self.trainer.training and self.hparams.augment:
            images = random_crop_flip(images, generator=self._augment_generator(images.device))
        return self.normalize(images), labels, *indices

    def _augment_generator(self, device: torch.device) -> torch.Generator | None:
        """This process's crop-and-flip stream on ``device``: the global RNG on process 0,
        a generator of its own, made once, on every other DDP process."""
        key = (getattr(self.trainer, "global_rank", 0), device)
        if key not in self._generators:
            generator = process_generator(self.hparams.seed, *key)
            saved = self._saved_generator_states.pop(_generator_name(*key), None)
            if generator is not None and saved is not None:
                generator.set_state(saved)  # a resumed run continues the stream
            self._generators[key] = generator
        return self._generators[key]

    # ------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The crop-and-flip generators of the DDP processes other than the first, by
        ``"<rank>/<device>"``, so that a resumed run draws what the run never stopped would
        have (the first process draws from the global generator, which
        :class:`kdlight.callbacks.ResumeRandomState` keeps). Every process takes part in
        writing a checkpoint (Lightning's rule), so they exchange their states here, and the
        first writes them all."""
        states = {
            _generator_name(rank, device): generator.get_state()
            for (rank, device), generator in self._generators.items()
            if generator is not None
        }
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, states)
            states = {name: state for process in every for name, state in process.items()}
        return {"augment_generators": states} if states else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the generators :meth:`state_dict` saved: each process takes its own as
        it makes it (a process of which the checkpoint holds none starts a seeded one)."""
        self._saved_generator_states = dict(state_dict.get("augment_generators", {}))
        self._generators.clear()  # any made before would not continue the saved streams

    def split_on_device(self, split: str, device: torch.device) -> tuple[Tensor, Tensor]:
        """The whole split's uint8 images and labels on ``device``, copied there once."""
        key = (split, device)
        if key not in self._on_device:
            dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
            self._on_device[key] = (dataset.images.to(device), dataset.labels.to(device))
        return self._on_device[key]

    @staticmethod
    def normalize(images: Tensor) -> Tensor:
        """uint8 batch -> float32 standardised with CIFAR-10's per-channel mean and std."""
        return normalize(images, CIFAR10_MEAN, CIFAR10_STD)


def _generator_name(rank: int, device: torch.device) -> str:
    """How a checkpoint names process ``rank``'s crop-and-flip generator on ``device``."""
    return f"{rank}/{device}"
