"""CIFAR-10 sources (synthetic, image-folder archives, the offline copy) and the DataModule."""

import io
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kdlight.data import (
    CIFAR10_CLASSES,
    CIFAR10DataModule,
    Split,
    decode_archive,
    load_archive,
    make_synthetic,
    normalize,
    sources,
)
from kdlight.errors import KDLightError

TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


# ------------------------------------------------------------------------------ helpers


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct solid RGB colour per class, far enough apart to survive JPEG."""
    return (25 * label, 250 - 25 * label, (70 * label) % 256)


def colour_label(image: np.ndarray) -> int:
    """The class whose colour is nearest to the image's mean colour."""
    colours = np.array([class_colour(label) for label in range(10)], dtype=np.float64)
    mean = image.reshape(-1, 3).mean(axis=0)
    return int(np.argmin(((colours - mean) ** 2).sum(axis=1)))


def write_image_tree(root: Path, size: int = 32) -> Path:
    """``root/{train,test}/<class>/<i>.png|jpg``: solid class colours, PNG and JPEG mixed."""
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", (size, size), class_colour(label))
                image.save(folder / (f"{i}.png" if i % 2 == 0 else f"{i}.jpg"))
    (root / "README.txt").write_text("not an image\n")
    return root


def write_tar_gz(tree: Path, path: Path, prefix: str = "cifar10") -> Path:
    """A .tar.gz of ``tree`` under ``prefix/``, classes stored in reverse order (truck first)."""
    files = sorted((f for f in tree.rglob("*") if f.is_file()), reverse=True)
    with tarfile.open(path, "w:gz") as archive:
        for file in files:
            archive.add(file, arcname=f"{prefix}/{file.relative_to(tree).as_posix()}")
    return path


def save_image(path: Path, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (1, 2, 3)).save(path)


def error_message(excinfo: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be the single line that kdlight-train prints."""
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def check_fake_splits(splits: dict[str, Split]) -> None:
    """Counts, dtypes and CIFAR-order labels of an archive made by :func:`write_image_tree`."""
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images, labels = splits[split].images, splits[split].labels
        assert images.shape == (10 * per_class, 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        assert [colour_label(image) for image in images] == labels.tolist()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "cifar10")


@pytest.fixture
def tar_gz(tree: Path, tmp_path: Path) -> Path:
    return write_tar_gz(tree, tmp_path / "cifar10.tar.gz")


def synthetic_module(**kwargs) -> CIFAR10DataModule:
    options = dict(source="synthetic", synthetic_train_size=2000, synthetic_test_size=500)
    datamodule = CIFAR10DataModule(**{**options, "val_size": 200, **kwargs})
    datamodule.setup("fit")
    return datamodule


def image_bytes(images: torch.Tensor) -> list[bytes]:
    """Each image as bytes, sorted: compares sets of images regardless of order."""
    return sorted(bytes(image.numpy().tobytes()) for image in images)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed():
    first, again, other = (make_synthetic(300, 100, seed=s) for s in (0, 0, 1))
    for split, size in (("train", 300), ("test", 100)):
        assert first[split].images.shape == (size, 32, 32, 3)
        assert first[split].images.dtype == np.uint8
        assert first[split].labels.dtype == np.int64
        assert np.bincount(first[split].labels, minlength=10).tolist() == [size // 10] * 10
        np.testing.assert_array_equal(first[split].images, again[split].images)
        np.testing.assert_array_equal(first[split].labels, again[split].labels)
        assert not np.array_equal(first[split].images, other[split].images)
    assert not np.array_equal(first["train"].images[:100], first["test"].images)


def test_datamodule_splits_synthetic_data():
    datamodule = synthetic_module(batch_size=64)
    sizes = len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)
    assert sizes == (1800, 200, 500)
    full = make_synthetic(2000, 500, seed=0)["train"]
    train_and_val = torch.cat([datamodule.train_set.images, datamodule.val_set.images])
    assert image_bytes(train_and_val) == image_bytes(
        torch.from_numpy(full.images).permute(0, 3, 1, 2)
    )

    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (64,) and labels.dtype == torch.int64
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (200, 3, 32, 32) and labels.shape == (200,)


def test_train_subset_takes_the_first_images_of_the_same_split():
    full, subset = synthetic_module(), synthetic_module(train_subset=100)
    assert len(subset.train_set) == 100
    assert torch.equal(subset.train_set.images, full.train_set.images[:100])
    assert torch.equal(subset.val_set.images, full.val_set.images)


def test_val_size_zero_validates_on_the_test_set():
    datamodule = synthetic_module(val_size=0)
    assert len(datamodule.train_set) == 2000
    assert datamodule.val_set is datamodule.test_set


def test_split_depends_only_on_the_seed(tree: Path, tmp_path: Path):
    def split(seed: int) -> CIFAR10DataModule:
        datamodule = CIFAR10DataModule(
            source="archive", archive_path=str(tree), data_dir=str(tmp_path / "cache"),
            val_size=10, seed=seed,
        )  # fmt: skip
        datamodule.setup()
        return datamodule

    first, again, other = split(0), split(0), split(1)
    assert torch.equal(first.val_set.images, again.val_set.images)
    assert torch.equal(first.train_set.labels, again.train_set.labels)
    assert not torch.equal(first.val_set.images, other.val_set.images)
    assert image_bytes(torch.cat([first.train_set.images, first.val_set.images])) == image_bytes(
        torch.cat([other.train_set.images, other.val_set.images])
    )


def test_on_after_batch_transfer_normalises_and_augments_only_in_training():
    datamodule = synthetic_module(batch_size=32)
    images, labels = next(iter(datamodule.train_dataloader()))
    plain = normalize(images)

    datamodule.trainer = None
    out, out_labels = datamodule.on_after_batch_transfer((images, labels), 0)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, plain) and out_labels is labels
    assert abs(out.mean().item()) < 1.0

    datamodule.trainer = SimpleNamespace(training=False)
    assert torch.equal(datamodule.on_after_batch_transfer((images, labels), 0)[0], plain)

    datamodule.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    augmented, _ = datamodule.on_after_batch_transfer((images, labels), 0)
    assert augmented.dtype == torch.float32 and augmented.shape == images.shape
    assert not torch.equal(augmented, plain)

    no_augment = synthetic_module(batch_size=32, augment=False)
    no_augment.trainer = SimpleNamespace(training=True)
    assert torch.equal(no_augment.on_after_batch_transfer((images, labels), 0)[0], plain)


# ------------------------------------------------------------------------------ indices


def transferred(datamodule: CIFAR10DataModule, loader, training: bool) -> list[tuple]:
    """Every batch of ``loader`` as ``on_after_batch_transfer`` gives it in that stage."""
    datamodule.trainer = SimpleNamespace(training=training, global_rank=0, world_size=1)
    return [datamodule.on_after_batch_transfer(batch, 0) for batch in loader]


@pytest.mark.parametrize("on_device", [False, True])
def test_with_index_training_batches_hold_each_images_position(on_device: bool):
    datamodule = synthetic_module(batch_size=64, augment=False, on_device=on_device)
    datamodule.with_index = True
    train_set = datamodule.train_set
    seen = []
    for images, labels, indices in transferred(datamodule, datamodule.train_dataloader(), True):
        assert indices.dtype == torch.int64
        assert torch.equal(images, normalize(train_set.images[indices]))
        assert torch.equal(labels, datamodule.train_labels[indices])
        seen.append(indices)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(len(train_set)))  # an epoch
    assert not torch.equal(torch.cat(seen), torch.arange(len(train_set)))  # shuffled

    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert {len(batch) for batch in transferred(datamodule, loader, False)} == {2}


@pytest.mark.parametrize("on_device", [False, True])
def test_training_batches_have_no_index_unless_asked(on_device: bool):
    datamodule = synthetic_module(batch_size=64, on_device=on_device)
    batches = transferred(datamodule, datamodule.train_dataloader(), True)
    assert {len(batch) for batch in batches} == {2}


def test_with_index_reaches_worker_processes():
    datamodule = synthetic_module(batch_size=500, augment=False, num_workers=2)
    datamodule.with_index = True
    batches = transferred(datamodule, datamodule.train_dataloader(), True)
    indices = torch.cat([batch[2] for batch in batches])
    assert torch.equal(indices.sort().values, torch.arange(len(datamodule.train_set)))


def test_train_labels_are_the_training_sets_labels_after_setup():
    datamodule = CIFAR10DataModule(source="synthetic", synthetic_train_size=500, val_size=100)
    assert getattr(datamodule, "train_labels", None) is None
    datamodule.setup("fit")
    labels = datamodule.train_labels
    assert labels.dtype == torch.int64 and len(labels) == len(datamodule.train_set) == 400
    assert torch.equal(labels, datamodule.train_set.labels)


def test_the_augmentation_generators_of_other_processes_survive_a_checkpoint(tmp_path: Path):
    """Process 0 draws from the global generator (the callbacks keep it); a DDP process's own
    generator is in the data module's state, and a resumed data module continues it."""
    images = synthetic_module().train_set.images[:64]
    alone = synthetic_module()
    alone.trainer = SimpleNamespace(training=True, global_rank=0)
    alone.on_after_batch_transfer((images, torch.zeros(64)), 0)
    assert alone.state_dict() == {}

    second = synthetic_module()
    second.trainer = SimpleNamespace(training=True, global_rank=1)
    second.on_after_batch_transfer((images, torch.zeros(64)), 0)
    torch.save(second.state_dict(), tmp_path / "state.pt")
    expected = second.on_after_batch_transfer((images, torch.zeros(64)), 0)[0]

    resumed = synthetic_module()
    resumed.trainer = SimpleNamespace(training=True, global_rank=1)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(resumed.on_after_batch_transfer((images, torch.zeros(64)), 0)[0], expected)

    afresh = synthetic_module()  # without the state: the first batch's crops again
    afresh.trainer = SimpleNamespace(training=True, global_rank=1)
    assert not torch.equal(
        afresh.on_after_batch_transfer((images, torch.zeros(64)), 0)[0], expected
    )


# ------------------------------------------------------------------------------ archive


def test_decode_folder(tree: Path):
    check_fake_splits(decode_archive(tree))


def test_decode_tar_gz_with_a_top_level_folder(tar_gz: Path):
    with tarfile.open(tar_gz) as archive:
        assert archive.getnames()[0].startswith("cifar10/train/truck/")
    check_fake_splits(decode_archive(tar_gz))


def test_load_archive_caches_the_decoded_arrays(tar_gz: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_archive(tar_gz, cache)
    check_fake_splits(first)
    assert [f.suffix for f in cache.iterdir()] == [".npz"]

    def must_not_decode(path: Path) -> dict[str, Split]:
        raise AssertionError(f"decoded {path} again instead of reading the cache")

    monkeypatch.setattr(sources, "decode_archive", must_not_decode)
    second = load_archive(tar_gz, cache)
    for split in ("train", "test"):
        np.testing.assert_array_equal(second[split].images, first[split].images)
        np.testing.assert_array_equal(second[split].labels, first[split].labels)
        assert second[split].labels.dtype == np.int64
    datamodule = CIFAR10DataModule(archive_path=str(tar_gz), data_dir=str(cache), val_size=5)
    datamodule.setup()
    assert len(datamodule.train_set) + len(datamodule.val_set) == 10 * TRAIN_PER_CLASS
    assert len(list(cache.iterdir())) == 1


def test_a_changed_archive_is_decoded_again(tree: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    archive = write_tar_gz(tree, tmp_path / "cifar10.tar.gz")
    assert len(load_archive(archive, cache)["train"]) == 10 * TRAIN_PER_CLASS
    save_image(tree / "train" / "cat" / "extra.png")
    write_tar_gz(tree, archive)
    assert len(load_archive(archive, cache)["train"]) == 10 * TRAIN_PER_CLASS + 1
    assert len(list(cache.glob("*.npz"))) == 2


# ---------------------------------------------------------------------------- bad input


def test_missing_archive(tmp_path: Path):
    path = tmp_path / "missing.tar.gz"
    for load in (decode_archive, lambda p: load_archive(p, tmp_path / "cache")):
        with pytest.raises(KDLightError) as excinfo:
            load(path)
        message = error_message(excinfo)
        assert str(path) in message and "not found" in message
    assert not list(tmp_path.rglob("*.npz"))


def test_random_bytes_are_not_an_archive(tmp_path: Path):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(KDLightError) as excinfo:
        load_archive(path, tmp_path / "cache")
    message = error_message(excinfo)
    assert str(path) in message and "cannot read" in message
    assert not list(tmp_path.rglob("*.npz"))


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6, 0.9, 0.98])
def test_truncated_tar_gz(tar_gz: Path, tmp_path: Path, keep: float):
    data = tar_gz.read_bytes()
    path = tmp_path / "truncated.tar.gz"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(KDLightError) as excinfo:
        decode_archive(path)
    message = error_message(excinfo)
    assert str(path) in message and "cannot read" in message


def test_images_outside_split_class_folders(tmp_path: Path):
    root = tmp_path / "flat"
    for label, name in enumerate(CIFAR10_CLASSES):
        save_image(root / "images" / name / f"{label}.png")  # no train/ or test/
        save_image(root / "train" / f"{label}.png")  # no class folder
    with pytest.raises(KDLightError) as excinfo:
        decode_archive(root)
    message = error_message(excinfo)
    assert str(root) in message and "train/<class>/" in message


def test_missing_class_folder_is_named(tree: Path, tmp_path: Path):
    shutil.rmtree(tree / "test" / "frog")
    for path in (tree, write_tar_gz(tree, tmp_path / "no-frog.tar.gz")):
        with pytest.raises(KDLightError) as excinfo:
            decode_archive(path)
        message = error_message(excinfo)
        assert str(path) in message and "missing" in message and "test/" in message
        assert "frog" in message and "horse" not in message


def test_unknown_class_folder(tree: Path):
    save_image(tree / "train" / "unicorn" / "0.png")
    with pytest.raises(KDLightError) as excinfo:
        decode_archive(tree)
    message = error_message(excinfo)
    assert str(tree) in message and "unknown class" in message and "unicorn" in message


def test_image_of_the_wrong_size(tree: Path):
    save_image(tree / "train" / "cat" / "big.png", size=64)
    with pytest.raises(KDLightError) as excinfo:
        decode_archive(tree)
    message = error_message(excinfo)
    assert str(tree) in message and "big.png" in message
    assert "64x64" in message and "expected 32x32" in message


def test_undecodable_image(tree: Path):
    (tree / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(KDLightError) as excinfo:
        decode_archive(tree)
    message = error_message(excinfo)
    assert str(tree) in message and "cannot decode" in message and "broken.jpg" in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"source": "archive"}, "archive_path"),
        ({"source": "archive", "archive_path": ""}, "archive_path"),
        ({"source": "synthetic", "batch_size": 0}, "batch_size"),
        ({"source": "synthetic", "val_size": -1}, "val_size"),
        ({"source": "bogus"}, "bogus"),
    ],
)
def test_datamodule_rejects_bad_options(kwargs: dict, expected: str):
    with pytest.raises(KDLightError) as excinfo:
        CIFAR10DataModule(**kwargs)
    assert expected in error_message(excinfo)


def test_val_size_must_leave_training_images():
    with pytest.raises(KDLightError) as excinfo:  # when made: the size is a setting
        CIFAR10DataModule(
            source="synthetic", synthetic_train_size=100, synthetic_test_size=10, val_size=100
        )
    assert error_message(excinfo) == (
        "data.val_size=100 is not allowed: fewer than data.synthetic_train_size=100"
    )


# ------------------------------------------------------------------- the real archive


@pytest.fixture(scope="module")
def real_splits(archive: Path, archive_cache: Path) -> dict[str, Split]:
    """The offline CIFAR-10 copy, decoded once per session by conftest's ``archive_cache``."""
    return load_archive(archive, archive_cache)


def read_members(archive: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """Decode the archive members whose last three path parts are in ``wanted``."""
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            key = "/".join(PurePosixPath(member.name).parts[-3:])
            if key in wanted:
                data = tar.extractfile(member).read()
                found[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                if len(found) == len(wanted):
                    break
    return found


@pytest.mark.slow
def test_real_archive_counts(real_splits: dict[str, Split]):
    for split, per_class in (("train", 5000), ("test", 1000)):
        images, labels = real_splits[split].images, real_splits[split].labels
        assert images.shape == (10 * per_class, 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        assert np.bincount(labels, minlength=11).tolist() == [per_class] * 10 + [0]
    assert 100 < real_splits["train"].images.mean() < 150


@pytest.mark.slow
def test_real_archive_labels_follow_cifar_order(archive: Path, real_splits: dict[str, Split]):
    known = {"train/airplane/0000.jpg": 0, "train/cat/0000.jpg": 3, "test/truck/0000.jpg": 9}
    members = read_members(archive, set(known))
    assert members.keys() == known.keys()
    for name, label in known.items():
        split = real_splits[name.split("/")[0]]
        matches = np.flatnonzero((split.images == members[name]).all(axis=(1, 2, 3)))
        assert matches.size >= 1, f"{name} not among the decoded images"
        assert set(split.labels[matches].tolist()) == {label}, name


@pytest.mark.slow
def test_real_archive_datamodule(archive: Path, archive_cache: Path):
    datamodule = CIFAR10DataModule(archive_path=str(archive), data_dir=str(archive_cache))
    datamodule.setup("fit")
    sizes = len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)
    assert sizes == (45000, 5000, 10000)
    counts = torch.bincount(
        torch.cat([datamodule.train_set.labels, datamodule.val_set.labels]), minlength=10
    )
    assert counts.tolist() == [5000] * 10
    assert len(list(archive_cache.glob("*.npz"))) == 1
