"""Batched crop/flip augmentation and normalisation: shapes, exact semantics and distributions."""

from types import SimpleNamespace

import pytest
import torch

from kdlight.data import CIFAR10DataModule, normalize, random_crop_flip
from kdlight.data.augment import CIFAR10_MEAN, CIFAR10_STD, crop_flip, process_generator

#: 0.999 quantile of the chi-square distribution with 8 degrees of freedom.
CHI2_8_DOF_999 = 26.12


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(n: int, dtype: torch.dtype, h: int = 32, w: int = 32) -> torch.Tensor:
    """A random ``(n, 3, h, w)`` batch: uint8 in [0, 255] or floats in [0, 1)."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=seeded(1))
    return torch.rand(n, 3, h, w, generator=seeded(1)).to(dtype)


def coordinate_images(n: int, h: int, w: int) -> torch.Tensor:
    """Float images whose channels hold row+1, column+1 and image index+1, so 0 marks padding."""
    images = torch.empty(n, 3, h, w)
    images[:, 0] = torch.arange(1, h + 1, dtype=torch.float32).view(h, 1)
    images[:, 1] = torch.arange(1, w + 1, dtype=torch.float32).view(1, w)
    images[:, 2] = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1)
    return images


def chi_square_uniform(counts: torch.Tensor) -> float:
    """Pearson's statistic of ``counts`` against a uniform distribution over its cells."""
    expected = counts.sum().item() / counts.numel()
    return float(((counts.double() - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("flip", [True, False])
def test_shape_and_dtype_are_kept(dtype: torch.dtype, flip: bool):
    images = random_batch(8, dtype, h=32, w=24)
    before = images.clone()
    out = random_crop_flip(images, flip=flip, generator=seeded())
    assert out.shape == images.shape
    assert out.dtype == dtype
    assert torch.equal(images, before)  # the input is not modified


def test_same_generator_seed_gives_the_same_batch():
    images = random_batch(16, torch.uint8)
    first = random_crop_flip(images, generator=seeded(3))
    assert torch.equal(first, random_crop_flip(images, generator=seeded(3)))
    assert not torch.equal(first, random_crop_flip(images, generator=seeded(4)))


def test_no_padding_and_no_flip_is_the_identity():
    images = random_batch(16, torch.uint8)
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_a_flip_is_a_flip_about_half_the_time():
    n = 4000
    images = random_batch(n, torch.uint8, h=16, w=16)
    out = random_crop_flip(images, padding=0, generator=seeded())
    same = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert not (same & flipped).any()  # random images are never mirror-symmetric
    assert (same | flipped).all()
    assert 0.45 < flipped.float().mean().item() < 0.55


@pytest.mark.parametrize(("h", "w"), [(10, 14), (32, 32)])
def test_crops_stay_within_the_zero_padded_image(h: int, w: int):
    n, padding = 9000, 4
    images = coordinate_images(n, h, w)
    out = random_crop_flip(images, padding=padding, flip=False, generator=seeded())

    # Pixel (padding, padding) of a crop at offset (dy, dx) is original pixel (dy, dx).
    dy = out[:, 0, padding, padding].long() - 1
    dx = out[:, 1, padding, padding].long() - 1
    assert dy.min() >= 0 and dy.max() <= 2 * padding
    assert dx.min() >= 0 and dx.max() <= 2 * padding

    padded = torch.zeros(n, 3, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding : padding + h, padding : padding + w] = images
    for oy in range(2 * padding + 1):
        for ox in range(2 * padding + 1):
            chosen = (dy == oy) & (dx == ox)
            assert chosen.any(), f"offset ({oy}, {ox}) never drawn"
            expected = padded[chosen, :, oy : oy + h, ox : ox + w]
            assert torch.equal(out[chosen], expected), f"wrong crop at offset ({oy}, {ox})"

    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=2 * padding + 1)
        assert chi_square_uniform(counts) < CHI2_8_DOF_999, counts.tolist()


def test_flip_mirrors_the_crop():
    """With flipping on, each output is a zero-padded crop, possibly mirrored left-right."""
    n, h, w, padding = 2000, 12, 12, 2
    images = coordinate_images(n, h, w)
    out = random_crop_flip(images, padding=padding, generator=seeded())
    padded = torch.zeros(n, 3, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding : padding + h, padding : padding + w] = images
    crops = torch.stack(
        [padded[:, :, oy : oy + h, ox : ox + w] for oy in range(5) for ox in range(5)], dim=1
    )  # (n, 25, 3, h, w): every possible crop
    matches = (crops == out[:, None]).flatten(2).all(2).any(1)
    mirrored = (crops.flip(-1) == out[:, None]).flatten(2).all(2).any(1)
    assert (matches | mirrored).all()
    assert 0.4 < mirrored.float().mean().item() < 0.6


def test_normalize_centres_and_scales_each_channel():
    mean_pixels = torch.tensor([round(m * 255) for m in CIFAR10_MEAN], dtype=torch.uint8)
    images = mean_pixels.view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    out = normalize(images)
    assert out.dtype == torch.float32
    assert out.shape == images.shape
    assert out.abs().max().item() < 0.01

    extremes = torch.zeros(1, 3, 1, 2, dtype=torch.uint8)
    extremes[..., 1] = 255
    out = normalize(extremes)
    for c, (m, s) in enumerate(zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)):
        assert out[0, c, 0, 0].item() == pytest.approx(-m / s, rel=1e-5)
        assert out[0, c, 0, 1].item() == pytest.approx((1 - m) / s, rel=1e-5)


# ------------------------------------------------------------------- one stream per process


def test_each_process_draws_from_a_stream_of_its_own():
    cpu = torch.device("cpu")
    assert process_generator(0, 0, cpu) is None  # process 0: the global RNG, as before
    images = random_batch(64, torch.uint8)

    def draw(seed: int, rank: int) -> torch.Tensor:
        return random_crop_flip(images, generator=process_generator(seed, rank, cpu))

    assert torch.equal(draw(0, 1), draw(0, 1))
    others = [draw(0, 2), draw(1, 1), draw(1, 2)]
    assert all(not torch.equal(draw(0, 1), other) for other in others)


def test_ddp_processes_augment_the_same_batch_differently():
    """Every DDP process seeds the global RNG alike (``seed_everything``): drawn from it, the
    images at one batch position on every GPU would share their crop and flip. Process 0
    keeps drawing from it, so a single-process run augments exactly as before."""
    datamodule = CIFAR10DataModule(
        source="synthetic", synthetic_train_size=300, synthetic_test_size=100, val_size=0
    )
    datamodule.setup()
    images, labels = datamodule.train_set.images[:64], datamodule.train_set.labels[:64]

    def augmented(rank: int) -> torch.Tensor:
        datamodule.trainer = SimpleNamespace(training=True, global_rank=rank)
        torch.manual_seed(0)  # as seed_everything does on every process
        return datamodule.on_after_batch_transfer((images, labels), 0)[0]

    torch.manual_seed(0)
    single_process = normalize(random_crop_flip(images))  # what a single process draws
    assert torch.equal(augmented(0), single_process)
    rank1, rank2 = augmented(1), augmented(2)
    for a, b in ((augmented(0), rank1), (augmented(0), rank2), (rank1, rank2)):
        differs = (a != b).flatten(1).any(1)
        assert differs.float().mean() > 0.9, "images at one batch position share a crop"
    assert not torch.equal(augmented(1), rank1)  # the stream goes on from batch to batch


def test_the_augmentation_says_what_it_drew_and_draws_the_same():
    """``return_params`` gives each image's (dy, dx, flipped), from the same draws: the
    batch and the random stream after it are those of a call without it, and
    ``crop_flip`` with the parameters gives the batch again."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    plain, after_plain = random_crop_flip(images), torch.rand(3)
    torch.manual_seed(1)
    batch, params = random_crop_flip(images, return_params=True)
    assert torch.equal(batch, plain) and torch.equal(torch.rand(3), after_plain)
    assert params.shape == (64, 3) and params.dtype == torch.int64
    assert (
        params[:, :2].min() >= 0
        and params[:, :2].max() <= 8
        and set(params[:, 2].tolist()) <= {0, 1}
    )
    assert torch.equal(crop_flip(images, params), batch)
    for image, (dy, dx, flipped), augmented in zip(images, params.tolist(), batch, strict=True):
        padded = torch.nn.functional.pad(image, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
        assert torch.equal(padded.flip(2) if flipped else padded, augmented)


def test_training_batches_carry_their_augmentation_on_request():
    """``with_augmentation``: each training batch is (images, labels, indices, params), and
    the images are exactly the training set's at those indices, cropped and flipped by
    those parameters, then normalised."""
    import lightning as L

    from tests.conftest import synthetic_datamodule

    data = synthetic_datamodule(train=200, test=50, val=50, batch=50)
    data.setup("fit")
    data.with_augmentation = True
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    data.trainer = trainer
    trainer.training = True
    raw = next(iter(data.train_dataloader()))
    images, labels, indices, params = data.on_after_batch_transfer(raw, 0)
    source = data.train_set.images[indices]
    assert torch.equal(labels, data.train_set.labels[indices])
    assert torch.equal(images, data.normalize(crop_flip(source, params)))
    data.with_augmentation = False
    assert len(data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)) == 2
