"""The CIFAR ResNets of the knowledge-distillation zoo (RepDistiller, mdistiller), laid out
the way their code names them, so that their published teachers load directly.

``resnet14`` ... ``resnet110`` (6n+2 layers, 16-16-32-64 channels) and the 4x-wide
``resnet8x4`` / ``resnet32x4`` (32-64-128-256). Shortcuts are 1x1 projections where the shape
changes. ``resnet8`` and ``resnet20`` are kdlight's own (:mod:`kdlight.models.resnet`, other
module names, same parameters); :func:`kdlight.models.published.load_published` maps the zoo's
names onto them.
"""

from torch import Tensor, nn

from kdlight.models.registry import register_model
from kdlight.models.zoo_init import init_zoo_weights_


class ZooBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual, then a ReLU; ``downsample`` (a 1x1 conv and BN)
    projects the input where the shape changes, as the zoo's ``BasicBlock`` does."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return (out + shortcut).relu()


class CifarResNet(nn.Module):
    """The zoo's CIFAR ResNet: ``conv1``/``bn1``/``relu`` stem, ``layer1..3`` of
    ``blocks_per_stage`` blocks each (strides 1, 2, 2), global average pool, ``fc``.

    ``feature_taps``: the stages are ``layer1..3`` (the zoo's ``feat[1:4]``, after the
    ReLU), the embedding is ``avgpool`` (its ``feat[-1]``, as ``(B, C, 1, 1)``).
    """

    def __init__(
        self, blocks_per_stage: int, channels: tuple[int, int, int, int], num_classes: int = 10
    ) -> None:
        super().__init__()
        stem_channels, *stage_channels = channels
        self.conv1 = nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        in_channels = stem_channels
        for index, (out_channels, stride) in enumerate(
            zip(stage_channels, (1, 2, 2), strict=True), start=1
        ):
            blocks = [ZooBasicBlock(in_channels, out_channels, stride)]
            blocks += [
                ZooBasicBlock(out_channels, out_channels) for _ in range(blocks_per_stage - 1)
            ]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = out_channels
        # the zoo pools with AvgPool2d(8): the same on 32x32 inputs, and any size works here
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.feature_taps = {"stages": ["layer1", "layer2", "layer3"], "embedding": ["avgpool"]}
        init_zoo_weights_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _depth_blocks(depth: int) -> int:
    return (depth - 2) // 6


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model
def resnet14(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-14: two blocks per stage; 181,108 params (100 classes), 175,258 (10)."""
    return CifarResNet(_depth_blocks(14), _NARROW, num_classes)


@register_model
def resnet32(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-32: five blocks per stage; 472,756 params (100 classes), 466,906 (10)."""
    return CifarResNet(_depth_blocks(32), _NARROW, num_classes)


@register_model
def resnet44(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-44: seven blocks per stage; 667,188 params (100 classes), 661,338 (10)."""
    return CifarResNet(_depth_blocks(44), _NARROW, num_classes)


@register_model
def resnet56(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-56, a zoo teacher: nine blocks per stage; 861,620 params (100 classes),
    855,770 (10)."""
    return CifarResNet(_depth_blocks(56), _NARROW, num_classes)


@register_model
def resnet110(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-110, a zoo teacher: 18 blocks per stage; 1,736,564 params (100 classes),
    1,730,714 (10)."""
    return CifarResNet(_depth_blocks(110), _NARROW, num_classes)


@register_model
def resnet8x4(num_classes: int = 10) -> CifarResNet:
    """ResNet-8 at 4x width (32-stem, 64-128-256 stages): 1,233,540 params (100 classes),
    1,210,410 (10)."""
    return CifarResNet(_depth_blocks(8), _WIDE, num_classes)


@register_model
def resnet32x4(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 at 4x width (32-stem, 64-128-256 stages), a zoo teacher: 7,433,860 params
    (100 classes), 7,410,730 (10)."""
    return CifarResNet(_depth_blocks(32), _WIDE, num_classes)
