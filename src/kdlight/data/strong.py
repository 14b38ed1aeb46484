"""The strong view of a training image that MLKD's official CIFAR code trains on besides
the usual one: its own pad-4 crop and flip, then RandAugment with two operations and a
Cutout (:func:`strong_view`), on uint8 batches on whatever device they are on.

The official code (Jin et al., MLKD, ``mdistiller/dataset/cifar100.py``) applies Pillow
operations to each image: ``RandAugment(2, 10)`` (lines 292-305) picks two of the fourteen
operations of ``augment_list`` (lines 272-289) with replacement, each with a strength drawn
uniformly from its range, then pastes a gray square (``Cutout``, lines 242-268) of side up
to half the image at a uniform position. Here each operation is torchvision's on a uint8
tensor (``torchvision.transforms.v2.functional``), and the geometric ones (rotate, shear,
translate) are Pillow's nearest-neighbour affine map, gathered in torch, and the colour blends
are Pillow's arithmetic, so that an image comes out as Pillow makes it, to the grey level
(tested operation by operation against Pillow in ``tests/test_strong_view.py``). The random numbers come from a torch generator (the
augmentation's stream, see :mod:`kdlight.data.augment`) instead of Python's ``random``
and numpy's: the same distributions, drawn in a resumable stream.
"""

import math

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from kdlight.data.augment import random_crop_flip

#: The official ``augment_list``'s operations and the range each strength is drawn from
#: (``mdistiller/dataset/cifar100.py:272-289``), in its order.
OPERATIONS = (
    ("autocontrast", 0.0, 1.0),
    ("brightness", 0.05, 0.95),
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("equalize", 0.0, 1.0),
    ("identity", 0.0, 1.0),
    ("posterize", 4.0, 8.0),
    ("rotate", -30.0, 30.0),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("solarize", 0.0, 256.0),
    ("translate_x", -0.3, 0.3),
    ("translate_y", -0.3, 0.3),
)
#: operations per image (``RandAugment(2, 10)``; the magnitude 10 is unused there)
NUM_OPERATIONS = 2
#: Cutout's largest side as a fraction of the image's, and its colour
#: (``cifar100.py:303`` and ``:265``)
CUTOUT_MAX = 0.5
CUTOUT_COLOR = (125, 123, 114)


def strong_view(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The official strong view of each uint8 ``(N, 3, H, W)`` image: a pad-4 crop and flip
    of its own (:func:`~kdlight.data.augment.random_crop_flip`), then :func:`rand_augment`."""
    return rand_augment(random_crop_flip(images, generator=generator), generator)


def rand_augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``RandAugment(2, 10)`` of the official code on each uint8 image of the batch: two
    operations of :data:`OPERATIONS` chosen with replacement, each at a uniform strength in
    its range, then a Cutout of side ``u * 0.5 * W`` (``u`` uniform; none at 0) at a
    random point (see :func:`cutout`)."""
    n = len(images)
    draws = torch.rand(n, 2 * NUM_OPERATIONS + 3, generator=generator, device=images.device)
    out = []
    for image, row in zip(images, draws.double().tolist(), strict=True):
        for k in range(NUM_OPERATIONS):
            name, low, high = OPERATIONS[min(int(row[2 * k] * len(OPERATIONS)), 13)]
            image = apply(image, name, low + (high - low) * row[2 * k + 1])
        cutout_side, x, y = row[-3:]
        out.append(cutout(image, cutout_side * CUTOUT_MAX, x, y))
    return torch.stack(out) if out else images.clone()


def apply(image: Tensor, name: str, value: float) -> Tensor:
    """One operation of :data:`OPERATIONS` at strength ``value`` on a uint8 ``(3, H, W)``
    image, as the official Pillow function of that name does it."""
    height, width = image.shape[-2:]
    if name == "autocontrast":
        return autocontrast(image)
    if name == "brightness":
        return TF.adjust_brightness(image, value)
    if name == "color":  # towards the image's grey levels
        return blend(grey(image).expand_as(image), image, value)
    if name == "contrast":  # towards the grey level of its mean, rounded as Pillow does
        mean = torch.floor(grey(image).double().mean() + 0.5)
        return blend(mean.to(torch.uint8).expand_as(image), image, value)
    if name == "equalize":
        return TF.equalize(image)
    if name == "posterize":
        return TF.posterize(image, max(1, int(value)))
    if name == "sharpness":
        return TF.adjust_sharpness(image, value)
    if name == "solarize":  # Pillow inverts the levels >= value: none above 255
        return TF.solarize(image, value) if value <= 255 else image
    if name == "rotate":  # Image.rotate(value): counter-clockwise about the centre
        angle = -math.radians(value)
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cx, cy = width / 2.0, height / 2.0
        matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
        return pil_affine(image, matrix)
    if name == "shear_x":
        return pil_affine(image, (1, value, 0, 0, 1, 0))
    if name == "shear_y":
        return pil_affine(image, (1, 0, 0, value, 1, 0))
    if name == "translate_x":
        return pil_affine(image, (1, 0, value * width, 0, 1, 0))
    if name == "translate_y":
        return pil_affine(image, (1, 0, 0, 0, 1, value * height))
    return image  # identity


def grey(image: Tensor) -> Tensor:
    """Pillow's ``convert("L")`` of a uint8 ``(3, H, W)`` image, ``(1, H, W)``: ITU-R 601-2
    luma in Pillow's fixed point, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``."""
    r, g, b = image.long()
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def blend(degenerate: Tensor, image: Tensor, factor: float) -> Tensor:
    """Pillow's ``Image.blend(degenerate, image, factor)`` (what ``ImageEnhance`` does), for
    a factor in [0, 1]: ``degenerate + factor (image - degenerate)`` in single precision,
    truncated to uint8."""
    start = degenerate.float()
    blended = start + torch.tensor(factor, dtype=torch.float32) * (image.float() - start)
    return blended.clamp(0, 255).to(torch.uint8)


def autocontrast(image: Tensor) -> Tensor:
    """Pillow's ``ImageOps.autocontrast``: each channel's levels stretched from its lowest
    and highest to 0 and 255 (a channel of one level is left as it is), truncated."""
    low = image.amin(dim=(1, 2), keepdim=True).double()
    high = image.amax(dim=(1, 2), keepdim=True).double()
    flat = high <= low
    scale = torch.where(flat, 1.0, 255.0 / torch.where(flat, 1.0, high - low))
    stretched = torch.trunc(image.double() * scale - low * scale).clamp(0, 255)
    return torch.where(flat, image, stretched.to(torch.uint8))


def pil_affine(image: Tensor, matrix: tuple[float, ...]) -> Tensor:
    """Pillow's ``Image.transform(size, AFFINE, matrix)`` with nearest-neighbour sampling
    and black outside: output pixel ``(x, y)`` takes the input pixel at
    ``floor(a (x + 0.5) + b (y + 0.5) + c), floor(d (x + 0.5) + e (y + 0.5) + f)``, reached
    as Pillow reaches it (``libImaging/Geometry.c``): a translation in double precision, any
    other map in 16.16 fixed point, each coefficient rounded to 1/65536 and summed step by
    step along rows and columns (so a point near a pixel's edge falls where Pillow puts it)."""
    a, b, c, d, e, f = matrix
    height, width = image.shape[-2:]
    if b == 0 and d == 0:
        columns = torch.arange(width, dtype=torch.float64) + 0.5
        rows = torch.arange(height, dtype=torch.float64) + 0.5
        x_in = torch.floor(a * columns + c).long().view(1, -1).expand(height, width)
        y_in = torch.floor(e * rows + f).long().view(-1, 1).expand(height, width)
    else:
        fixed = [math.floor(v * 65536.0 + 0.5) for v in (a, b, d, e)]
        x_start = math.floor((c + a * 0.5 + b * 0.5) * 65536.0 + 0.5)
        y_start = math.floor((f + d * 0.5 + e * 0.5) * 65536.0 + 0.5)
        columns = torch.arange(width).view(1, -1)
        rows = torch.arange(height).view(-1, 1)
        x_in = (x_start + rows * fixed[1] + columns * fixed[0]) >> 16
        y_in = (y_start + rows * fixed[3] + columns * fixed[2]) >> 16
    x_in, y_in = x_in.to(image.device), y_in.to(image.device)
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    gathered = image[:, y_in.clamp(0, height - 1), x_in.clamp(0, width - 1)]
    return torch.where(inside, gathered, torch.zeros_like(gathered))


def cutout(image: Tensor, fraction: float, x: float, y: float) -> Tensor:
    """The official ``Cutout(img, fraction)``: a square of side ``fraction * W`` in
    :data:`CUTOUT_COLOR`, its corner at a point less half the side (clipped to the image);
    Pillow fills the rectangle's last row and column inclusive, at the whole pixel below
    each float edge. ``fraction <= 0``: the image as it is.

    The point, from the uniform draws ``x`` and ``y`` in [0, 1): the official
    ``np.random.uniform(w)`` (``cifar100.py:256-257``) passes ``w`` as the *lower* bound, with
    the upper bound left at 1, so it draws ``w + (1 - w) u``, in (1, w], not in [0, w): the
    square never starts at the first row or column (unless it is clipped there), and
    leans to the lower right. Kept as the official code draws it."""
    if fraction <= 0:
        return image
    height, width = image.shape[-2:]
    side = fraction * width
    x0 = int(max(0.0, width + (1 - width) * x - side / 2.0))
    y0 = int(max(0.0, height + (1 - height) * y - side / 2.0))
    x1 = int(min(width, x0 + side))  # inclusive, as Pillow draws it
    y1 = int(min(height, y0 + side))
    image = image.clone()
    color = torch.tensor(CUTOUT_COLOR, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    image[:, y0 : y1 + 1, x0 : x1 + 1] = color
    return image
