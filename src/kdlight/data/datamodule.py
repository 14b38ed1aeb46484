"""The data modules: :class:`ImageDataModule`, what they all share (32x32 RGB images held in
memory as uint8 tensors, augmented per batch, training batches with each image's index on
request, seeded validation splits and class-stratified evaluation subsets), and the CIFAR
data sets built on it, :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`.
:class:`kdlight.data.image_folder.ImageFolderDataModule` reads a user's own data set."""

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from kdlight.config.settings import check, check_data, not_allowed
from kdlight.data import default_data_dir
from kdlight.data.arrays import (
    ArrayDataset,
    IndexBatch,
    collate_batch,
    image_digests,
    images_id,
    split_digest,
    stratified_subset,
)
from kdlight.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CROP,
    IDENTITY,
    STRONG,
    normalize,
    process_generator,
    random_crop_flip,
)
from kdlight.data.resumable import RecordedShuffle, ResumableLoader
from kdlight.data.sources import (
    CIFAR10_SPEC,
    CIFAR100_SPEC,
    DatasetSpec,
    Split,
    load_archive,
    load_torchvision,
    make_synthetic,
)
from kdlight.data.strong import rand_augment, strong_view
from kdlight.errors import KDLightError

#: Where a CIFAR data module's images come from (the rule of ``data.source``).
Source = Literal["archive", "torchvision", "synthetic"]


class ImageDataModule(L.LightningDataModule):
    """32x32 RGB images for training, validation and testing: everything but where they come
    from, which a subclass's ``_load`` says.

    Each argument is checked against the rule of ``data.<argument>``
    (:func:`kdlight.config.settings.rules`): a bad one raises the command line's one line.

    Args:
        data_dir: where downloaded files and the decoded-archive cache live; None: the
            per-user cache, :func:`kdlight.data.default_data_dir`.
        val_size: images held out of the training images for validation (seeded); 0
            validates on the test set, as the reference study did.
        train_subset: train on this many (seeded) training images only, e.g. for a CPU demo.
        eval_subset: validate and test on this many images only, an equal share per class
            (:func:`kdlight.data.stratified_subset`), the same images in every run whatever
            its seed (the validation images are chosen among the seeded held-out ones, all of
            them if they are fewer); None: all of them.
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

    Attributes:
        classes: the class names, in label order (the per-class report's names).
        num_classes: ``len(classes)``.
        mean, std: the per-channel statistics, in [0, 1], that :meth:`normalize` uses.
        with_index: training batches are ``(images, labels, indices)``, ``indices`` the int64
            positions of their images in ``train_set`` (and in :attr:`train_labels`);
            validation and test batches stay ``(images, labels)``. Off by default, and not a
            setting: a method that needs each image's index (CRD's memory bank) sets it in its
            module's ``setup`` hook, before Lightning asks for the training loader (the loader
            takes it then, so that its worker processes have it too).
        with_augmentation: training batches are ``(images, labels, indices, params)``, with
            ``params`` the ``(N, 3)`` int64 ``(dy, dx, flipped)`` each image was augmented
            with (see :func:`kdlight.data.augment.random_crop_flip`; ``(4, 4, 0)`` when
            ``augment`` is off): with its index, what the image the model saw was, exactly.
            Off by default and not a setting, as ``with_index``.
        with_strong_view: training batches end with a second, strongly augmented view of
            each image, a normalised float batch like the first (:mod:`kdlight.data.strong`:
            a crop and flip of its own, then RandAugment and Cutout, as MLKD's official
            CIFAR code makes it; without ``augment``, RandAugment and Cutout only), drawn
            after the first view's crop and flip from the same stream. Off by default and
            not a setting: a method that trains on both views asks for it (``needs_strong_view``,
            see :func:`kdlight.lit.methods.attach_training_data`).
    """

    classes: tuple[str, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        *,
        data_dir: str | Path | None,
        val_size: int,
        train_subset: int | None,
        eval_subset: int | None,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        augment: bool,
        on_device: bool,
        drop_last: bool,
        seed: int,
    ) -> None:
        super().__init__()
        check(
            "data", val_size=val_size, train_subset=train_subset, eval_subset=eval_subset,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            augment=augment, on_device=on_device, drop_last=drop_last, seed=seed,
        )  # fmt: skip
        self.save_hyperparameters()  # Lightning collects the subclass's arguments too
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.train_set = self.val_set = self.test_set = None
        self._prepared: dict[str, Split] | None = None
        self._test_set_id: str | None = None
        self._on_device: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}
        self._generators: dict[tuple[int, torch.device, str], torch.Generator | None] = {}
        self._saved_generator_states: dict[str, Tensor] = {}  # from a checkpoint, until used
        self.with_index = False
        self.with_augmentation = False
        self.with_strong_view = False

    # ------------------------------------------------------------------------ loading
    def _load(self) -> dict[str, Split]:
        """The whole ``train`` and ``test`` splits."""
        raise NotImplementedError

    def _source(self) -> str:
        """Where the images came from, as :attr:`test_set_id` begins."""
        raise NotImplementedError

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
            raise not_allowed(
                "data.val_size", hp.val_size, f"fewer than the {len(train)} training images"
            )
        if hp.eval_subset is not None and hp.eval_subset > len(test):
            raise KDLightError(
                f"data.eval_subset={hp.eval_subset} is more than the {len(test)} test images; "
                f"choose 1 to {len(test)}, or null for all"
            )
        order = np.random.default_rng(hp.seed).permutation(len(train))
        kept = len(train) - hp.val_size
        train_index, val_index = order[:kept], order[kept:]
        if hp.train_subset is not None:
            train_index = train_index[: hp.train_subset]
        self.train_set = ArrayDataset(train.take(train_index), "train", hp.on_device)
        # where each training image comes from in the whole training split, and that split's
        # content: what a cache of the teacher's answers is keyed and indexed by (any seed)
        self.train_positions = torch.from_numpy(np.asarray(train_index, dtype=np.int64))
        self.train_source = (split_digest(train), len(train))
        test_digests = image_digests(test)
        subset = self._eval_subset(test, test_digests)
        self.test_set = ArrayDataset(test.take(subset), "test", hp.on_device)
        self._test_set_id = images_id(self._source(), [test_digests[i] for i in subset], len(test))
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
            raise AttributeError(f"{type(self).__name__}.test_set_id is known after setup()")
        return self._test_set_id

    @property
    def train_labels(self) -> Tensor:
        """The training images' labels, int64, in the order of ``train_set`` (which the
        indices of a ``with_index`` batch point into). Known after ``setup`` (before it, an
        ``AttributeError``, so ``getattr(dm, "train_labels", None)`` is None)."""
        if self.train_set is None:
            raise AttributeError(f"{type(self).__name__}.train_labels is known after setup()")
        return self.train_set.labels.long()

    # ---------------------------------------------------------------------- loaders
    def _loader(
        self, dataset: ArrayDataset, batch_size: int, shuffle: bool, drop_last: bool = False
    ) -> DataLoader:
        workers = self.hparams.num_workers
        common = dict(
            batch_size=batch_size, drop_last=drop_last, num_workers=workers,
            collate_fn=collate_batch, persistent_workers=workers > 0,
        )  # fmt: skip
        if shuffle:  # training: resumable in the middle of an epoch
            return ResumableLoader(
                dataset, sampler=RecordedShuffle(dataset), progress=self._training_progress,
                **common,
            )  # fmt: skip
        return DataLoader(dataset, sampler=self._eval_sampler(dataset), **common)

    def _training_progress(self) -> tuple[int, int, int | float] | None:
        """``(epoch, batches of it trained, batches per epoch)`` while the Trainer trains;
        what the training loader's state in a checkpoint is made of
        (:class:`kdlight.data.resumable.ResumableLoader`)."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return None
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return trainer.current_epoch, trained, trainer.num_training_batches

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
        # before worker processes copy the dataset
        self.train_set.with_index = self.with_index or self.with_augmentation
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
        device; a training batch with ``with_index`` keeps its indices, one with
        ``with_augmentation`` also the augmentation's draws, and one with
        ``with_strong_view`` ends with the strong view."""
        if isinstance(batch, IndexBatch):
            images, labels = self.split_on_device(batch.split, batch.indices.device)
            images, labels = images[batch.indices], labels[batch.indices]
            indices = [batch.indices] if batch.with_index else []
        else:
            images, labels, *indices = batch
        training = self.trainer is not None and self.trainer.training
        original = images
        if training and self.hparams.augment:
            generator = self._augment_generator(images.device)
            images, params = random_crop_flip(images, generator=generator, return_params=True)
        elif training:  # not augmented: every image as it is
            params = IDENTITY.to(images.device).expand(len(images), 3)
        drawn = [params] if training and self.with_augmentation else []
        if training and self.with_strong_view:
            augment = strong_view if self.hparams.augment else rand_augment
            strong = augment(original, self._augment_generator(images.device, STRONG))
            drawn.append(self.normalize(strong))
        return self.normalize(images), labels, *indices, *drawn

    def _augment_generator(
        self, device: torch.device, stream: str = CROP
    ) -> torch.Generator | None:
        """This process's ``stream`` on ``device``. The crop and flip: the global RNG on
        process 0, a generator of its own, made once, on every other DDP process. The strong
        view: a generator of its own on every process, so that asking for it leaves the crop
        and flip, and every batch after, as they are without it (a grid cell of another
        method beside MLKD's draws what its own run draws)."""
        key = (getattr(self.trainer, "global_rank", 0), device, stream)
        if key not in self._generators:
            generator = process_generator(self.hparams.seed, *key)
            saved = self._saved_generator_states.pop(_generator_name(*key), None)
            if generator is not None and saved is not None:
                generator.set_state(saved)  # a resumed run continues the stream
            self._generators[key] = generator
        return self._generators[key]

    # ------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The augmentation's generators (the crop and flip of the DDP processes other than
        the first, by ``"<rank>/<device>"``; the strong view's of every process), so that a resumed run draws what the run never stopped would
        have (the first process draws from the global generator, which
        :class:`kdlight.trainer.callbacks.ResumeRandomState` keeps). Every process takes part in
        writing a checkpoint (Lightning's rule), so they exchange their states here, and the
        first writes them all."""
        states = {
            _generator_name(*key): generator.get_state()
            for key, generator in self._generators.items()
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

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 batch -> float32 standardised with the data set's per-channel mean and std."""
        return normalize(images, self.mean, self.std)


class CIFARDataModule(ImageDataModule):
    """A CIFAR data set, or a synthetic stand-in of as many classes, from one of three
    sources; a subclass names the data set (``dataset``, ``classes``, ``num_classes``,
    ``mean``, ``std``).

    Args:
        source: ``torchvision`` (the official release, in torchvision's layout under
            ``data_dir``), ``archive`` (an image-folder tree or a ``.tar.gz`` of one, such as
            ``shared/data/cifar10-jpeg.tar.gz``: ``train/<class>/`` and ``test/<class>/``, one
            folder per class, named as :attr:`classes`) or ``synthetic``.
        archive_path: the archive, for ``source=archive``.
        download: let torchvision download the official release.
        synthetic_train_size, synthetic_test_size: sizes for ``source=synthetic``.
        data_dir, val_size, ...: as for :class:`ImageDataModule`.
    """

    dataset: DatasetSpec

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
        check(
            "data", source=source, archive_path=archive_path, download=download,
            synthetic_train_size=synthetic_train_size, synthetic_test_size=synthetic_test_size,
        )  # fmt: skip
        super().__init__(
            data_dir=data_dir, val_size=val_size, train_subset=train_subset,
            eval_subset=eval_subset, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, augment=augment, on_device=on_device,
            drop_last=drop_last, seed=seed,
        )  # fmt: skip
        check_data(self.hparams, self.dataset.name)

    def _load(self) -> dict[str, Split]:
        hp = self.hparams
        if hp.source == "synthetic":
            # one fixed data set, like CIFAR itself: the run's seed changes the split, the
            # order, the augmentation and the weights, never the images a run is tested on
            return make_synthetic(
                hp.synthetic_train_size, hp.synthetic_test_size, num_classes=self.num_classes
            )
        if hp.source == "torchvision":
            return load_torchvision(self.data_dir, hp.download, self.dataset)
        return load_archive(Path(hp.archive_path).expanduser(), self.data_dir, self.dataset)

    def _source(self) -> str:
        return self.hparams.source

    @classmethod
    def normalize(cls, images: Tensor) -> Tensor:
        """uint8 batch -> float32 standardised with the data set's per-channel mean and std
        (also on the class: ``CIFAR10DataModule.normalize(images)``)."""
        return normalize(images, cls.mean, cls.std)


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (or a synthetic stand-in) for training, validation and testing: see
    :class:`CIFARDataModule` and :class:`ImageDataModule` for the arguments."""

    dataset = CIFAR10_SPEC
    classes = CIFAR10_SPEC.classes
    num_classes = CIFAR10_SPEC.num_classes
    mean, std = CIFAR10_MEAN, CIFAR10_STD


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100's 100 fine classes (or a synthetic stand-in of 100 classes) for training,
    validation and testing: see :class:`CIFARDataModule` and :class:`ImageDataModule` for
    the arguments. An archive holds one folder per fine class, named as :attr:`classes`."""

    dataset = CIFAR100_SPEC
    classes = CIFAR100_SPEC.classes
    num_classes = CIFAR100_SPEC.num_classes
    mean, std = CIFAR100_MEAN, CIFAR100_STD


def _generator_name(rank: int, device: torch.device, stream: str = CROP) -> str:
    """How a checkpoint names process ``rank``'s generator of ``stream`` on ``device``."""
    return f"{rank}/{device}" if stream == CROP else f"{stream}/{rank}/{device}"
