"""``data.eval_subset``: seeded class-stratified evaluation subsets, and ``test_set_id``."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from kdlight.data import CIFAR10_CLASSES, CIFAR10DataModule, Split, stratified_subset
from kdlight.errors import KDLightError
from kdlight.lit import ClassifierModule
from kdlight.models import create_model
from tests.conftest import TINY, compose_config, cpu_trainer
from tests.test_data import class_colour, write_tar_gz

TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 7


def write_distinct_tree(root: Path) -> Path:
    """``root/{train,test}/<class>/<i>.png``: every image different (its class colour, with
    the image's number written into one pixel), stored class by class like the real archive."""
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", (32, 32), class_colour(label))
                image.putpixel((0, 0), (i, 255 - i, 7 * i))
                image.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_distinct_tree(tmp_path_factory.mktemp("eval-subset") / "cifar10")


def archive_module(archive: Path, cache: Path, **kwargs) -> CIFAR10DataModule:
    options = {"val_size": 10, "eval_batch_size": 1000, **kwargs}
    datamodule = CIFAR10DataModule(archive_path=str(archive), data_dir=str(cache), **options)
    datamodule.setup()
    return datamodule


def synthetic_module(**kwargs) -> CIFAR10DataModule:
    options = dict(source="synthetic", synthetic_train_size=600, synthetic_test_size=300)
    datamodule = CIFAR10DataModule(**{**options, "val_size": 100, **kwargs})
    datamodule.setup()
    return datamodule


def class_counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=10).tolist()


def image_set(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def test_eval_subset_takes_an_equal_share_of_every_class():
    full, subset = synthetic_module(), synthetic_module(eval_subset=55)
    assert len(subset.test_set) == 55
    assert sorted(class_counts(subset.test_set.labels)) == [5] * 5 + [6] * 5
    assert image_set(subset.test_set.images) <= image_set(full.test_set.images)

    # Validation: the same share among the (seeded) held-out images.
    assert len(subset.val_set) == 55
    assert image_set(subset.val_set.images) <= image_set(full.val_set.images)
    available = class_counts(full.val_set.labels)
    for have, count in zip(available, class_counts(subset.val_set.labels), strict=True):
        assert count == have or count >= 5, (available, class_counts(subset.val_set.labels))
    assert len(synthetic_module(eval_subset=200).val_set) == 100  # all 100 held-out images
    assert len(synthetic_module(eval_subset=55, val_size=0).val_set) == 55  # = the test subset


def test_a_short_test_of_a_class_sorted_archive_sees_every_class(tree: Path, tmp_path: Path):
    """The archive's test split is stored class by class, so its first batches are the first
    classes only; a stratified subset tests every class (no 'n/a' in the report)."""
    datamodule = archive_module(tree, tmp_path, eval_subset=20, eval_batch_size=10)
    assert class_counts(datamodule.test_set.labels) == [2] * 10

    torch.manual_seed(0)
    module = ClassifierModule(create_model("small_cnn", width=0.25))
    cpu_trainer(tmp_path, epochs=1).test(module, datamodule=datamodule)
    summary = module.test_summary
    assert summary["test_images"] == 20
    assert None not in summary["per_class_accuracy"].values(), summary


def test_every_seed_tests_the_same_images(tree: Path, tmp_path: Path):
    seed0, seed1 = (archive_module(tree, tmp_path, eval_subset=25, seed=s) for s in (0, 1))
    assert image_set(seed0.test_set.images) == image_set(seed1.test_set.images)
    assert seed0.test_set_id == seed1.test_set_id
    assert not torch.equal(seed0.train_set.labels, seed1.train_set.labels)  # other runs


def test_the_subset_does_not_depend_on_the_order_images_are_stored_in(tree: Path, tmp_path: Path):
    tar_gz = write_tar_gz(tree, tmp_path / "cifar10.tar.gz")  # classes stored in reverse order
    folder = archive_module(tree, tmp_path / "c1", eval_subset=33)
    packed = archive_module(tar_gz, tmp_path / "c2", eval_subset=33)
    assert not torch.equal(folder.test_set.labels, packed.test_set.labels)  # another order
    assert image_set(folder.test_set.images) == image_set(packed.test_set.images)
    assert folder.test_set_id == packed.test_set_id


def test_stratified_subsets_are_nested_and_fill_up_from_other_classes():
    labels = np.repeat(np.arange(10), [1, 2, 9, 9, 9, 9, 9, 9, 9, 9])
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    split = Split(images, labels)
    previous = set()
    for size in range(1, len(split) + 1):
        chosen = stratified_subset(split, size)
        assert len(chosen) == size == len(set(chosen.tolist()))
        assert previous <= set(chosen.tolist())
        previous = set(chosen.tolist())
        counts = np.bincount(labels[chosen], minlength=10)
        # A class has at most one image fewer than another, unless it has no more to give.
        behind = counts < counts.max() - 1
        assert (counts[behind] == np.bincount(labels, minlength=10)[behind]).all(), counts
    assert stratified_subset(split, 30).tolist() == stratified_subset(split, 30).tolist()


def test_test_set_id_names_the_images(tree: Path, tmp_path: Path):
    datamodule = CIFAR10DataModule(archive_path=str(tree), data_dir=str(tmp_path), val_size=10)
    assert getattr(datamodule, "test_set_id", None) is None  # known after setup
    datamodule.setup()
    ids = {
        "all": datamodule.test_set_id,
        "all, as a number": archive_module(tree, tmp_path, eval_subset=70).test_set_id,
        "20": archive_module(tree, tmp_path, eval_subset=20).test_set_id,
        "21": archive_module(tree, tmp_path, eval_subset=21).test_set_id,
        "synthetic": synthetic_module().test_set_id,
        "synthetic, seed 1": synthetic_module(seed=1).test_set_id,  # one fixed synthetic set
    }
    assert ids["all"] == ids["all, as a number"] == f"archive:70/70:{ids['all'].split(':')[-1]}"
    assert ids["20"].startswith("archive:20/70:") and ids["synthetic"].startswith("synthetic:")
    assert ids["synthetic"] == ids["synthetic, seed 1"]  # the seed never changes the images
    assert len(set(ids.values())) == len(ids) - 2

    changed = tmp_path / "changed"
    write_distinct_tree(changed)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(changed / "test" / "cat" / "0.png")
    assert archive_module(changed, tmp_path).test_set_id != ids["all"]


@pytest.mark.parametrize("size", [0, -3])
def test_eval_subset_must_be_positive(size: int):
    with pytest.raises(KDLightError) as excinfo:
        CIFAR10DataModule(source="synthetic", eval_subset=size)
    assert str(excinfo.value) == (
        f"data.eval_subset={size} is not allowed: null or an integer >= 1"
    )


def test_eval_subset_larger_than_the_test_set():
    datamodule = CIFAR10DataModule(
        source="synthetic", synthetic_train_size=600, synthetic_test_size=300, val_size=100,
        eval_subset=301,
    )  # fmt: skip
    with pytest.raises(KDLightError) as excinfo:
        datamodule.setup()
    assert str(excinfo.value) == (
        "data.eval_subset=301 is more than the 300 test images; choose 1 to 300, or null for all"
    )


def test_eval_subset_in_the_config(tmp_path: Path):
    assert compose_config(TINY, tmp_path).data.eval_subset is None
    cfg = compose_config([*TINY, "data.eval_subset=40"], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    assert len(datamodule.test_set) == len(datamodule.val_set) == 40
    assert datamodule.test_set_id.startswith("synthetic:40/300:")
