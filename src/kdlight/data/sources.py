"""Where the images come from: a data set's official release (read in torchvision's layout),
an image-folder archive, or deterministic synthetic data. Each loader returns a
:class:`Split` per split: images HWC, as torchvision stores CIFAR, and labels in the data
set's own label order (:class:`DatasetSpec`).
"""

import io
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from kdlight.data.cache import cache_file, read_cache, write_cache
from kdlight.data.folders import SPLITS, iter_images, listed, locate
from kdlight.errors import KDLightError, one_line

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
#: The fine labels in the order of the official release's ``meta`` file (alphabetical).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard",
    "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray",
    "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """What the loaders know of a data set.

    Attributes:
        name: as messages name it, e.g. ``CIFAR-10``.
        classes: the class names in label order; an archive's class folders bear them.
        torchvision: the ``torchvision.datasets`` class of its official release, if any.
        cache_tag: keeps its decoded-archive caches apart from those of another label space
            read from the same archive; empty for CIFAR-10, whose caches are older than tags.
        rgb_only: reject grayscale images instead of converting them to RGB.
    """

    name: str
    classes: tuple[str, ...]
    torchvision: str | None = None
    cache_tag: str = ""
    rgb_only: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


CIFAR10_SPEC = DatasetSpec("CIFAR-10", CIFAR10_CLASSES, torchvision="CIFAR10")
CIFAR100_SPEC = DatasetSpec("CIFAR-100", CIFAR100_CLASSES, "CIFAR100", cache_tag="cifar100")


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


# ------------------------------------------------------------------------ official release


def load_torchvision(
    root: str | Path, download: bool, dataset: DatasetSpec = CIFAR10_SPEC
) -> dict[str, Split]:
    """The official release (e.g. ``cifar-100-python.tar.gz``) as torchvision unpacks it under
    ``root`` (``cifar-10-batches-py/``, ``cifar-100-python/``), downloaded only if asked.

    The pickled batches are read here, as torchvision reads them, and checked for their
    shapes, labels and class names (the ``meta`` file's) instead of by the md5 of every file
    on every load; torchvision downloads them when one is missing, and checks the download.
    """
    from torchvision import datasets

    official = getattr(datasets, dataset.torchvision)
    folder = Path(root) / official.base_folder
    batches = {
        "train": [folder / name for name, _md5 in official.train_list],
        "test": [folder / name for name, _md5 in official.test_list],
    }
    meta = folder / official.meta["filename"]
    needed = [meta, *batches["train"], *batches["test"]]
    if download and not all(file.is_file() for file in needed):
        try:
            official(str(root), train=False, download=True)
        except (RuntimeError, OSError) as err:  # URLError is an OSError
            raise KDLightError(
                f"cannot download the official {dataset.name} into {root}: {one_line(err)}"
            ) from None
    if missing := [file for file in needed if not file.is_file()]:
        raise KDLightError(
            f"official {dataset.name} not found under {root} (no {missing[0]}); set "
            "data.download=true, or use data.source=archive with data.archive_path=PATH"
        )
    names = tuple(_text(name) for name in _unpickle(meta, dataset).get(official.meta["key"], ()))
    if names != dataset.classes:
        raise KDLightError(
            f"{meta} names the classes {listed(names)}, not {dataset.name}'s "
            f"({listed(dataset.classes)})"
        )
    return {split: _read_batches(files, dataset) for split, files in batches.items()}


def _read_batches(files: list[Path], dataset: DatasetSpec) -> Split:
    """The images and labels of the official pickled batches ``files``, in order."""
    images, labels = [], []
    for file in files:
        entry = _unpickle(file, dataset)
        data = entry.get("data")
        targets = np.asarray(entry.get("labels", entry.get("fine_labels", [])))
        if not (
            isinstance(data, np.ndarray)
            and data.dtype == np.uint8
            and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32
            and targets.shape == (len(data),)
            and np.issubdtype(targets.dtype, np.integer)
            and (targets.size == 0 or 0 <= targets.min() <= targets.max() < dataset.num_classes)
        ):
            raise KDLightError(
                f"{file} is not an official {dataset.name} batch (uint8 data of 3072 values "
                f"per image and one label from 0 to {dataset.num_classes - 1} per image); "
                f"delete {file.parent} and set data.download=true"
            )
        images.append(data)
        labels.append(targets)
    # as torchvision does: CHW rows -> HWC images
    stacked = np.vstack(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(stacked, np.concatenate(labels).astype(np.int64))


class _ArraysOnly(pickle.Unpickler):
    """An unpickler of what the official CIFAR files hold, and nothing that runs code: dicts,
    lists, numbers, text and bytes (built by pickle's own opcodes) and numpy arrays (numpy's
    functions that rebuild an array from its bytes). A pickle may name any importable
    function to call while it is read (``os.system``, say); ``find_class`` is where it gets
    one, and here it gets only these."""

    _ALLOWED = frozenset(
        (module, name)
        for core in ("numpy.core", "numpy._core")  # numpy 1 wrote the first, numpy 2 the second
        for module, name in (
            (f"{core}.multiarray", "_reconstruct"),  # an array, protocols 2 to 4
            (f"{core}.numeric", "_frombuffer"),  # an array, protocol 5
        )
    ) | {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes, as protocol 2 writes them from Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which an official file does not hold (a pickle "
                "calls what it names as it is read)"
            )
        return super().find_class(module, name)


def _unpickle(file: Path, dataset: DatasetSpec) -> dict:
    """A pickled dict of the official release, its keys as text: Python 2 wrote them as byte
    strings, which ``encoding="latin1"`` reads as text (as torchvision does) and
    ``encoding="bytes"`` copies do not. Read by :class:`_ArraysOnly`: a planted file that
    names anything but numpy's arrays is refused, and nothing it names is called."""
    try:
        with file.open("rb") as handle:
            entry = _ArraysOnly(handle, encoding="latin1").load()
    except Exception as err:  # a damaged pickle raises many types
        raise KDLightError(
            f"cannot read {file} ({one_line(err)}): delete {file.parent} and set "
            f"data.download=true to fetch the official {dataset.name} again"
        ) from None
    if not isinstance(entry, dict):
        raise KDLightError(f"{file} is not an official {dataset.name} file (not a dict)")
    return {_text(key): value for key, value in entry.items()}


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------- archive


def decode_archive(path: str | Path, dataset: DatasetSpec = CIFAR10_SPEC) -> dict[str, Split]:
    """Decode every image of an image-folder tree (or a .tar.gz of one) into uint8 arrays.

    Expected layout: ``train/<class>/*.jpg|png`` and ``test/<class>/*``, one folder per class
    of ``dataset`` in each; labels follow ``dataset.classes``, not the folders' order.
    """
    path = Path(path)
    what = f"{dataset.name} archive"
    if not path.exists():
        raise KDLightError(
            f"{what} not found: {path} (set data.archive_path, "
            "or use data.source=torchvision data.download=true)"
        )
    images: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    labels: dict[str, list[int]] = {split: [] for split in SPLITS}
    label_of = {name: index for index, name in enumerate(dataset.classes)}
    for name, data in iter_images(path, what):
        located = locate(name)
        if located is None:
            continue
        split, class_name = located
        if class_name not in label_of:
            raise KDLightError(
                f"{what} {path}: unknown class folder '{split}/{class_name}' "
                f"(expected {listed(dataset.classes)})"
            )
        try:
            with Image.open(io.BytesIO(data)) as image:
                grayscale = image.mode not in ("P", "PA") and len(image.getbands()) < 3
                array = np.asarray(image.convert("RGB"))
        except Exception as err:  # PIL raises many types for undecodable files
            raise KDLightError(f"{what} {path}: cannot decode image {name}: {err}") from None
        if dataset.rgb_only and grayscale:
            raise KDLightError(
                f"{what} {path}: image {name} is grayscale ({image.mode}), expected RGB"
            )
        if array.shape != (32, 32, 3):
            raise KDLightError(
                f"{what} {path}: image {name} is {array.shape[1]}x{array.shape[0]}, expected 32x32"
            )
        images[split].append(array)
        labels[split].append(label_of[class_name])
    for split in SPLITS:
        if not labels[split]:
            raise KDLightError(
                f"{what} {path} has no images under '{split}/<class>/'; expected "
                "train/<class>/*.jpg and test/<class>/*.jpg"
            )
        if missing := sorted(set(dataset.classes) - {dataset.classes[i] for i in labels[split]}):
            raise KDLightError(
                f"{what} {path}: class folder(s) missing under '{split}/': {listed(missing)}"
            )
    return {
        split: Split(np.stack(images[split]), np.asarray(labels[split], dtype=np.int64))
        for split in SPLITS
    }


def load_archive(
    path: str | Path, cache_dir: str | Path, dataset: DatasetSpec = CIFAR10_SPEC
) -> dict[str, Split]:
    """Decode the archive once, cache the arrays under ``cache_dir``, and reuse the cache
    while the archive is unchanged (see :mod:`kdlight.data.cache`)."""
    path = Path(path)
    if not path.exists():
        decode_archive(path, dataset)  # raises the clear "not found" error
    cache = cache_file(path, Path(cache_dir), dataset.cache_tag)
    splits = read_cache(cache, partial(_splits_from_arrays, dataset=dataset))
    if splits is None:
        splits = decode_archive(path, dataset)
        images = {f"{split}_x": splits[split].images for split in SPLITS}
        write_cache(cache, images | {f"{split}_y": splits[split].labels for split in SPLITS})
    return splits


def _splits_from_arrays(arrays: dict[str, np.ndarray], dataset: DatasetSpec) -> dict[str, Split]:
    """The splits in a cache's arrays, checked to be whole decoded splits of ``dataset``."""
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
            and labels.max() < dataset.num_classes
        ):
            raise ValueError(
                f"{split}: images {images.dtype} {images.shape}, labels {labels.dtype} "
                f"{labels.shape} are not a decoded {dataset.name} split"
            )
        splits[split] = Split(images, labels)
    return splits


# ------------------------------------------------------------------------------- synthetic


def make_synthetic(
    train_size: int = 10000,
    test_size: int = 2000,
    seed: int = 0,
    num_classes: int = len(CIFAR10_CLASSES),
) -> dict[str, Split]:
    """Deterministic CIFAR-shaped data of ``num_classes`` classes whose labels depend on the
    pixels.

    Each class has a smooth random colour pattern (a 4x4 grid upsampled to 32x32). An image
    blends its class's pattern with a random other class's pattern and adds per-pixel noise,
    so classes are confusable (a teacher has "dark knowledge" to pass on) and a small network
    learns them over a few epochs rather than instantly.
    """
    rng = np.random.default_rng(seed)
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
