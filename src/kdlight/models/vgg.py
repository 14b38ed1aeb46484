"""VGG with BatchNorm for CIFAR as the knowledge-distillation zoo builds it (RepDistiller's
``vgg*_bn``, mdistiller): five conv blocks, no fully connected stack, one linear classifier;
module names as in the zoo's code so that its published teachers load directly.
"""

from torch import Tensor, nn

from kdlight.models.registry import register_variants
from kdlight.models.zoo_init import init_zoo_weights_

#: Output channels of each convolution, block by block (the zoo's configurations S, A, B, D,
#: E; vgg13 is a zoo teacher). README.md lists their parameter counts.
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

    ``feature_taps``: the stages are ``relu1..4`` (the zoo's ``feat[1:5]``),
    ``preact_stages`` the same before the ReLU (``block1..4``, ending in their BN: the zoo's
    ``preact`` feats), the embedding is ``pool4`` (its ``feat[-1]``, here
    ``(B, 512, 1, 1)``). ``bn_before_relu``: for each pre-activation tap, its block's last
    BN (the zoo's ``get_bn_before_relu``).
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
        blocks = ["block1", "block2", "block3", "block4"]
        self.feature_taps = {
            "stages": ["relu1", "relu2", "relu3", "relu4"],
            "preact_stages": blocks,
            "embedding": ["pool4"],
        }
        self.bn_before_relu = {
            name: f"{name}.{len(self.get_submodule(name)) - 1}" for name in blocks
        }
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


register_variants(VGG, {name: (config,) for name, config in VGG_CONFIGS.items()})
