"""Wide ResNets (Zagoruyko & Komodakis, 2016) as the knowledge-distillation zoo builds them
(RepDistiller, mdistiller): ``wrn_{depth}_{width}``, pre-activation blocks, module names as
in the zoo's code so that its published teachers load directly.
"""

from torch import Tensor, nn

from kdlight.models.registry import register_model
from kdlight.models.zoo_init import init_zoo_weights_


class WideBasicBlock(nn.Module):
    """A pre-activation block: BN-ReLU-conv3x3 twice plus the input. Where the channel count
    changes, the pre-activated input goes through a 1x1 ``convShortcut`` (the zoo's name)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.convShortcut: nn.Module | None = None  # camelCase: the zoo's parameter name
        if in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # as in the zoo: a projection reads the pre-activated input, an identity the raw one
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``layer``, a Sequential of blocks (the first one strided)."""

    def __init__(self, blocks: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        units = [WideBasicBlock(in_channels, out_channels, stride)]
        units += [WideBasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        self.layer = nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """``conv1``, three stages ``block1..3`` of (depth - 4) / 6 blocks at 16-32-64 times
    ``widen_factor`` channels, then ``bn1``/``relu``, a global average pool and ``fc``.

    ``feature_taps``: the stages are ``block1..3``, whose outputs are the zoo's ``feat[1:4]``
    (pre-activation networks: the block sums, before any BN-ReLU); the embedding is
    ``avgpool`` (the zoo's ``feat[-1]``, here ``(B, C, 1, 1)``).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WRN's depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(blocks, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(blocks, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(blocks, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        # the zoo pools with F.avg_pool2d(8); a module here so that the embedding can be tapped
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        self.feature_taps = {"stages": ["block1", "block2", "block3"], "embedding": ["avgpool"]}
        init_zoo_weights_(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn1(x))).flatten(1))


@register_model
def wrn_16_1(num_classes: int = 10) -> WideResNet:
    """WRN-16-1: 180,916 params (100 classes), 175,066 (10)."""
    return WideResNet(16, 1, num_classes)


@register_model
def wrn_16_2(num_classes: int = 10) -> WideResNet:
    """WRN-16-2: 703,284 params (100 classes), 691,674 (10)."""
    return WideResNet(16, 2, num_classes)


@register_model
def wrn_40_1(num_classes: int = 10) -> WideResNet:
    """WRN-40-1: 569,780 params (100 classes), 563,930 (10)."""
    return WideResNet(40, 1, num_classes)


@register_model
def wrn_40_2(num_classes: int = 10) -> WideResNet:
    """WRN-40-2, a zoo teacher: 2,255,156 params (100 classes), 2,243,546 (10)."""
    return WideResNet(40, 2, num_classes)
