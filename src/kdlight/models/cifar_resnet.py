"""The CIFAR ResNets of the knowledge-distillation zoo (RepDistiller, mdistiller), laid out
the way their code names them, so that their published teachers load directly.

``resnet14`` ... ``resnet110`` (6n+2 layers, 16-16-32-64 channels) and the 4x-wide
``resnet8x4`` / ``resnet32x4`` (32-64-128-256). Shortcuts are 1x1 projections where the shape
changes. ``resnet8`` and ``resnet20`` are kdlight's own (:mod:`kdlight.models.resnet`, other
module names, same parameters); :func:`kdlight.models.published.load_published` maps the zoo's
names onto them.
"""

from torch import Tensor, nn

from kdlight.models.registry import register_variants
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
        # parameter-free: the sum before the last ReLU, for a pre-activation tap (OFD)
        self.preact = nn.Identity()
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
        return self.preact(out + shortcut).relu()


class CifarResNet(nn.Module):
    """The zoo's CIFAR ResNet: ``conv1``/``bn1``/``relu`` stem, ``layer1..3`` of
    ``blocks_per_stage`` blocks each (strides 1, 2, 2), global average pool, ``fc``.

    ``feature_taps``: the stages are ``layer1..3`` (the zoo's ``feat[1:4]``, after the
    ReLU), ``preact_stages`` the same sums before it (each stage's last block's ``preact``,
    the zoo's ``preact`` feats), the embedding is ``avgpool`` (its ``feat[-1]``, as
    ``(B, C, 1, 1)``). ``bn_before_relu``: for each pre-activation tap, the BN whose output
    enters that sum (the zoo's ``get_bn_before_relu``: the last block's ``bn2``).
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
        stages = ["layer1", "layer2", "layer3"]
        last = [f"{stage}.{blocks_per_stage - 1}" for stage in stages]
        self.feature_taps = {
            "stages": stages,
            "preact_stages": [f"{block}.preact" for block in last],
            "embedding": ["avgpool"],
        }
        self.bn_before_relu = {f"{block}.preact": f"{block}.bn2" for block in last}
        init_zoo_weights_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


#: Blocks per stage ((depth - 2) / 6) and the channels of the stem and the stages of each;
#: README.md lists their parameter counts.
ZOO_RESNETS = {
    "resnet14": (2, (16, 16, 32, 64)),
    "resnet32": (5, (16, 16, 32, 64)),
    "resnet44": (7, (16, 16, 32, 64)),
    "resnet56": (9, (16, 16, 32, 64)),
    "resnet110": (18, (16, 16, 32, 64)),
    "resnet8x4": (1, (32, 64, 128, 256)),
    "resnet32x4": (5, (32, 64, 128, 256)),
}
register_variants(CifarResNet, ZOO_RESNETS)
