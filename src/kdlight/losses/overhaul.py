"""The overhaul of feature distillation (OFD; Heo et al., 2019): the student's
pre-activation stage maps, through a trainable connector, against the teacher's
pre-activation maps with their negative values raised to a per-channel margin, under a
partial L2 distance.

As mdistiller's CIFAR code (``mdistiller/distillers/OFD.py``): :func:`ofd_margins` is its
margin (lines 90-109), :func:`partial_l2` its ``feat_loss`` (lines 11-19), :func:`ofd_loss`
its ``ofd_loss`` (lines 142-161) and :class:`OFDConnector` its ``ConnectorConvBN`` (lines
22-60).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Below this probability of a negative BN output, the margin is -3 sigma (OFD.py:98, 107).
_RARELY_NEGATIVE = 1e-3


def ofd_margins(weight: Tensor, bias: Tensor) -> Tensor:
    r"""The margin of each channel: the expected value of a BN output that is negative, if
    the output is :math:`\mathcal{N}(\beta_c, \gamma_c^2)` (the BN's affine weight
    :math:`\gamma` and bias :math:`\beta`, not its running statistics):

    .. math::
        m_c = \mathbb{E}[x \mid x < 0] = \beta_c - |\gamma_c| \,
        \frac{\phi(\beta_c / |\gamma_c|)}{\Phi(-\beta_c / |\gamma_c|)}

    (:math:`\phi`, :math:`\Phi`: the standard normal density and distribution), or
    :math:`-3 |\gamma_c|` where :math:`\Phi(-\beta_c / |\gamma_c|) \le 10^{-3}`. Computed
    in float64, returned as float32 ``(C,)``: constants of the frozen teacher.

    Args:
        weight: ``(C,)`` :math:`\gamma` of the BN before the ReLU.
        bias: ``(C,)`` :math:`\beta` of that BN.
    """
    std = weight.detach().double().abs()
    mean = bias.detach().double()
    ratio = mean / std
    below = torch.special.ndtr(-ratio)  # P(x < 0)
    density = torch.exp(-(ratio**2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(below > _RARELY_NEGATIVE, mean - std * density / below, -3 * std)
    return margin.float()


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    r"""OFD's partial L2 distance of one stage, to the teacher's map after the margin ReLU
    :math:`\sigma_m(t) = \max(t, m_c)`:

    .. math::
        \mathcal{L} = \frac{1}{B} \sum_{b, c, h, w}
        \begin{cases}
        0 & \text{if } s_{bchw} \le \sigma_m(t_{bchw}) \le 0 \\
        \big(s_{bchw} - \sigma_m(t_{bchw})\big)^2 & \text{otherwise}
        \end{cases}

    (where the teacher's value is negative the student need only be as low; the margin
    :math:`m_c < 0` is :func:`ofd_margins`). Reduction: the sum over channels and positions
    and the mean over the batch (mdistiller's ``mean(dim=0).sum()``).

    Args:
        student: ``(B, C, H, W)`` the student's map after its :class:`OFDConnector`.
        teacher: ``(B, C, H, W)`` the teacher's pre-activation map, of the same shape.
        margin: ``(C,)`` the margins.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"the connected student map {tuple(student.shape)} must have the teacher map's "
            f"shape {tuple(teacher.shape)}"
        )
    with torch.autocast(device_type=student.device.type, enabled=False):
        student = student.float()
        target = torch.maximum(teacher.detach().float(), margin.float().view(1, -1, 1, 1))
        counted = (student > target) | (target > 0)
        return ((student - target).pow(2) * counted).sum() / student.shape[0]


def ofd_loss(student: list[Tensor], teacher: list[Tensor], margins: list[Tensor]) -> Tensor:
    r"""OFD's feature term over ``L`` paired stages, shallow to deep, each shallower stage
    weighted half as much as the next:

    .. math::
        \mathcal{L}_{OFD} = \sum_{l=1}^{L} 2^{-(L - l)} \,
        \mathrm{PL2}\big(c_l(s_l), \mathrm{pool}(t_l), m_l\big)

    with :func:`partial_l2` and each teacher map average-pooled
    (``adaptive_avg_pool2d``) to its student map's height and width. The method scales it
    by its weight (mdistiller's CIFAR setting: 0.001), with the cross-entropy at weight 1.
    Computed in float32.

    Args:
        student: ``L`` maps ``(B, C_l, H_l, W_l)``, each after its connector :math:`c_l`.
        teacher: ``L`` pre-activation maps ``(B, C_l, H'_l, W'_l)``.
        margins: ``L`` tensors ``(C_l,)``.
    """
    if not len(student) == len(teacher) == len(margins):
        raise ValueError(
            f"need as many student maps ({len(student)}), teacher maps ({len(teacher)}) and "
            f"margins ({len(margins)})"
        )
    total = student[0].new_zeros((), dtype=torch.float32)
    count = len(student)
    for index, (s, t, margin) in enumerate(zip(student, teacher, margins, strict=True)):
        pooled = F.adaptive_avg_pool2d(t.detach(), s.shape[-2:])
        total = total + partial_l2(s, pooled, margin) / 2 ** (count - 1 - index)
    return total


class OFDConnector(nn.Module):
    """OFD's connector of one stage: a bias-free convolution from the student's channels to
    the teacher's (stride 1, padding ``(kernel_size - 1) // 2``), then batch norm, as
    mdistiller's ``ConnectorConvBN``: the convolution drawn from
    :math:`\\mathcal{N}(0, 2 / (k^2 C_t))`, the BN's weight 1 and bias 0.

    Args:
        student_channels: ``C_s``.
        teacher_channels: ``C_t``.
        kernel_size: ``k`` (official CIFAR setting: 1).
    """

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            student_channels,
            teacher_channels,
            kernel_size,
            stride=1,
            padding=(kernel_size - 1) // 2,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(teacher_channels)
        fan_out = kernel_size * kernel_size * teacher_channels
        with torch.no_grad():
            self.conv.weight.normal_(0, math.sqrt(2.0 / fan_out))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_s, H, W)`` -> ``(B, C_t, H', W')`` (``H' = H`` for an odd kernel)."""
        return self.bn(self.conv(x))
