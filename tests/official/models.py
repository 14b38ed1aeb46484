"""The official CIFAR architectures of the knowledge-distillation zoo, written in the test
suite as RepDistiller writes them (HobbitLong/RepDistiller ``models/*.py``; mdistiller's
``mdistiller/models/cifar/*.py`` are the same networks with a different return value), so
that kdlight's zoo models are checked against an independent reference.

Each class keeps the official module names, so its ``state_dict`` has the official keys
(those of a published ``ckpt_epoch_240.pth``) because the modules produce them, not because
a mapping renames them. ``forward(x, is_feat=False, preact=False)`` returns the logits, or
``(feats, logits)`` with ``is_feat=True`` as RepDistiller's models do: ``feats`` is [stem
output, stage 1, ..., stage k, pooled feature ``(B, D)``], each stage after its ReLU unless
``preact=True``. (mdistiller returns ``(logits, {"feats": feats[:-1], "preact_feats": ...,
"pooled_feat": feats[-1]})``: the same tensors.)

Public helpers:

* :func:`official_model`: the official network for a kdlight zoo name;
* :func:`official_copy_of`: the official network holding a kdlight zoo model's weights.

Only what the zoo's CIFAR names use is written (e.g. no Bottleneck ResNet, no VGG without
BN); the official initialisation is kept, so that a fresh model is what the official code
would build.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdlight.models import official_state_dict

Feats = tuple[list[Tensor], Tensor]


# --------------------------------------------------------------------------------- ResNet
# RepDistiller models/resnet.py (mdistiller mdistiller/models/cifar/resnet.py is the same
# network; it returns the feats in a dict).


class BasicBlock(nn.Module):
    """RepDistiller models/resnet.py:25-56; the last block of a stage also returns its
    pre-activation (``is_last``), which the stage's ``nn.Sequential`` passes out."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        is_last: bool = False,
    ) -> None:
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        preact = out
        out = F.relu(out)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    """RepDistiller models/resnet.py:103-202 (BasicBlock only: every zoo CIFAR ResNet)."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 10) -> None:
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=(blocks == 1))]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, is_last=(i == blocks - 1)) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | Feats:
        x = self.relu(self.bn1(self.conv1(x)))  # 32x32
        f0 = x
        x, f1_pre = self.layer1(x)  # 32x32
        f1 = x
        x, f2_pre = self.layer2(x)  # 16x16
        f2 = x
        x, f3_pre = self.layer3(x)  # 8x8
        f3 = x
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        f4 = x
        x = self.fc(x)
        if is_feat:
            if preact:
                return [f0, f1_pre, f2_pre, f3_pre, f4], x
            return [f0, f1, f2, f3, f4], x
        return x


# ------------------------------------------------------------------------------------ VGG
# RepDistiller models/vgg.py; the zoo's "vgg8".."vgg19" are its vgg*_bn (models/__init__.py
# model_dict). mdistiller mdistiller/models/cifar/vgg.py is the same network.


class VGG(nn.Module):
    """RepDistiller models/vgg.py:24-130, with ``batch_norm=True``."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 1000) -> None:
        super().__init__()
        self.block0 = self._make_layers(cfg[0], 3)
        self.block1 = self._make_layers(cfg[1], cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
                m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    @staticmethod
    def _make_layers(cfg: list[int], in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in cfg:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
            in_channels = v
        return nn.Sequential(*layers[:-1])  # the forward applies the block's last ReLU

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | Feats:
        h = x.shape[2]
        x = F.relu(self.block0(x))
        f0 = x
        x = self.pool0(x)
        x = self.block1(x)
        f1_pre = x
        x = F.relu(x)
        f1 = x
        x = self.pool1(x)
        x = self.block2(x)
        f2_pre = x
        x = F.relu(x)
        f2 = x
        x = self.pool2(x)
        x = self.block3(x)
        f3_pre = x
        x = F.relu(x)
        f3 = x
        if h == 64:
            x = self.pool3(x)
        x = self.block4(x)
        f4_pre = x
        x = F.relu(x)
        f4 = x
        x = self.pool4(x)
        x = x.view(x.size(0), -1)
        f5 = x
        x = self.classifier(x)
        if is_feat:
            if preact:
                return [f0, f1_pre, f2_pre, f3_pre, f4_pre, f5], x
            return [f0, f1, f2, f3, f4, f5], x
        return x


VGG_CFG = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
    "S": [[64], [128], [256], [512], [512]],
}


# ------------------------------------------------------------------------------ WideResNet
# RepDistiller models/wrn.py. mdistiller mdistiller/models/cifar/wrn.py is the same network,
# but its forward always computes the pre-activation feats by running
# block2.layer[0].bn1, block3.layer[0].bn1 and bn1 a second time on the stage outputs
# (mdistiller wrn.py:140-142): in train mode those three BNs update their running statistics
# twice per step. kdlight follows RepDistiller (once per step), as written here.


class WideBasicBlock(nn.Module):
    """RepDistiller models/wrn.py:13-38 (``BasicBlock``, dropRate 0 as the zoo uses it)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    """RepDistiller models/wrn.py:41-53."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(
                    i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1
                )
                for i in range(nb_layers)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """RepDistiller models/wrn.py:56-126."""

    def __init__(self, depth: int, num_classes: int, widen_factor: int = 1) -> None:
        super().__init__()
        n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        assert (depth - 4) % 6 == 0
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, n_channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, n_channels[0], n_channels[1], 1)
        self.block2 = NetworkBlock(n, n_channels[1], n_channels[2], 2)
        self.block3 = NetworkBlock(n, n_channels[2], n_channels[3], 2)
        self.bn1 = nn.BatchNorm2d(n_channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(n_channels[3], num_classes)
        self.nChannels = n_channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | Feats:
        out = self.conv1(x)
        f0 = out
        out = self.block1(out)
        f1 = out
        out = self.block2(out)
        f2 = out
        out = self.block3(out)
        f3 = out
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.nChannels)
        f4 = out
        out = self.fc(out)
        if is_feat:
            if preact:
                f1 = self.block2.layer[0].bn1(f1)
                f2 = self.block3.layer[0].bn1(f2)
                f3 = self.bn1(f3)
            return [f0, f1, f2, f3, f4], out
        return out


# ----------------------------------------------------------------------------- MobileNetV2
# RepDistiller models/mobilenetv2.py; the zoo's "MobileNetV2" is its mobile_half (T=6,
# width 0.5). mdistiller mdistiller/models/cifar/mobilenetv2.py is the same network.


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


def _conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """RepDistiller models/mobilenetv2.py:31-62."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pw
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # dw
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pw-linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """RepDistiller models/mobilenetv2.py:65-181 (``input_size=32``, ``remove_avg=False``)."""

    def __init__(self, T: int, feature_dim: int, width_mult: float = 1.0) -> None:
        super().__init__()
        setting = [  # t, c, n, s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList([])
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        self.avgpool = nn.AvgPool2d(32 // (32 // 2), ceil_mode=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | Feats:
        out = self.conv1(x)
        f0 = out
        out = self.blocks[0](out)
        out = self.blocks[1](out)
        f1 = out
        out = self.blocks[2](out)
        f2 = out
        out = self.blocks[3](out)
        out = self.blocks[4](out)
        f3 = out
        out = self.blocks[5](out)
        out = self.blocks[6](out)
        f4 = out
        out = self.conv2(out)
        out = self.avgpool(out)
        out = out.view(out.size(0), -1)
        f5 = out
        out = self.classifier(out)
        if is_feat:  # no pre-activation feats: the stages end in a linear bottleneck
            return [f0, f1, f2, f3, f4, f5], out
        return out


# ------------------------------------------------------------------------------ ShuffleNets
# RepDistiller models/ShuffleNetv1.py and ShuffleNetv2.py (no weight initialisation: PyTorch's
# defaults). mdistiller's copies are the same networks (reshape for view in the shuffle).


class ShuffleBlock(nn.Module):
    """RepDistiller models/ShuffleNetv1.py:9-18 (and ShuffleNetv2.py:9-18, groups=2)."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.size()
        g = self.groups
        return x.view(N, g, C // g, H, W).permute(0, 2, 1, 3, 4).reshape(N, C, H, W)


class ShuffleV1Bottleneck(nn.Module):
    """RepDistiller models/ShuffleNetv1.py:21-53 (``Bottleneck``)."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, is_last: bool = False
    ) -> None:
        super().__init__()
        self.is_last = is_last
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ShuffleNet(nn.Module):
    """RepDistiller models/ShuffleNetv1.py:56-124 (``ShuffleV1``: 240-480-960, 4-8-4, g=3)."""

    def __init__(
        self,
        out_planes: tuple[int, ...] = (240, 480, 960),
        num_blocks: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(
                ShuffleV1Bottleneck(
                    self.in_planes,
                    out_planes - cat_planes,
                    stride=stride,
                    groups=groups,
                    is_last=(i == num_blocks - 1),
                )
            )
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | Feats:
        out = F.relu(self.bn1(self.conv1(x)))
        f0 = out
        out, f1_pre = self.layer1(out)
        f1 = out
        out, f2_pre = self.layer2(out)
        f2 = out
        out, f3_pre = self.layer3(out)
        f3 = out
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        f4 = out
        out = self.linear(out)
        if is_feat:
            if preact:
                return [f0, f1_pre, f2_pre, f3_pre, f4], out
            return [f0, f1, f2, f3, f4], out
        return out


class SplitBlock(nn.Module):
    """RepDistiller models/ShuffleNetv2.py:21-28."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c, :, :], x[:, c:, :, :]


class ShuffleV2BasicBlock(nn.Module):
    """RepDistiller models/ShuffleNetv2.py:31-62 (``BasicBlock``); its pre-activation is the
    concatenation before the shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5, is_last: bool = False) -> None:
        super().__init__()
        self.is_last = is_last
        self.split = SplitBlock(split_ratio)
        in_channels = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(
            in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False
        )
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.conv3 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(in_channels)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        preact = self.bn3(self.conv3(out))
        out = F.relu(preact)
        preact = torch.cat([x1, preact], 1)
        out = torch.cat([x1, out], 1)
        out = self.shuffle(out)
        return (out, preact) if self.is_last else out


class DownBlock(nn.Module):
    """RepDistiller models/ShuffleNetv2.py:65-98."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid_channels = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = nn.Conv2d(
            mid_channels, mid_channels, 3, stride=2, padding=1, groups=mid_channels, bias=False
        )
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid_channels)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.bn1(self.conv1(x))  # left
        out1 = F.relu(self.bn2(self.conv2(out1)))
        out2 = F.relu(self.bn3(self.conv3(x)))  # right
        out2 = self.bn4(self.conv4(out2))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        out = torch.cat([out1, out2], 1)
        return self.shuffle(out)


class ShuffleNetV2(nn.Module):
    """RepDistiller models/ShuffleNetv2.py:101-162 (``ShuffleV2``: net_size 1)."""

    def __init__(
        self,
        out_channels: tuple[int, ...] = (116, 232, 464, 1024),
        num_blocks: tuple[int, ...] = (3, 7, 3),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        for i in range(num_blocks):
            layers.append(ShuffleV2BasicBlock(out_channels, is_last=(i == num_blocks - 1)))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | Feats:
        out = F.relu(self.bn1(self.conv1(x)))
        f0 = out
        out, f1_pre = self.layer1(out)
        f1 = out
        out, f2_pre = self.layer2(out)
        f2 = out
        out, f3_pre = self.layer3(out)
        f3 = out
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        f4 = out
        out = self.linear(out)
        if is_feat:
            if preact:
                return [f0, f1_pre, f2_pre, f3_pre, f4], out
            return [f0, f1, f2, f3, f4], out
        return out


# ------------------------------------------------------------------------------- registry

_NARROW, _WIDE = [16, 16, 32, 64], [32, 64, 128, 256]

#: kdlight's zoo name -> the official constructor (RepDistiller models/__init__.py model_dict).
OFFICIAL_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": lambda num_classes: ResNet(8, _NARROW, num_classes),
    "resnet14": lambda num_classes: ResNet(14, _NARROW, num_classes),
    "resnet20": lambda num_classes: ResNet(20, _NARROW, num_classes),
    "resnet32": lambda num_classes: ResNet(32, _NARROW, num_classes),
    "resnet44": lambda num_classes: ResNet(44, _NARROW, num_classes),
    "resnet56": lambda num_classes: ResNet(56, _NARROW, num_classes),
    "resnet110": lambda num_classes: ResNet(110, _NARROW, num_classes),
    "resnet8x4": lambda num_classes: ResNet(8, _WIDE, num_classes),
    "resnet32x4": lambda num_classes: ResNet(32, _WIDE, num_classes),
    "vgg8": lambda num_classes: VGG(VGG_CFG["S"], num_classes),
    "vgg11": lambda num_classes: VGG(VGG_CFG["A"], num_classes),
    "vgg13": lambda num_classes: VGG(VGG_CFG["B"], num_classes),
    "vgg16": lambda num_classes: VGG(VGG_CFG["D"], num_classes),
    "vgg19": lambda num_classes: VGG(VGG_CFG["E"], num_classes),
    "wrn_16_1": lambda num_classes: WideResNet(16, num_classes, widen_factor=1),
    "wrn_16_2": lambda num_classes: WideResNet(16, num_classes, widen_factor=2),
    "wrn_40_1": lambda num_classes: WideResNet(40, num_classes, widen_factor=1),
    "wrn_40_2": lambda num_classes: WideResNet(40, num_classes, widen_factor=2),
    "mobilenetv2": lambda num_classes: MobileNetV2(6, num_classes, width_mult=0.5),
    "shufflev1": lambda num_classes: ShuffleNet(num_classes=num_classes),
    "shufflev2": lambda num_classes: ShuffleNetV2(num_classes=num_classes),
}


def official_model(name: str, num_classes: int = 100) -> nn.Module:
    """The official architecture for the kdlight zoo name ``name`` (e.g. ``"vgg8"`` is
    RepDistiller's ``vgg8_bn``), freshly initialised as the official code does it."""
    if name not in OFFICIAL_MODELS:
        raise KeyError(f"no official model for {name!r}; written: {', '.join(OFFICIAL_MODELS)}")
    return OFFICIAL_MODELS[name](num_classes)


def _num_classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def official_copy_of(name: str, model: nn.Module) -> nn.Module:
    """The official network holding the weights and BN buffers of kdlight's zoo ``model``
    (``kdlight.models.official_state_dict(name, model)``, loaded strictly), in ``model``'s
    train/eval mode and on its device. The weights are copies: training one changes nothing
    in the other."""
    official = official_model(name, _num_classes(model))
    state = {key: value.detach().clone() for key, value in official_state_dict(name, model).items()}
    official.load_state_dict(state, strict=True)
    parameter = next(model.parameters())
    return official.to(parameter.device).train(model.training)


@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (He-scaled), BatchNorm's affine terms and running statistics
    included, so that an eval-mode output depends on every buffer. (In eval mode the random
    statistics do not normalise: a deep residual network's activations grow with depth.)"""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
            module.weight.mul_(math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                module.bias.uniform_(-0.1, 0.1, generator=generator)
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
            module.weight.uniform_(0.5, 1.0, generator=generator)
            module.bias.uniform_(-0.2, 0.2, generator=generator)
    return model
