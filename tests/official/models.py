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
