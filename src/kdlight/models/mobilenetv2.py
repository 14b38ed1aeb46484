"""MobileNetV2 (Sandler et al., 2018) for 32x32 inputs as the knowledge-distillation zoo
builds it (RepDistiller's ``mobile_half``, mdistiller's ``MobileNetV2``): a stride-2 stem,
half width, expansion 6; module names as in the zoo's code so that its files load directly.
"""

from torch import Tensor, nn

from kdlight.models.registry import register_model
from kdlight.models.zoo_init import init_zoo_weights_

#: (expansion, output channels at width 1, blocks, first stride) per stage; expansion None
#: means the network's ``expansion`` argument.
_STAGES = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """``conv``: pointwise expansion, 3x3 depthwise, linear pointwise projection (each with
    BN); the input is added back when the shape is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            *_conv_bn_relu(in_channels, hidden, 1, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """``conv1`` (3x3 stride 2), seven stages in ``blocks``, ``conv2`` (1x1 to 1280 channels
    at width <= 1), a global average pool and ``classifier`` (a Sequential of one Linear).

    ``feature_taps``: the stages are ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6``
    (the zoo's ``feat[1:5]``: linear bottleneck outputs, 16, 8, 4 and 2 pixels wide on 32x32
    inputs), the embedding is ``avgpool`` (its ``feat[-1]``, here ``(B, 1280, 1, 1)``).
    """

    def __init__(self, num_classes: int = 10, width: float = 0.5, expansion: int = 6) -> None:
        super().__init__()
        in_channels = int(32 * width)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, 2)
        self.blocks = nn.ModuleList()
        for stage_expansion, channels, blocks, stride in _STAGES:
            out_channels, expand = int(channels * width), stage_expansion or expansion
            layers = [InvertedResidual(in_channels, out_channels, stride, expand)]
            layers += [
                InvertedResidual(out_channels, out_channels, 1, expand) for _ in range(blocks - 1)
            ]
            self.blocks.append(nn.Sequential(*layers))
            in_channels = out_channels
        last_channels = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1, 1)
        # the zoo's AvgPool2d(2, ceil_mode=True) on the 2x2 map of a 32x32 input is this
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        self.feature_taps = {
            "stages": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"],
            "embedding": ["avgpool"],
        }
        init_zoo_weights_(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))


@register_model
def mobilenetv2(num_classes: int = 10) -> MobileNetV2:
    """The CIFAR KD papers' MobileNetV2 (README.md lists its parameter counts)."""
    return MobileNetV2(num_classes)
