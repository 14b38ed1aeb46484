"""The weight initialisation of the CIFAR knowledge-distillation zoo's models (RepDistiller).

Its ``normal_(0, sqrt(2 / (k * k * out_channels)))`` for convolutions is PyTorch's
``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, which is what is used here.
"""

from torch import nn


def init_zoo_weights_(
    model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False
) -> None:
    """Kaiming (fan-out) convolutions with zero biases and BatchNorm at (1, 0); linear layers
    drawn from ``N(0, linear_std)`` with zero biases when ``linear_std`` is given, else left
    at PyTorch's default (with a zero bias when ``zero_linear_bias``)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(module.bias)
