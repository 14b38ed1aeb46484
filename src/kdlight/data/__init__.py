"""CIFAR-10 data: sources (torchvision, archive, synthetic), batched augmentation, DataModule."""

from kdlight.data.augment import normalize, random_crop_flip
from kdlight.data.datamodule import CIFAR10DataModule
from kdlight.data.sources import (
    CIFAR10_CLASSES,
    Split,
    decode_archive,
    load_archive,
    make_synthetic,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10DataModule",
    "Split",
    "decode_archive",
    "load_archive",
    "make_synthetic",
    "normalize",
    "random_crop_flip",
]
