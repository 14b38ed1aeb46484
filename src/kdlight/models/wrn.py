"""Wide ResNets (Zagoruyko & Komodakis, 2016) as the knowledge-distillation zoo builds them
(RepDistiller, mdistiller): ``wrn_{depth}_{width}``, pre-activation blocks, module names as
in the zoo's code so that its published teachers load directly.
"""

from collections import OrderedDict

from torch import Tensor, nn

from kdlight.models.registry import register_variants
from kdlight.models.zoo_init import init_zoo_weights_


class WideBasicBlock(nn.Module):
    """A pre-activation block: BN-ReLU-conv3x3 twice plus the input. Where the channel count
    changes, the pre-activated input goes through a 1x1 ``convShortcut`` (the zoo's name)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        # not in place: bn1's output is a pre-activation tap (the first block of a stage)
        self.relu1 = nn.ReLU()
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


def _network_block(blocks: int, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """One stage as the zoo's ``NetworkBlock`` holds it: its blocks (the first one strided)
    under ``layer``."""
    units = [WideBasicBlock(in_channels, out_channels, stride)]
    units += [WideBasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(OrderedDict(layer=nn.Sequential(*units)))


class WideResNet(nn.Module):
    """``conv1``, three stages ``block1..3`` of (depth - 4) / 6 blocks at 16-32-64 times
    ``widen_factor`` channels, then ``bn1``/``relu``, a global average pool and ``fc``.

    ``feature_taps``: the stages are ``block1..3``, whose outputs are the zoo's ``feat[1:4]``
    (pre-activation networks: the block sums, before any BN-ReLU); ``preact_stages`` are
    the BNs that next read each stage's output, before their ReLU (``block2.layer.0.bn1``,
    ``block3.layer.0.bn1``, ``bn1``: the zoo's ``preact`` feats, which run these BNs on the
    stage outputs), each its own ``bn_before_relu``; the embedding is ``avgpool`` (the
    zoo's ``feat[-1]``, here ``(B, C, 1, 1)``).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WRN's depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = _network_block(blocks, channels[0], channels[1], 1)
        self.block2 = _network_block(blocks, channels[1], channels[2], 2)
        self.block3 = _network_block(blocks, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()  # not in place: bn1's output is a pre-activation tap
        # the zoo pools with F.avg_pool2d(8); a module here so that the embedding can be tapped
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        preact = ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
        self.feature_taps = {
            "stages": ["block1", "block2", "block3"],
            "preact_stages": preact,
            "embedding": ["avgpool"],
        }
        self.bn_before_relu = {name: name for name in preact}
        init_zoo_weights_(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn1(x))).flatten(1))


#: ``wrn_{depth}_{widen_factor}``: (depth, widen_factor); README.md lists their parameter counts.
WIDE_RESNETS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
register_variants(WideResNet, WIDE_RESNETS)
