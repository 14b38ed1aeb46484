"""ResNets for 32x32 inputs.

* ``resnet18`` (He et al., 2016) with the CIFAR stem used by most CIFAR-10 work: a 3x3
  stride-1 convolution and no max-pool, with a ``width`` multiplier on every convolution;
  ``resnet18_half`` (width 0.5) is the reference study's teacher.
* ``resnet8`` and ``resnet20``: the original CIFAR ResNets (6n+2 layers, 16/32/64 channels).
  Their shortcuts are 1x1 projections (conv + BN) where the shape changes, as in the KD
  zoo's code (RepDistiller, mdistiller), not the paper's parameter-free option A; the zoo's
  checkpoints load through :func:`kdlight.models.published.load_published`, which maps its
  module names.
"""

from torch import Tensor, nn

from kdlight.models.registry import register_model, register_variants
from kdlight.models.width import scaled_channels
from kdlight.models.zoo_init import init_zoo_weights_


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when shapes change)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # parameter-free: the sum before the last ReLU, for a pre-activation tap (OFD)
        self.preact = nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # not in place: a tap on ``preact`` keeps the sum itself
        return self.preact(out + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """A CIFAR ResNet: 3x3 stem, stages of BasicBlocks, global average pool, linear head.

    ``feature_taps`` names the outputs the feature methods read by default: each stage's
    (its last block's output, after the ReLU), the same before that ReLU
    (``preact_stages``: the block's ``preact``, the zoo's ``preact`` feats) and the pooled
    feature (``pool``). ``bn_before_relu`` names, for each pre-activation tap, the BN whose
    output enters the sum there (the zoo's ``get_bn_before_relu``: the last block's ``bn2``).
    """

    def __init__(
        self,
        blocks_per_stage: list[int],
        stage_channels: list[int],
        stem_channels: int,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        )
        stages, stage_ends, norms, in_channels = [], [], [], stem_channels
        for index, (blocks, channels) in enumerate(
            zip(blocks_per_stage, stage_channels, strict=True)
        ):
            stride = 1 if index == 0 else 2
            for block in range(blocks):
                stages.append(BasicBlock(in_channels, channels, stride if block == 0 else 1))
                in_channels = channels
            stage_ends.append(f"stages.{len(stages) - 1}")
            norms.append(f"stages.{len(stages) - 1}.bn2")
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.feature_taps = {
            "stages": stage_ends,
            "preact_stages": [f"{name}.preact" for name in stage_ends],
            "embedding": ["pool"],
        }
        self.bn_before_relu = dict(zip(self.feature_taps["preact_stages"], norms, strict=True))
        init_zoo_weights_(self)  # Kaiming (fan-out) convolutions, as the zoo's

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


@register_model
def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """ResNet18 with a CIFAR stem; ``width`` scales every convolution (64-128-256-512 at 1.0)."""
    channels = scaled_channels((64, 128, 256, 512), width, "resnet18")
    return ResNet([2, 2, 2, 2], channels, channels[0], num_classes)


@register_model
def resnet18_half(num_classes: int = 10) -> ResNet:
    """The reference study's teacher: ResNet18 with every channel count halved (~2.8M params)."""
    return resnet18(num_classes, width=0.5)


def _cifar_resnet(depth: int, num_classes: int = 10, width: float = 1.0) -> ResNet:
    channels = scaled_channels((16, 32, 64), width, f"resnet{depth}")
    return ResNet([(depth - 2) // 6] * 3, channels, channels[0], num_classes)


#: README.md lists their parameter counts (the zoo's).
register_variants(_cifar_resnet, {"resnet8": (8,), "resnet20": (20,)})
