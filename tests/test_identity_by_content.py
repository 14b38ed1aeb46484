"""What names a teacher and its cache is content, not a path: a teacher checkpoint written
over in place is another teacher (another run, another cache), and the teacher cache's key
follows the training images' content, the augmentation switch and the normalisation."""

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdlight.data import ImageFolderDataModule
from kdlight.models import create_model
from kdlight.runs.identity import run_folder
from kdlight.teacher.find import resolve_teacher
from kdlight.teacher.frozen import teacher_cache_for
from tests.conftest import compose_config, synthetic_datamodule


def test_a_teacher_file_written_over_in_place_is_another_teacher(tmp_path: Path):
    """Same path, same size, other weights: a new run id and a new cache key; the first
    weights written back: the first run and cache again."""
    checkpoint = tmp_path / "teacher.pt"
    cfg = compose_config(
        ["experiment=distill", "trainer=cpu", "data=synthetic",
         f"distill.teacher_checkpoint={checkpoint}"], tmp_path,
    )  # fmt: skip
    data = synthetic_datamodule(train=40, test=10, val=0, batch=10, data_dir=tmp_path)
    data.setup("fit")

    def write(seed: int) -> os.stat_result:
        torch.manual_seed(seed)
        torch.save(create_model("resnet8").state_dict(), checkpoint)
        return checkpoint.stat()

    def identities() -> tuple[str, str, Path]:
        teacher = create_model("resnet8")
        teacher.load_state_dict(torch.load(checkpoint, weights_only=True))
        cache = teacher_cache_for(teacher, checkpoint, data, "32-true", 10)
        return resolve_teacher(cfg).identity, run_folder(_root_=cfg), cache.path

    first_file = write(0)
    first = identities()
    assert first[0].startswith("file:") and "seed0-" in first[1]
    second_file = write(1)
    assert (second_file.st_ino, second_file.st_size) == (first_file.st_ino, first_file.st_size)
    second = identities()
    assert all(new != old for new, old in zip(second, first, strict=True)), (first, second)
    write(0)
    assert identities() == first


def write_image_folder(root: Path, shade: int = 0) -> Path:
    """``root/{train,test}/<class>/<i>.png``: two classes, six training and two test images
    each, of random pixels (seeded); ``shade`` is added to the first training image."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
                if (split, name, i) == ("train", "cat", 0):
                    pixels += np.uint8(shade)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


#: The per-channel statistics the image folders below are normalised with, unless told.
MEAN, STD = (0.4, 0.4, 0.4), (0.25, 0.25, 0.25)


def cache_key_of(root: Path, data_dir: Path, augment: bool = True, mean=MEAN, std=STD) -> str:
    """The teacher cache's key (its files' name) for one fixed teacher on ``root``."""
    data = ImageFolderDataModule(str(root), data_dir=data_dir, augment=augment, mean=mean, std=std)
    data.setup("fit")
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=2).eval()
    return teacher_cache_for(teacher, None, data, "32-true", data.num_classes).path.name


def test_the_teacher_cache_key_follows_the_data_the_augmentation_and_the_normalisation(
    tmp_path: Path,
):
    data_dir = tmp_path / "cache"
    images = write_image_folder(tmp_path / "images")
    base = cache_key_of(images, data_dir)
    # the same images, read again or copied elsewhere: the same answers, the same cache
    assert cache_key_of(images, data_dir) == base
    assert cache_key_of(shutil.copytree(images, tmp_path / "copy"), data_dir) == base
    # as many images of the same size, one of them other: another cache
    assert cache_key_of(write_image_folder(tmp_path / "other", shade=1), data_dir) != base
    # the same images without augmentation, or normalised otherwise: another cache
    assert cache_key_of(images, data_dir, augment=False) != base
    assert cache_key_of(images, data_dir, mean=(0.5, 0.4, 0.4)) != base
    assert cache_key_of(images, data_dir, std=(0.25, 0.25, 0.3)) != base
    assert cache_key_of(images, data_dir, mean=None, std=None) != base  # computed from them
