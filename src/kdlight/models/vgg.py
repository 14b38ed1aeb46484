"""VGG with BatchNorm for CIFAR as the knowledge-distillation zoo builds it (RepDistiller's
``vgg*_bn``, mdistiller): five conv blocks, no fully connected stack, one linear classifier;
module names as in the zoo's code so that its published teachers load directly.
"""

from torch import Tensor, nn

from kdlight.models.registry import register_model
from kdlight.models.zoo_init import init_zoo_weights_

#: Output channels of each convolution, block by block (the zoo's configurations S, A, B, D, E).
VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _conv_block(channels: list[int], in_channels: int) -> nn.Sequential:
    """conv3x3(bias)-BN-ReLU per entry, without the last ReLU (the network applies it, so
    that the pre-activation stays reachable, as in the zoo)."""
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """``block0..4`` (each followed by ``relu0..4``), 2x2 max-pools ``pool0..2`` between
    them, ``pool4`` (global average) and ``classifier``. ``pool3`` runs only on 64x64 inputs
    (Tiny-ImageNet), as in the zoo; on 32x32 inputs block3 and block4 both see 4x4 maps.

    ``feature_taps``: the stages are ``relu1..4`` (the zoo's ``feat[1:5]``), the embedding
    is ``pool4`` (its ``feat[-1]``, here ``(B, 512, 1, 1)``).
    """

    def __init__(self, config: list[list[int]], num_classes: int = 10) -> None:
        super().__init__()
        in_channels = 3
        for index, channels in enumerate(config):
            self.add_module(f"block{index}", _conv_block(channels, in_channels))
            # parameter-free: the zoo applies F.relu; a module here so a stage can be tapped
            self.add_module(f"relu{index}", nn.ReLU())
            in_channels = channels[-1]
        for index in range(4):
            self.add_module(f"pool{index}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.feature_taps = {"stages": ["relu1", "relu2", "relu3", "relu4"], "embedding": ["pool4"]}
        init_zoo_weights_(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if height == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


@register_model
def vgg8(num_classes: int = 10) -> VGG:
    """VGG-8 with BN (one conv per block): 3,965,028 params (100 classes), 3,918,858 (10)."""
    return VGG(VGG_CONFIGS["vgg8"], num_classes)


@register_model
def vgg11(num_classes: int = 10) -> VGG:
    """VGG-11 with BN: 9,277,284 params (100 classes), 9,231,114 (10)."""
    return VGG(VGG_CONFIGS["vgg11"], num_classes)


@register_model
def vgg13(num_classes: int = 10) -> VGG:
    """VGG-13 with BN, a zoo teacher: 9,462,180 params (100 classes), 9,416,010 (10)."""
    return VGG(VGG_CONFIGS["vgg13"], num_classes)


@register_model
def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16 with BN: 14,774,436 params (100 classes), 14,728,266 (10)."""
    return VGG(VGG_CONFIGS["vgg16"], num_classes)


@register_model
def vgg19(num_classes: int = 10) -> VGG:
    """VGG-19 with BN: 20,086,692 params (100 classes), 20,040,522 (10)."""
    return VGG(VGG_CONFIGS["vgg19"], num_classes)
