"""``ImageFolderDataModule``: a user's own data set of 32x32 RGB images, one folder per class,
with every feature of the CIFAR data modules."""

import math
from pathlib import Path

import numpy as np

from kdlight.config.settings import check, check_data
from kdlight.data.datamodule import ImageDataModule
from kdlight.data.folders import image_folder_classes, listed
from kdlight.data.sources import DatasetSpec, Split, load_archive
from kdlight.errors import KDLightError

#: Images per step when computing the channel statistics (bounds the float64 copy).
STATS_CHUNK = 4096


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation, in [0, 1], of every pixel of the uint8
    ``(N, H, W, C)`` ``images``: the statistics CIFAR's published mean and std are."""
    channels = images.shape[-1]
    total, squares = np.zeros(channels), np.zeros(channels)
    for start in range(0, len(images), STATS_CHUNK):
        pixels = images[start : start + STATS_CHUNK].reshape(-1, channels).astype(np.float64)
        total += pixels.sum(axis=0)
        squares += (pixels**2).sum(axis=0)
    count = images.size // channels
    mean = total / count / 255.0
    variance = np.maximum(squares / count / 255.0**2 - mean**2, 0.0)
    return tuple(float(m) for m in mean), tuple(float(math.sqrt(v)) for v in variance)


class ImageFolderDataModule(ImageDataModule):
    """A user's own data set of 32x32 RGB images from an image-folder tree or a ``.tar.gz`` of
    one: ``train/<class>/*.png|jpg`` and ``test/<class>/*.png|jpg`` (under any top-level
    folder), the same class folders under both.

    The classes are the folders of ``train/`` that hold images, sorted (:attr:`classes`,
    :attr:`num_classes`, known once the module is made: the folder names are read then).
    The images are decoded, checked (32x32, not grayscale) and cached as CIFAR archives are,
    when loaded. Unless ``mean`` and ``std`` are given, they are computed then from every
    training image (the validation images included, so that they do not depend on the seed).

    Args:
        root: the tree, or a .tar(.gz) of one.
        num_classes: the number of classes the models are made for, checked against the
            folders; None: not checked.
        mean, std: per-channel (R, G, B) statistics in [0, 1], both or neither; None:
            computed from the training images.
        data_dir, val_size, ...: as for :class:`ImageDataModule` (``val_size`` 0 by default:
            a data set of any size validates on its test set).
    """

    def __init__(
        self,
        root: str | None = None,
        num_classes: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        data_dir: str | Path | None = None,
        val_size: int = 0,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        augment: bool = True,
        on_device: bool = False,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        check("data", root=root, num_classes=num_classes, mean=mean, std=std)
        check_data({"mean": mean, "std": std})
        classes = image_folder_classes(root)
        if num_classes is not None and num_classes != len(classes):
            raise KDLightError(
                f"num_classes={num_classes} does not fit data.root={root}: its train/ has "
                f"{len(classes)} class folders ({listed(classes)}); set num_classes={len(classes)}"
            )
        super().__init__(
            data_dir=data_dir, val_size=val_size, train_subset=train_subset,
            eval_subset=eval_subset, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, augment=augment, on_device=on_device,
            drop_last=drop_last, seed=seed,
        )  # fmt: skip
        self.root = Path(root).expanduser()
        self.classes = classes
        self.num_classes = len(classes)
        self.dataset = DatasetSpec("image folder", classes, cache_tag="image-folder", rgb_only=True)
        # computed when loaded, unless given
        self.mean = None if mean is None else tuple(map(float, mean))
        self.std = None if std is None else tuple(map(float, std))

    def _load(self) -> dict[str, Split]:
        splits = load_archive(self.root, self.data_dir, self.dataset)
        if self.hparams.mean is None:
            self.mean, self.std = channel_stats(splits["train"].images)
            if min(self.std) == 0:
                raise KDLightError(
                    f"image folder {self.root}: a colour channel has the same value in every "
                    f"training image (std {self.std}); set data.mean and data.std"
                )
        return splits

    def _source(self) -> str:
        return "image_folder"
