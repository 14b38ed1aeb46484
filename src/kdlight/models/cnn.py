"""A small plain CNN student: the class of model that reaches about 84% on CIFAR-10 alone."""

from torch import Tensor, nn

from kdlight.models.registry import register_model
from kdlight.models.width import scaled_channels


def _conv_bn_relu(in_channels: int, out_channels: int, inplace: bool = True) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=inplace),
    ]


class SmallCNN(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU layers and a 2x2 max-pool, then a linear head.

    ``feature_taps`` names the outputs the feature methods read by default: each stage's
    (after its max-pool), the same before its last ReLU and max-pool (``preact_stages``:
    the stage's last BN, each its own ``bn_before_relu``) and the pooled feature
    (``head.1``, flattened).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = scaled_channels((32, 64, 128), width, "small_cnn")
        # a stage's last ReLU is not in place: its BN's output is a pre-activation tap
        self.features = nn.Sequential(
            *_conv_bn_relu(3, c1), *_conv_bn_relu(c1, c1, False), nn.MaxPool2d(2),
            *_conv_bn_relu(c1, c2), *_conv_bn_relu(c2, c2, False), nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3), *_conv_bn_relu(c3, c3, False), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, num_classes))
        preact = ["features.4", "features.11", "features.18"]
        self.feature_taps = {
            "stages": ["features.6", "features.13", "features.20"],
            "preact_stages": preact,
            "embedding": ["head.1"],
        }
        self.bn_before_relu = {name: name for name in preact}

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@register_model
def small_cnn(num_classes: int = 10, width: float = 1.0) -> SmallCNN:
    """The reference-style student: six 3x3 convolutions (32-32-64-64-128-128), ~0.29M params."""
    return SmallCNN(num_classes, width)
