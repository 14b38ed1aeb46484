"""CIFAR-100 (the official pickles, archives, synthetic data, ``data=cifar100``) and a user's
own image folders (``data=image_folder``), on files the tests write: nothing downloads."""

import pickle
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from PIL import Image

from kdlight.config.settings import validate_settings
from kdlight.data import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageFolderDataModule,
    decode_archive,
    image_folder_classes,
    load_archive,
    load_torchvision,
    make_synthetic,
    normalize,
)
from kdlight.data import image_folder as image_folder_file
from kdlight.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from kdlight.data.cache import cache_file
from kdlight.data.image_folder import channel_stats
from kdlight.data.sources import CIFAR100_SPEC
from kdlight.errors import KDLightError, find_user_error
from tests.conftest import compose_config

TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 1


def error_message(excinfo: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be the single line that kdlight-train prints."""
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def colour(label: int) -> tuple[int, int, int]:
    """A colour per label (of up to 128) that a PNG keeps exactly: red is twice the label."""
    return (2 * label, 255 - 2 * label, (37 * label) % 256)


def labels_of(images: np.ndarray) -> list[int]:
    """The labels that :func:`colour` painted into HWC ``images``."""
    return (images[:, 0, 0, 0] // 2).tolist()


# ------------------------------------------------------------------------ the class names


def test_cifar100_has_the_official_fine_classes_in_the_meta_files_order():
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)  # the meta file's order
    known = {0: "apple", 1: "aquarium_fish", 19: "cattle", 39: "keyboard", 46: "man"}
    known |= {58: "pickup_truck", 87: "television", 98: "woman", 99: "worm"}
    assert {index: CIFAR100_CLASSES[index] for index in known} == known
    assert CIFAR100DataModule.classes == CIFAR100_CLASSES
    assert CIFAR100DataModule.num_classes == 100
    assert (CIFAR100DataModule.mean, CIFAR100DataModule.std) == (CIFAR100_MEAN, CIFAR100_STD)


def test_cifar10_keeps_its_classes_statistics_settings_and_caches(tmp_path: Path):
    assert CIFAR10DataModule.classes == CIFAR10_CLASSES and CIFAR10DataModule.num_classes == 10
    datamodule = CIFAR10DataModule(source="synthetic", synthetic_train_size=200, val_size=20)
    assert dict(datamodule.hparams) == {
        "source": "synthetic", "data_dir": None, "archive_path": None, "download": False,
        "val_size": 20, "train_subset": None, "eval_subset": None, "batch_size": 128,
        "eval_batch_size": 1000, "num_workers": 0, "augment": True, "on_device": False,
        "drop_last": False, "seed": 0, "synthetic_train_size": 200, "synthetic_test_size": 2000,
    }  # fmt: skip
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(datamodule.normalize(images), normalize(images, CIFAR10_MEAN, CIFAR10_STD))
    # the synthetic data of ten classes is the data it always was
    ten, default = make_synthetic(100, 50, num_classes=10), make_synthetic(100, 50)
    np.testing.assert_array_equal(ten["train"].images, default["train"].images)
    # one archive, three label spaces, three caches; CIFAR-10's keeps its untagged name
    archive = write_tree(tmp_path / "tree", CIFAR10_CLASSES, 1, 1)
    names = {cache_file(archive, tmp_path, tag) for tag in ("", "cifar100", "image-folder")}
    assert len(names) == 3
    load_archive(archive, tmp_path / "cache")
    assert [f.name for f in (tmp_path / "cache").iterdir()] == [cache_file(archive, Path()).name]


# --------------------------------------------------------------------- the official release


def write_official(root: Path, train_per_class: int = 3, test_per_class: int = 1, keys=str):
    """``root/cifar-100-python/{train,test,meta}`` in the official pickle format (one dict per
    file, with the official keys as ``keys`` gives them: text, as torchvision's
    ``encoding="latin1"`` reads the Python 2 originals, or bytes). Each image is its class's
    colour, with its number in the last pixel. Returns {split: (images HWC, labels)}."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
        images[:] = np.array([colour(label) for label in labels], dtype=np.uint8)[:, None, None]
        images[:, -1, -1] = np.arange(len(labels))[:, None] % 256
        entry = {
            "batch_label": f"{split} batch",
            "filenames": [f"{i}.png" for i in range(len(labels))],
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),  # CHW rows
        }
        (folder / split).write_bytes(pickle.dumps({keys(k): v for k, v in entry.items()}))
        written[split] = (images, labels)
    names = [keys(name) for name in CIFAR100_CLASSES]
    meta = {keys("fine_label_names"): names, keys("coarse_label_names"): names[:20]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return written


def as_bytes(text: str) -> bytes:
    return text.encode("latin1")


@pytest.mark.parametrize("keys", [str, as_bytes], ids=["text-keys", "bytes-keys"])
def test_the_official_pickles_are_read_without_torchvision(tmp_path: Path, monkeypatch, keys):
    written = write_official(tmp_path, keys=keys)

    class NoDownload(torchvision.datasets.CIFAR100):
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("torchvision was asked for files that are there")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", NoDownload)
    for download in (False, True):
        splits = load_torchvision(tmp_path, download, CIFAR100_SPEC)
        for split, (images, labels) in written.items():
            assert (
                splits[split].images.shape == images.shape
                and splits[split].images.dtype == np.uint8
            )
            np.testing.assert_array_equal(splits[split].images, images)
            np.testing.assert_array_equal(splits[split].labels, labels)
            assert splits[split].labels.dtype == np.int64


def test_the_datamodule_splits_the_official_release(tmp_path: Path):
    write_official(tmp_path, train_per_class=3, test_per_class=2)
    datamodule = CIFAR100DataModule(source="torchvision", data_dir=str(tmp_path), val_size=60)
    datamodule.setup("fit")
    sizes = len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)
    assert sizes == (240, 60, 200)
    labels = torch.cat([datamodule.train_set.labels, datamodule.val_set.labels])
    assert torch.bincount(labels, minlength=100).tolist() == [3] * 100
    assert datamodule.test_set_id.startswith("torchvision:200/200:")
    images = datamodule.test_set.images.permute(0, 2, 3, 1).numpy()
    assert labels_of(images) == datamodule.test_set.labels.tolist()
    assert datamodule.classes[datamodule.test_set.labels[0]] in CIFAR100_CLASSES


def test_torchvision_downloads_only_what_is_missing(tmp_path: Path, monkeypatch):
    calls = []

    class Downloading(torchvision.datasets.CIFAR100):  # the official file names, offline
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append(download)
            write_official(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Downloading)
    with pytest.raises(KDLightError) as excinfo:
        load_torchvision(tmp_path, False, CIFAR100_SPEC)
    message = error_message(excinfo)
    assert "official CIFAR-100 not found" in message and "data.download=true" in message
    assert calls == []
    assert len(load_torchvision(tmp_path, True, CIFAR100_SPEC)["train"]) == 300
    assert calls == [True]


def test_cifar10s_official_batches_are_read_in_order(tmp_path: Path):
    """CIFAR-10's release is read by the same code: five training batches, then the test."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(files):
        labels = [(number + i) % 10 for i in range(20)]
        data = np.full((20, 3072), number, dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))
    splits = load_torchvision(tmp_path, False)
    assert splits["train"].images[::20, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert splits["train"].labels[:3].tolist() == [0, 1, 2]
    assert np.unique(splits["test"].images).tolist() == [5]
    datamodule = CIFAR10DataModule(source="torchvision", data_dir=str(tmp_path), val_size=10)
    datamodule.setup()
    sizes = len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)
    assert sizes == (90, 10, 20)


def test_a_failed_download_is_one_line(tmp_path: Path, monkeypatch):
    class Offline(torchvision.datasets.CIFAR100):
        def __init__(self, *args, **kwargs):
            raise OSError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(KDLightError) as excinfo:
        load_torchvision(tmp_path, True, CIFAR100_SPEC)
    assert "cannot download the official CIFAR-100" in error_message(excinfo)


@pytest.mark.parametrize("damage", ["truncated", "other_names", "labels_out_of_range", "no_data"])
def test_damaged_official_files(tmp_path: Path, damage: str):
    write_official(tmp_path)
    folder = tmp_path / "cifar-100-python"
    if damage == "truncated":
        data = (folder / "train").read_bytes()
        (folder / "train").write_bytes(data[: len(data) // 2])
        expected = "cannot read"
    elif damage == "other_names":
        names = [*CIFAR100_CLASSES[:-1], "computer_keyboard"]
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
        expected = "not CIFAR-100's"
    else:
        entry = pickle.loads((folder / "test").read_bytes())
        if damage == "labels_out_of_range":
            entry["fine_labels"][0] = 100
        else:
            del entry["data"]
        (folder / "test").write_bytes(pickle.dumps(entry))
        expected = "is not an official CIFAR-100 batch"
    with pytest.raises(KDLightError) as excinfo:
        load_torchvision(tmp_path, False, CIFAR100_SPEC)
    assert expected in error_message(excinfo)


# ---------------------------------------------------------------- archives and synthetic


def write_tree(root: Path, classes, train_per_class: int, test_per_class: int) -> Path:
    """``root/{train,test}/<class>/<i>.png`` in each class's :func:`colour`."""
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), colour(label)).save(folder / f"{i}.png")
    return root


def write_tar_gz(tree: Path, path: Path, prefix: str) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        archive.add(tree, arcname=prefix)
    return path


@pytest.fixture(scope="module")
def cifar100_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cifar100")
    tree = write_tree(folder / "tree", CIFAR100_CLASSES, 2, 1)
    return write_tar_gz(tree, folder / "cifar100.tar.gz", "cifar100")


def test_a_cifar100_archive_is_read_in_the_official_label_order(cifar100_tar: Path, tmp_path):
    datamodule = CIFAR100DataModule(
        archive_path=str(cifar100_tar), data_dir=str(tmp_path), val_size=50, eval_subset=100
    )
    datamodule.setup("fit")
    sizes = len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)
    assert sizes == (150, 50, 100)
    for dataset in (datamodule.train_set, datamodule.val_set, datamodule.test_set):
        assert labels_of(dataset.images.permute(0, 2, 3, 1).numpy()) == dataset.labels.tolist()
    assert sorted(datamodule.test_set.labels.tolist()) == list(range(100))  # one per class
    assert datamodule.test_set_id.startswith("archive:100/100:")
    assert [f.name for f in tmp_path.iterdir()] == [
        cache_file(cifar100_tar, Path(), CIFAR100_SPEC.cache_tag).name
    ]


def test_a_cifar10_folder_is_not_a_cifar100_archive(tmp_path: Path):
    tree = write_tree(tmp_path / "cifar10", CIFAR10_CLASSES, 1, 1)
    with pytest.raises(KDLightError) as excinfo:
        decode_archive(tree, CIFAR100_SPEC)
    message = error_message(excinfo)
    assert "CIFAR-100 archive" in message and "unknown class folder" in message
    assert "apple, aquarium_fish" in message and "(100 in all)" in message
    with pytest.raises(KDLightError) as excinfo:
        CIFAR100DataModule(source="archive")
    assert error_message(excinfo) == (
        "data.archive_path=null is not allowed: a path with data.source=archive "
        "(a CIFAR-100 image-folder .tar.gz)"
    )


def test_synthetic_cifar100_has_a_hundred_classes():
    datamodule = CIFAR100DataModule(
        source="synthetic", synthetic_train_size=2000, synthetic_test_size=500, val_size=200,
        batch_size=64, eval_subset=100,
    )  # fmt: skip
    datamodule.setup("fit")
    sizes = len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)
    assert sizes == (1800, 100, 100)
    labels = torch.cat([datamodule.train_set.labels, datamodule.val_set.labels])
    assert labels.min() == 0 and labels.max() == 99
    assert torch.bincount(datamodule.test_set.labels, minlength=100).tolist() == [1] * 100

    datamodule.with_index = True
    datamodule.trainer = SimpleNamespace(training=True, global_rank=1, world_size=1)
    images, labels, indices = datamodule.on_after_batch_transfer(
        next(iter(datamodule.train_dataloader())), 0
    )
    assert images.dtype == torch.float32 and torch.equal(labels, datamodule.train_labels[indices])
    assert set(datamodule.state_dict()["augment_generators"]) == {"1/cpu"}
    datamodule.trainer = SimpleNamespace(training=False)
    raw = datamodule.val_set.images[:8]
    assert torch.equal(
        datamodule.on_after_batch_transfer((raw, datamodule.val_set.labels[:8]), 0)[0],
        normalize(raw, CIFAR100_MEAN, CIFAR100_STD),
    )


# ------------------------------------------------------------------------------- configs


def test_data_cifar100_sets_num_classes_for_model_and_module(tmp_path: Path):
    overrides = ["data=cifar100", "data.source=synthetic", "model=small_cnn", "trainer=cpu"]
    overrides += ["trainer.max_epochs=1", "data.synthetic_train_size=300", "data.val_size=100"]
    cfg = compose_config(overrides, tmp_path)
    assert (cfg.num_classes, cfg.model.num_classes, cfg.module.num_classes) == (100, 100, 100)
    assert cfg.data._target_ == "kdlight.data.CIFAR100DataModule"
    validate_settings(cfg)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    assert isinstance(datamodule, CIFAR100DataModule) and datamodule.classes == CIFAR100_CLASSES
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert cfg.data.batch_size == compose_config([], tmp_path).data.batch_size  # CIFAR-10's


def test_data_cifar100_settings_that_do_not_fit(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KDLIGHT_CIFAR100_ARCHIVE", raising=False)
    cfg = compose_config(["data=cifar100", "num_classes=10"], tmp_path)
    with pytest.raises(KDLightError, match="num_classes=10 is not allowed: 100"):
        validate_settings(cfg)
    cfg = compose_config(["data=cifar100", "data.source=archive"], tmp_path)
    with pytest.raises(KDLightError, match="data.archive_path=null is not allowed"):
        validate_settings(cfg)
    monkeypatch.setenv("KDLIGHT_CIFAR100_ARCHIVE", "/data/cifar100.tar.gz")
    cfg = compose_config(["data=cifar100", "data.source=archive"], tmp_path)
    assert cfg.data.archive_path == "/data/cifar100.tar.gz"


def test_data_image_folder_composes_with_the_folders_classes(tmp_path: Path):
    tree = write_tree(tmp_path / "mine", ["cat", "dog", "ant"], 2, 1)
    overrides = ["data=image_folder", f"data.root={tree}", "num_classes=3", "model=small_cnn"]
    cfg = compose_config([*overrides, f"paths.data_dir={tmp_path / 'cache'}"], tmp_path)
    validate_settings(cfg)
    datamodule = instantiate(cfg.data)
    assert datamodule.classes == ("ant", "cat", "dog") and datamodule.num_classes == 3
    assert instantiate(cfg.model)(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    cfg = compose_config(["data=image_folder", f"data.root={tree}"], tmp_path)
    with pytest.raises(Exception) as excinfo:  # instantiate wraps the error; kdlight-train shows it
        instantiate(cfg.data)
    message = str(find_user_error(excinfo.value))
    assert "num_classes=10 does not fit" in message and "set num_classes=3" in message


# -------------------------------------------------------------------------- image folders

CLASSES = ("zebra", "ant", "cat", "dog")  # stored in this order, labelled alphabetically


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "mine", CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS + 1)


def folder_module(root: Path, cache: Path, **kwargs) -> ImageFolderDataModule:
    datamodule = ImageFolderDataModule(root=str(root), data_dir=str(cache), **kwargs)
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tar.gz"])
def test_an_image_folder_is_a_data_set(tree: Path, tmp_path: Path, packed: bool):
    root = write_tar_gz(tree, tmp_path / "mine.tar.gz", "mine") if packed else tree
    datamodule = folder_module(root, tmp_path / "cache", val_size=4, num_classes=4)
    assert datamodule.classes == ("ant", "cat", "dog", "zebra") and datamodule.num_classes == 4
    sizes = len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)
    assert sizes == (8, 4, 8)
    for dataset in (datamodule.train_set, datamodule.val_set, datamodule.test_set):
        painted = [
            CLASSES[label] for label in labels_of(dataset.images.permute(0, 2, 3, 1).numpy())
        ]
        assert painted == [datamodule.classes[label] for label in dataset.labels]
    assert datamodule.test_set_id.startswith("image_folder:8/8:")
    # mean and std of every training image, the held-out ones included
    pixels = np.array([colour(label) for label in range(4)], dtype=np.float64) / 255
    assert datamodule.mean == pytest.approx(tuple(pixels.mean(axis=0)))
    assert datamodule.std == pytest.approx(tuple(pixels.std(axis=0)))
    images = datamodule.test_set.images
    assert torch.equal(
        datamodule.normalize(images), normalize(images, datamodule.mean, datamodule.std)
    )


def test_an_image_folder_with_given_statistics_and_subsets(tree: Path, tmp_path: Path):
    datamodule = folder_module(
        tree, tmp_path, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], eval_subset=4
    )
    assert (datamodule.mean, datamodule.std) == ((0.5,) * 3, (0.25,) * 3)
    assert sorted(datamodule.test_set.labels.tolist()) == [0, 1, 2, 3]
    assert datamodule.val_set is datamodule.test_set  # val_size 0: validate on the test set


def test_channel_stats_match_numpy_in_chunks(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(image_folder_file, "STATS_CHUNK", 5)
    mean, std = channel_stats(images)
    pixels = images.reshape(-1, 3).astype(np.float64) / 255
    assert mean == pytest.approx(tuple(pixels.mean(axis=0)), abs=1e-12)
    assert std == pytest.approx(tuple(pixels.std(axis=0)), abs=1e-9)


def save(path: Path, size: int = 32, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), 100 if mode == "L" else (1, 2, 3)).save(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("no_root", "data=image_folder needs data.root=PATH"),
        ("missing", "image folder not found"),
        ("no_train", "has no images under 'train/<class>/'"),
        ("no_test", "has no images under 'test/<class>/'"),
        ("no_images", "has no images under 'train/<class>/'"),
        ("test_only_class", "class folder(s) under 'test/' that 'train/' lacks: lion"),
        ("one_class", "a classifier needs two or more"),
        ("num_classes", "num_classes=10 does not fit"),
        ("mean_only", "data.mean and data.std go together"),
        ("bad_std", "data.std=[0.2, 0.0, 0.2] is not allowed: three numbers > 0"),
    ],
)
def test_image_folder_errors_when_made(tree: Path, tmp_path: Path, change: str, expected: str):
    root, options = str(tree), {}
    if change == "no_root":
        root = None
    elif change == "missing":
        root = str(tmp_path / "nowhere")
    elif change in ("no_train", "no_test"):
        shutil.rmtree(tree / change.removeprefix("no_"))
    elif change == "no_images":
        for image in tree.rglob("*.png"):
            image.unlink()
    elif change == "test_only_class":
        save(tree / "test" / "lion" / "0.png")
    elif change == "one_class":
        for name in CLASSES[1:]:
            shutil.rmtree(tree / "train" / name)
            shutil.rmtree(tree / "test" / name)
    elif change == "num_classes":
        options = {"num_classes": 10}
    elif change == "mean_only":
        options = {"mean": [0.5, 0.5, 0.5]}
    elif change == "bad_std":
        options = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}
    with pytest.raises(KDLightError) as excinfo:
        ImageFolderDataModule(root=root, data_dir=str(tmp_path / "cache"), **options)
    assert expected in error_message(excinfo)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("large", "image train/cat/big.png is 64x64, expected 32x32"),
        ("grayscale", "image train/cat/grey.png is grayscale (L), expected RGB"),
        ("undecodable", "cannot decode image train/cat/broken.jpg"),
        ("test_lacks_a_class", "class folder(s) missing under 'test/': dog"),
    ],
)
def test_image_folder_errors_when_loaded(tree: Path, tmp_path: Path, change: str, expected: str):
    if change == "large":
        save(tree / "train" / "cat" / "big.png", size=64)
    elif change == "grayscale":
        save(tree / "train" / "cat" / "grey.png", mode="L")
    elif change == "undecodable":
        (tree / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    else:
        shutil.rmtree(tree / "test" / "dog")
    datamodule = ImageFolderDataModule(root=str(tree), data_dir=str(tmp_path / "cache"))
    with pytest.raises(KDLightError) as excinfo:
        datamodule.setup("fit")
    message = error_message(excinfo)
    assert expected in message and str(tree) in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_val_size_must_leave_training_images_of_a_folder(tree: Path, tmp_path: Path):
    images = len(CLASSES) * TRAIN_PER_CLASS  # known when loaded
    datamodule = ImageFolderDataModule(str(tree), data_dir=str(tmp_path / "cache"), val_size=images)
    with pytest.raises(KDLightError) as excinfo:
        datamodule.setup("fit")
    assert error_message(excinfo) == (
        f"data.val_size={images} is not allowed: fewer than the {images} training images"
    )


def test_image_folder_classes_of_a_tar_gz_with_a_top_folder(tree: Path, tmp_path: Path):
    archive = write_tar_gz(tree, tmp_path / "mine.tar.gz", "top/level")
    assert (
        image_folder_classes(archive)
        == image_folder_classes(tree)
        == ("ant", "cat", "dog", "zebra")
    )
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(KDLightError) as excinfo:
        image_folder_classes(tmp_path / "junk.tar.gz")
    assert "cannot read image folder" in error_message(excinfo)
