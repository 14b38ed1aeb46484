"""ShuffleNet V1 (Zhang et al., 2018) and V2 (Ma et al., 2018) for 32x32 inputs as the
knowledge-distillation zoo builds them (RepDistiller's ``ShuffleV1`` / ``ShuffleV2``,
mdistiller): a 1x1 stem, no max-pool; module names as in the zoo's code so that its files
load directly.
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdlight.models.registry import register_model


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups: ``[N, g*c, H, W] -> [N, c*g, H, W]``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 conv, channel shuffle, 3x3 depthwise conv, grouped 1x1 conv (each with BN),
    then the input added (stride 1) or a 3x3 average-pooled input concatenated (stride 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_channels = out_channels // 4
        # the stem's 24 channels are not split into groups (as in the paper and the zoo)
        first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(
            mid_channels, mid_channels, 3, stride, 1, groups=mid_channels, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        # parameter-free: the unit's output before its ReLU, for a pre-activation tap (OFD)
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        return F.relu(
            self.preact(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)
        )


class ShuffleNetV1(nn.Module):
    """``conv1``/``bn1`` (1x1, 24 channels), ``layer1..3`` (each halving the resolution in
    its first unit), a global average pool and ``linear``.

    ``feature_taps``: the stages are ``layer1..3`` (the zoo's ``feat[1:4]``),
    ``preact_stages`` their last units' outputs before the ReLU (``preact``, the zoo's
    ``preact`` feats), the embedding is ``avgpool`` (its ``feat[-1]``, here
    ``(B, C, 1, 1)``). No ``bn_before_relu``: the zoo's ``get_bn_before_relu`` refuses
    ShuffleNets as an OFD teacher (the ReLU reads a sum, not one BN's output).
    """

    def __init__(
        self,
        stage_channels: tuple[int, int, int] = (240, 480, 960),
        stage_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for index, (channels, blocks) in enumerate(
            zip(stage_channels, stage_blocks, strict=True), start=1
        ):
            # the first unit concatenates its pooled input, so it computes the rest
            units = [ShuffleV1Unit(in_channels, channels - in_channels, 2, groups)]
            units += [ShuffleV1Unit(channels, channels, 1, groups) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*units))
            in_channels = channels
        # the zoo pools with F.avg_pool2d(4); a module here so that the embedding can be tapped
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)
        stages = ["layer1", "layer2", "layer3"]
        self.feature_taps = {
            "stages": stages,
            "preact_stages": [
                f"{stage}.{len(self.get_submodule(stage)) - 1}.preact" for stage in stages
            ],
            "embedding": ["avgpool"],
        }

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


class ShuffleV2Unit(nn.Module):
    """Half the channels pass through; the other half go 1x1-conv, 3x3 depthwise, 1x1-conv
    (each with BN, ReLU after the 1x1s); the halves are concatenated and shuffled."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)
        # parameter-free: the halves before the ReLU and the shuffle, for a pre-activation
        # tap (OFD), as the zoo's ``preact``
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        kept, processed = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(processed)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        self.preact(torch.cat([kept, out], 1))
        return self.shuffle(torch.cat([kept, F.relu(out)], 1))


class ShuffleV2DownUnit(nn.Module):
    """The strided unit: both branches see the whole input (left: 3x3 depthwise stride 2,
    1x1; right: 1x1, 3x3 depthwise stride 2, 1x1), concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """``conv1``/``bn1`` (1x1, 24 channels), ``layer1..3`` (a down unit then 3, 7, 3 units),
    ``conv2``/``bn2`` (1x1 to 1024 channels), a global average pool and ``linear``.

    ``feature_taps``: the stages are ``layer1..3`` (the zoo's ``feat[1:4]``),
    ``preact_stages`` their last units' halves before the ReLU and the shuffle (``preact``,
    the zoo's ``preact`` feats), the embedding is ``avgpool`` (its ``feat[-1]``, here
    ``(B, 1024, 1, 1)``). No ``bn_before_relu``: the zoo's ``get_bn_before_relu`` refuses
    ShuffleNets as an OFD teacher.
    """

    def __init__(
        self,
        stage_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        stage_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for index, (channels, blocks) in enumerate(
            zip(stage_channels[:3], stage_blocks, strict=True), start=1
        ):
            units = [ShuffleV2DownUnit(in_channels, channels)]
            units += [ShuffleV2Unit(channels) for _ in range(blocks)]
            self.add_module(f"layer{index}", nn.Sequential(*units))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, stage_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(stage_channels[3])
        # the zoo pools with F.avg_pool2d(4); a module here so that the embedding can be tapped
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(stage_channels[3], num_classes)
        stages = ["layer1", "layer2", "layer3"]
        self.feature_taps = {
            "stages": stages,
            "preact_stages": [
                f"{stage}.{len(self.get_submodule(stage)) - 1}.preact" for stage in stages
            ],
            "embedding": ["avgpool"],
        }

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model
def shufflev1(num_classes: int = 10) -> ShuffleNetV1:
    """ShuffleNetV1, 3 groups, 240-480-960 channels (README.md lists its parameter counts)."""
    return ShuffleNetV1(num_classes=num_classes)


@register_model
def shufflev2(num_classes: int = 10) -> ShuffleNetV2:
    """ShuffleNetV2 1x, 116-232-464 channels, 1024 before the head (README.md lists its
    parameter counts)."""
    return ShuffleNetV2(num_classes=num_classes)
