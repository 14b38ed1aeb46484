"""The data: CIFAR-10, CIFAR-100 and a user's own image folders, from their sources
(torchvision's official release, image-folder archives, synthetic stand-ins), the
decoded-archive cache, batched augmentation, and the DataModules.

Importing this package is cheap (no torch): the names below are loaded when first used, so
that ``import kdlight`` can register the ``${kdlight.data_cache:}`` resolver that
``conf/paths/default.yaml`` uses without importing torch and Lightning.
"""

import importlib
import os
from pathlib import Path

from omegaconf import OmegaConf

#: Where each public name lives; loaded on first use (PEP 562).
_EXPORTS = {
    "CIFAR10_CLASSES": "kdlight.data.sources",
    "CIFAR100_CLASSES": "kdlight.data.sources",
    "DatasetSpec": "kdlight.data.sources",
    "Split": "kdlight.data.sources",
    "decode_archive": "kdlight.data.sources",
    "load_archive": "kdlight.data.sources",
    "load_torchvision": "kdlight.data.sources",
    "make_synthetic": "kdlight.data.sources",
    "ImageDataModule": "kdlight.data.datamodule",
    "CIFAR10DataModule": "kdlight.data.datamodule",
    "CIFAR100DataModule": "kdlight.data.datamodule",
    "ImageFolderDataModule": "kdlight.data.image_folder",
    "image_folder_classes": "kdlight.data.folders",
    "stratified_subset": "kdlight.data.arrays",
    "normalize": "kdlight.data.augment",
    "random_crop_flip": "kdlight.data.augment",
    "strong_view": "kdlight.data.strong",
}

__all__ = ["default_data_dir", *_EXPORTS]


def default_data_dir() -> Path:
    """The per-user data cache: ``$KDLIGHT_DATA``, else ``$XDG_CACHE_HOME/kdlight``, else
    ``~/.cache/kdlight``.

    One cache per user rather than one ``data/`` per launch folder: decoding the archive
    takes tens of seconds and 177 MB each time. ``XDG_CACHE_HOME`` counts only when it is an
    absolute path, as the XDG base-directory specification says.
    """
    if os.environ.get("KDLIGHT_DATA"):
        return Path(os.environ["KDLIGHT_DATA"]).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg_cache):
        return Path(xdg_cache) / "kdlight"
    return Path.home() / ".cache" / "kdlight"


# conf/paths/default.yaml: `data_dir: ${kdlight.data_cache:}`
OmegaConf.register_new_resolver("kdlight.data_cache", lambda: str(default_data_dir()), replace=True)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdlight.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
