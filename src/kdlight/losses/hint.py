"""Hint losses on one intermediate feature map, each with the trainable connector that maps the
student's map onto the teacher's: FitNets (Romero et al., 2015) with its convolutional
regressor, and variational information distillation (VID; Ahn et al., 2019) with its
regressor of the mean and learned per-channel variance.

Both follow RepDistiller's CIFAR code (``distiller_zoo/FitNet.py``, ``models/util.py``
``ConvReg``, ``distiller_zoo/VID.py``).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlight.errors import KDLightError


def hint_loss(student_hint: Tensor, teacher_features: Tensor) -> Tensor:
    r"""FitNets hint loss (Romero et al., 2015): the mean squared error of the regressed map.

    .. math::
        \mathcal{L} = \frac{1}{B \, C \, H \, W} \sum_{b, c, h, w}
        \big( r(f_s)_{bchw} - f_{t, bchw} \big)^2

    :math:`r(f_s)` is the student's map after its :class:`ConvRegressor`, of the teacher's
    shape. Reduction: the mean over all elements (the official ``nn.MSELoss()``). The
    method's weight: 100 in the official CIFAR setting, with the cross-entropy at weight 1.

    Args:
        student_hint: ``(B, C, H, W)`` output of the :class:`ConvRegressor`.
        teacher_features: ``(B, C, H, W)`` teacher map of the same shape.
    """
    if student_hint.shape != teacher_features.shape:
        raise ValueError(
            f"the regressed student map {tuple(student_hint.shape)} must have the teacher "
            f"map's shape {tuple(teacher_features.shape)}"
        )
    with torch.autocast(device_type=student_hint.device.type, enabled=False):
        return F.mse_loss(student_hint.float(), teacher_features.detach().float())


class ConvRegressor(nn.Module):
    """FitNets' regressor: one convolution from the student's map to the teacher's shape,
    then batch norm and ReLU (RepDistiller's ``ConvReg`` with its default ``use_relu=True``).

    The convolution depends on the heights ``H_s`` and ``H_t`` (the official rules, in order):

    * ``H_s == 2 H_t``: ``Conv2d(C_s, C_t, 3, stride=2, padding=1)``, halving the map;
    * ``2 H_s == H_t``: ``ConvTranspose2d(C_s, C_t, 4, stride=2, padding=1)``, doubling it;
    * ``H_s >= H_t``: ``Conv2d(C_s, C_t, kernel_size=(1 + H_s - H_t, 1 + W_s - W_t))``
      (no padding), which is a 1x1 convolution for maps of the same size;
    * otherwise a :class:`~kdlight.errors.KDLightError`.

    Every convolution has a bias, as in the official code.

    Args:
        student_shape: ``(C_s, H_s, W_s)`` of one sample of the student's map.
        teacher_shape: ``(C_t, H_t, W_t)`` of one sample of the teacher's map.
    """

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]):
        super().__init__()
        student_channels, student_height, student_width = student_shape
        teacher_channels, teacher_height, teacher_width = teacher_shape
        if student_height == 2 * teacher_height:
            self.conv = nn.Conv2d(student_channels, teacher_channels, 3, stride=2, padding=1)
        elif 2 * student_height == teacher_height:
            self.conv = nn.ConvTranspose2d(
                student_channels, teacher_channels, 4, stride=2, padding=1
            )
        elif student_height >= teacher_height and student_width >= teacher_width:
            kernel_size = (1 + student_height - teacher_height, 1 + student_width - teacher_width)
            self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=kernel_size)
        else:
            raise KDLightError(
                f"no FitNets regressor maps a student map of shape {tuple(student_shape)} "
                f"onto a teacher map of shape {tuple(teacher_shape)}: the student's map must "
                "be twice, half, or at least the teacher's height and width"
            )
        self.bn = nn.BatchNorm2d(teacher_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_s, H_s, W_s)`` -> the regressed ``(B, C_t, H_t, W_t)`` map."""
        return self.relu(self.bn(self.conv(x)))


def vid_loss(
    predicted_mean: Tensor, predicted_variance: Tensor, teacher_features: Tensor
) -> Tensor:
    r"""Variational information distillation loss of one layer (Ahn et al., 2019).

    .. math::
        \mathcal{L} = \frac{1}{B \, C \, H \, W} \sum_{b, c, h, w} \frac{1}{2} \Big(
        \frac{(\mu_{bchw} - t_{bchw})^2}{\sigma_c^2} + \log \sigma_c^2 \Big)

    The negative log-likelihood of the teacher's map under a Gaussian whose mean
    :math:`\mu` is regressed from the student's map and whose variance :math:`\sigma_c^2`
    is learned per channel (the constant :math:`\frac{1}{2}\log 2\pi` left out, as in the
    official code). Reduction: the mean over all elements. The method sums this loss over
    its layers (the official CIFAR code: every stage output but the first and the last) and
    scales the sum by its weight, 1 in the official CIFAR setting, with the cross-entropy at
    weight 1.

    Args:
        predicted_mean: ``(B, C, H, W)`` :math:`\mu`, the regressed student map.
        predicted_variance: ``(C,)`` :math:`\sigma_c^2 > 0`, one variance per channel.
        teacher_features: ``(B, C, H, W)`` teacher map of the same shape as the mean.
    """
    if predicted_mean.shape != teacher_features.shape:
        raise ValueError(
            f"the predicted mean {tuple(predicted_mean.shape)} must have the teacher map's "
            f"shape {tuple(teacher_features.shape)}"
        )
    if predicted_variance.shape != predicted_mean.shape[1:2]:
        raise ValueError(
            f"need one variance per channel ({predicted_mean.shape[1]}), got shape "
            f"{tuple(predicted_variance.shape)}"
        )
    with torch.autocast(device_type=predicted_mean.device.type, enabled=False):
        mean = predicted_mean.float()
        teacher = teacher_features.detach().float()
        variance = predicted_variance.float().view(1, -1, 1, 1)
        return (0.5 * ((mean - teacher).pow(2) / variance + variance.log())).mean()


class VIDRegressor(nn.Module):
    r"""VID's connector for one layer: the mean regressor and the per-channel variance.

    The mean is three bias-free 1x1 convolutions (stride 1) with ReLUs between them,
    ``C_s -> C_mid -> C_mid -> C_t``; the variance is
    :math:`\sigma_c^2 = \operatorname{softplus}(\alpha_c) + \epsilon`, with the parameter
    :math:`\alpha` (``log_scale``) initialised so that every :math:`\sigma_c^2` starts at
    ``init_pred_var``. As RepDistiller's ``VIDLoss``, which the official CIFAR code builds
    with ``num_mid_channel`` equal to the teacher's channels.

    ``log_scale`` is a parameter, trained with the regressor as RepDistiller trains it and
    as the paper learns the variance; mdistiller's ``VID.py`` keeps its ``log_scales`` out
    of its optimizer (in a plain Python list), so there the variance never leaves
    ``init_pred_var``.

    Args:
        student_channels: ``C_s``.
        teacher_channels: ``C_t``.
        mid_channels: ``C_mid``; ``None`` for ``C_t``, the official choice.
        init_pred_var: the initial variance of every channel (official: 5).
        eps: :math:`\epsilon`, the floor of the variance (official: 1e-5).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        mid_channels: int | None = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        if init_pred_var <= eps:
            raise KDLightError(f"init_pred_var ({init_pred_var}) must exceed eps ({eps})")
        mid_channels = teacher_channels if mid_channels is None else mid_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, teacher_channels, kernel_size=1, bias=False),
        )
        # The inverse of softplus: softplus(log_scale) + eps == init_pred_var.
        inverse_softplus = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), inverse_softplus))
        self.eps = eps

    def variance(self) -> Tensor:
        r"""``(C_t,)``: :math:`\operatorname{softplus}(\alpha) + \epsilon`."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """:func:`vid_loss` of one layer from the student's and teacher's maps.

        Where the heights differ, the larger map is average-pooled
        (``adaptive_avg_pool2d``) to the smaller one's height and width before the student's
        map is regressed, as in the official code (which pools to ``(H, H)``: the same on
        square maps).
        """
        teacher_features = teacher_features.detach()
        student_height, teacher_height = student_features.shape[2], teacher_features.shape[2]
        if student_height > teacher_height:
            student_features = F.adaptive_avg_pool2d(student_features, teacher_features.shape[2:])
        elif student_height < teacher_height:
            teacher_features = F.adaptive_avg_pool2d(teacher_features, student_features.shape[2:])
        return vid_loss(self.regressor(student_features), self.variance(), teacher_features)
