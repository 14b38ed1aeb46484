"""Batched augmentation that runs on whatever device the batch is on (CPU or GPU).

The reference recipe's per-image torchvision transforms (pad 4, random 32x32 crop, random
horizontal flip, per-channel normalisation) are applied here to a whole uint8 batch at once
with one gather, so no per-sample Python work is done in the training loop.

Under DDP each process draws its crops and flips from a stream of its own
(:func:`process_generator`): seeded alike, the processes would otherwise give the images at
one batch position on every GPU the same crop and flip.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Per-channel mean and std of the training images, in [0, 1]. CIFAR-100's are the values
#: the CIFAR-100 distillation studies normalise with (RepDistiller's ``dataset/cifar100.py``).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


#: The augmentation parameters ``(dy, dx, flipped)`` of an image left as it is (padding 4).
IDENTITY = torch.tensor([[4, 4, 0]])


def random_crop_flip(
    images: Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Zero-pad each image by ``padding``, crop it back at a uniform random offset, and flip
    it horizontally with probability 1/2; the same distribution as torchvision's
    ``RandomCrop(size, padding)`` followed by ``RandomHorizontalFlip()``.

    Args:
        images: ``(N, C, H, W)`` batch of any dtype.
        return_params: also return what was drawn (the same draws either way).
    Returns:
        A new batch of the same shape and dtype; with ``return_params``, also the ``(N, 3)``
        int64 ``(dy, dx, flipped)`` of each image, which :func:`crop_flip` applies again:
        the crop's offset in the padded image (0 to ``2 * padding``; ``padding`` is no
        shift) and 1 where the image was flipped. There are ``(2 * padding + 1)^2 * 2``
        variants of an image, 162 for the reference recipe.
    """
    n = images.shape[0]
    device = images.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    flipped = torch.zeros(n, 1, dtype=torch.bool, device=device)
    if flip:
        flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5
    params = torch.cat([dy, dx, flipped.long()], dim=1)
    augmented = crop_flip(images, params, padding)
    return (augmented, params) if return_params else augmented


def crop_flip(images: Tensor, params: Tensor, padding: int = 4) -> Tensor:
    """Each image padded by ``padding``, cropped at its ``(dy, dx)`` and flipped where its
    ``flipped`` is 1: ``params`` as :func:`random_crop_flip` returns them, ``(N, 3)``."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy, dx, flipped = params.to(device).unbind(1)
    rows = dy.view(n, 1) + torch.arange(h, device=device)
    cols = dx.view(n, 1) + torch.arange(w, device=device)
    cols = torch.where(flipped.view(n, 1).bool(), cols.flip(1), cols)
    batch_index = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel_index = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch_index, channel_index, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


#: The augmentation's random streams: the crop and flip of every training batch, and the
#: strong view that a method may ask for (:mod:`kdlight.data.strong`).
CROP, STRONG = "crop", "strong"


def process_generator(
    seed: int, rank: int, device: torch.device, stream: str = CROP
) -> torch.Generator | None:
    """The augmentation ``stream`` of DDP process ``rank`` (its global rank) on ``device``.

    The crop and flip of process 0 is None, that is the global RNG that
    ``seed_everything(seed)`` seeds, so a single-process run draws exactly what it always
    drew. Every other stream gets a generator of its own, seeded from ``(seed, rank)`` (and
    the stream, but for the crop and flip) through numpy's ``SeedSequence``, which gives
    unrelated streams for neighbouring seeds and ranks.
    """
    if stream == CROP and rank == 0:
        return None
    entropy = [seed, rank] if stream == CROP else [seed, rank, 1 + [STRONG].index(stream)]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def normalize(
    images: Tensor,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> Tensor:
    """uint8 ``(N, C, H, W)`` in [0, 255] -> float32 standardised per channel."""
    mean_t, std_t = _channel_stats(tuple(mean), tuple(std), images.device)
    return (images.float() / 255.0 - mean_t) / std_t


@functools.cache
def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as ``(1, C, 1, 1)`` tensors on ``device``, made once: creating
    them per batch would copy them to the GPU, and wait for it, at every step."""
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return mean_t, std_t
