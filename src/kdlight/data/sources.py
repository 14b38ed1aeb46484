"""Where CIFAR-10 comes from: torchvision's official release, an image-folder archive, or
deterministic synthetic data. Each loader returns a :class:`Split` pair of uint8 arrays.

Arrays are ``(N, 32, 32, 3)`` uint8 images (HWC, as torchvision stores CIFAR-10) and
``(N,)`` int64 labels in CIFAR-10's own label order.
"""

import io
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from kdlight.data.cache import cache_file, read_cache, write_cache
from kdlight.errors import KDLightError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "test")


@dataclass
class Split:
    """Images ``(N, 32, 32, 3)`` uint8 and labels ``(N,)`` int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Split":
        """The images and labels at ``index``."""
        return Split(self.images[index], self.labels[index])


def load_torchvision(root: str | Path, download: bool) -> dict[str, Split]:
    """The official ``cifar-10-python.tar.gz`` through torchvision (downloads only if asked)."""
    from torchvision.datasets import CIFAR10

    splits = {}
    for split in SPLITS:
        try:
            dataset = CIFAR10(str(root), train=split == "train", download=download)
        except RuntimeError as err:
            raise KDLightError(
                f"official CIFAR-10 not found under {root} ({err}); set data.download=true, "
                "or use data.source=archive with data.archive_path=PATH"
            ) from None
        splits[split] = Split(dataset.data, np.asarray(dataset.targets, dtype=np.int64))
    return splits


# --------------------------------------------------------------------------------- archive


def _iter_archive(path: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(relative path, file bytes) of every image in a folder tree or a .tar(.gz) of one."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                yield PurePosixPath(file.relative_to(path).as_posix()), file.read_bytes()
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = PurePosixPath(member.name)
                if member.isfile() and name.suffix.lower() in IMAGE_SUFFIXES:
                    yield name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        reason = " ".join(str(err).split())  # tarfile's "r:*" errors span several lines
        raise KDLightError(
            f"cannot read CIFAR-10 archive {path}: {reason} (is it a complete .tar.gz?)"
        ) from None


def _locate(name: PurePosixPath) -> tuple[str, str] | None:
    """('train'|'test', class) for ``.../train/<class>/<file>``, else None."""
    parts = name.parts
    if len(parts) >= 3 and parts[-3] in SPLITS:
        return parts[-3], parts[-2]
    return None


def decode_archive(path: str | Path) -> dict[str, Split]:
    """Decode every image of an image-folder tree (or a .tar.gz of one) into uint8 arrays.

    Expected layout: ``train/<class>/*.jpg|png`` and ``test/<class>/*``, one folder per
    CIFAR-10 class; labels follow CIFAR-10's order, not the folders' alphabetical order.
    """
    path = Path(path)
    if not path.exists():
        raise KDLightError(
            f"CIFAR-10 archive not found: {path} (set data.archive_path, "
            "or use data.source=torchvision data.download=true)"
        )
    images: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    labels: dict[str, list[int]] = {split: [] for split in SPLITS}
    label_of = {name: index for index, name in enumerate(CIFAR10_CLASSES)}
    for name, data in _iter_archive(path):
        located = _locate(name)
        if located is None:
            continue
        split, class_name = located
        if class_name not in label_of:
            raise KDLightError(
                f"CIFAR-10 archive {path}: unknown class folder '{split}/{class_name}' "
                f"(expected {', '.join(CIFAR10_CLASSES)})"
            )
        try:
            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception as err:  # PIL raises many types for undecodable files
            raise KDLightError(
                f"CIFAR-10 archive {path}: cannot decode image {name}: {err}"
            ) from None
        if array.shape != (32, 32, 3):
            raise KDLightError(
                f"CIFAR-10 archive {path}: image {name} is {array.shape[1]}x{array.shape[0]}, "
                "expected 32x32"
            )
        images[split].append(array)
        labels[split].append(label_of[class_name])
    for split in SPLITS:
        if not labels[split]:
            raise KDLightError(
                f"CIFAR-10 archive {path} has no images under '{split}/<class>/'; expected "
                "train/<class>/*.jpg and test/<class>/*.jpg"
            )
        missing = sorted(set(CIFAR10_CLASSES) - {CIFAR10_CLASSES[i] for i in labels[split]})
        if missing:
            raise KDLightError(
                f"CIFAR-10 archive {path}: class folder(s) missing under '{split}/': "
                f"{', '.join(missing)}"
            )
    return {
        split: Split(np.stack(images[split]), np.asarray(labels[split], dtype=np.int64))
        for split in SPLITS
    }


def load_archive(path: str | Path, cache_dir: str | Path) -> dict[str, Split]:
    """Decode the archive once, cache the arrays under ``cache_dir``, and reuse the cache
    while the archive is unchanged (see :mod:`kdlight.data.cache`)."""
    path = Path(path)
    if not path.exists():
        decode_archive(path)  # raises the clear "not found" error
    cache = cache_file(path, Path(cache_dir))
    splits = read_cache(cache, _splits_from_arrays)
    if splits is None:
        splits = decode_archive(path)
        arrays = {}
        for split in SPLITS:
            arrays[f"{split}_x"], arrays[f"{split}_y"] = splits[split].images, splits[split].labels
        write_cache(cache, arrays)
    return splits


def _splits_from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Split]:
    """The splits in a cache's arrays, checked to be whole decoded CIFAR-10 splits."""
    splits = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if not (
            images.dtype == np.uint8
            and images.ndim == 4
            and images.shape[1:] == (32, 32, 3)
            and labels.dtype == np.int64
            and labels.shape == (len(images),)
            and len(labels) > 0
            and labels.min() >= 0
            and labels.max() < len(CIFAR10_CLASSES)
        ):
            raise ValueError(
                f"{split}: images {images.dtype} {images.shape}, labels {labels.dtype} "
                f"{labels.shape} are not a decoded CIFAR-10 split"
            )
        splits[split] = Split(images, labels)
    return splits


# ------------------------------------------------------------------------------- synthetic


def make_synthetic(
    train_size: int = 10000, test_size: int = 2000, seed: int = 0
) -> dict[str, Split]:
    """Deterministic CIFAR-shaped data whose labels depend on the pixels.

    Each class has a smooth random colour pattern (a 4x4 grid upsampled to 32x32). An image
    blends its class's pattern with a random other class's pattern and adds per-pixel noise,
    so classes are confusable (a teacher has "dark knowledge" to pass on) and a small network
    learns them over a few epochs rather than instantly.
    """
    rng = np.random.default_rng(seed)
    num_classes = len(CIFAR10_CLASSES)
    patterns = rng.uniform(0, 255, size=(num_classes, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)

    def split(size: int) -> Split:
        labels = np.arange(size) % num_classes
        rng.shuffle(labels)
        distractors = (labels + rng.integers(1, num_classes, size)) % num_classes
        mix = rng.uniform(0.25, 0.45, size=(size, 1, 1, 1))
        images = (1 - mix) * patterns[labels] + mix * patterns[distractors]
        images += rng.normal(0, 70, size=images.shape)
        return Split(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64))

    return {"train": split(train_size), "test": split(test_size)}
