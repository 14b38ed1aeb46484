"""The strong view (:mod:`kdlight.data.strong`) against the official Pillow code of MLKD,
operation by operation and whole, and the data module's training batches with and without it.

The official functions are written here from MLKD's ``mdistiller/dataset/cifar100.py``
(read, not imported; line numbers of github.com/Jin-Ying/Multi-Level-Logit-Distillation)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kdlight.data import CIFAR10DataModule, normalize
from kdlight.data.augment import STRONG, process_generator
from kdlight.data.strong import OPERATIONS, apply, cutout, rand_augment, strong_view

pytestmark = pytest.mark.usefixtures("one_thread")


def official(name: str, img: Image.Image, v: float) -> Image.Image:
    """The official operation ``name`` (cifar100.py:144-239)."""
    w, h = img.size
    affine = {
        "shear_x": (1, v, 0, 0, 1, 0),  # :197
        "shear_y": (1, 0, 0, v, 1, 0),  # :204
        "translate_x": (1, 0, v * w, 0, 1, 0),  # :210-212
        "translate_y": (1, 0, 0, 0, 1, v * h),  # :225-227
    }
    if name in affine:
        return img.transform(img.size, Image.AFFINE, affine[name])
    return {
        "autocontrast": lambda: ImageOps.autocontrast(img),  # :145
        "brightness": lambda: ImageEnhance.Brightness(img).enhance(v),  # :150
        "color": lambda: ImageEnhance.Color(img).enhance(v),  # :155
        "contrast": lambda: ImageEnhance.Contrast(img).enhance(v),  # :160
        "equalize": lambda: ImageOps.equalize(img),  # :164
        "identity": lambda: img,  # :172
        "posterize": lambda: ImageOps.posterize(img, max(1, int(v))),  # :175-178
        "rotate": lambda: img.rotate(v),  # :185
        "sharpness": lambda: ImageEnhance.Sharpness(img).enhance(v),  # :190
        "solarize": lambda: ImageOps.solarize(img, v),  # :239
    }[name]()


def official_cutout(img: Image.Image, v: float) -> Image.Image:
    """Cutout and CutoutAbs (cifar100.py:242-268), numpy's global stream drawing."""
    if v <= 0.0:
        return img
    v = v * img.size[0]
    w, h = img.size
    x0, y0 = np.random.uniform(w), np.random.uniform(h)
    x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
    xy = (x0, y0, min(w, x0 + v), min(h, y0 + v))
    img = img.copy()
    ImageDraw.Draw(img).rectangle(xy, (125, 123, 114))
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def images(n: int, seed: int) -> list[np.ndarray]:
    """Random uint8 images, each over a band of levels of its own (autocontrast stretches)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 160, (32, 32, 3)) + rng.integers(0, 96)).astype(np.uint8) for _ in range(n)
    ]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op[0] for op in OPERATIONS])
def test_each_operation_is_pillows_to_the_grey_level(operation):
    name, low, high = operation
    rng = np.random.default_rng(1)
    for array in images(6, seed=len(name)):
        value = low + (high - low) * rng.random()
        expected = to_tensor(official(name, Image.fromarray(array), value))
        assert torch.equal(apply(torch.from_numpy(array).permute(2, 0, 1), name, value), expected)


def test_the_cutout_is_the_officials_with_its_draws():
    """The official corner ``np.random.uniform(w)`` is numpy's ``w + (1 - w) u``: given the
    same ``u``, the same square (a rectangle of Pillow's, last row and column inclusive)."""
    for seed, array in enumerate(images(20, seed=3)):
        fraction = 0.5 * (seed + 1) / 20
        np.random.seed(seed)
        expected = to_tensor(official_cutout(Image.fromarray(array), fraction))
        np.random.seed(seed)
        x, y = np.random.random_sample(), np.random.random_sample()
        got = cutout(torch.from_numpy(array).permute(2, 0, 1), fraction, x, y)
        assert torch.equal(got, expected)
    unchanged = torch.from_numpy(images(1, seed=4)[0]).permute(2, 0, 1)
    assert torch.equal(cutout(unchanged, 0.0, 0.5, 0.5), unchanged)


def test_rand_augment_is_two_official_operations_then_a_cutout():
    """``RandAugment(2, 10).__call__`` (cifar100.py:298-305): two operations with
    replacement, each strength ``min + (max - min) u``, then Cutout of ``u * 0.5``; given
    the uniform draws kdlight takes, Pillow's image."""
    batch = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images(16, seed=5)])
    generator = torch.Generator().manual_seed(7)
    draws = torch.rand(16, 7, generator=torch.Generator().manual_seed(7)).double().tolist()
    got = rand_augment(batch, generator)
    for image, row, augmented in zip(batch, draws, got, strict=True):
        img = Image.fromarray(image.permute(1, 2, 0).numpy())
        for k in range(2):
            name, low, high = OPERATIONS[int(row[2 * k] * 14)]
            img = official(name, img, low + (high - low) * row[2 * k + 1])
        side = row[4] * 0.5 * 32
        x0 = int(max(0, 32 - 31 * row[5] - side / 2))
        y0 = int(max(0, 32 - 31 * row[6] - side / 2))
        if side > 0:
            ImageDraw.Draw(img).rectangle(
                (x0, y0, min(32, x0 + side), min(32, y0 + side)), (125, 123, 114)
            )
        assert torch.equal(augmented, to_tensor(img))


def test_training_batches_end_with_the_strong_view_on_request():
    """Off: the batch is what it always was. On: the first view is unchanged, the strong
    view, last, is a crop and flip of its own then RandAugment, normalised, drawn from a
    stream of its own (the global stream moves as it does without it, so every later batch
    is a run's without the strong view); evaluation batches never carry it."""
    data = CIFAR10DataModule(
        source="synthetic", synthetic_train_size=100, synthetic_test_size=20, val_size=0
    )
    data.setup()
    raw = (data.train_set.images[:32], data.train_set.labels[:32])
    data.trainer = SimpleNamespace(training=True, global_rank=0)
    torch.manual_seed(0)
    plain = data.on_after_batch_transfer(raw, 0)
    after_plain = torch.rand(4)
    assert len(plain) == 2
    data.with_strong_view = True
    torch.manual_seed(0)
    weak, labels, strong = data.on_after_batch_transfer(raw, 0)
    assert torch.equal(torch.rand(4), after_plain)
    assert torch.equal(weak, plain[0]) and torch.equal(labels, plain[1])
    own = process_generator(data.hparams.seed, 0, torch.device("cpu"), STRONG)
    expected = strong_view(raw[0], own)
    assert torch.equal(strong, normalize(expected)) and strong.dtype == torch.float32
    assert not torch.equal(strong, weak)
    data.trainer = SimpleNamespace(training=False, global_rank=0)
    assert len(data.on_after_batch_transfer(raw, 0)) == 2
