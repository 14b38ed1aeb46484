"""Curriculum temperature KD (Li et al., AAAI 2023): Hinton's KD term at a temperature that is
learned against the student, through a gradient-reversal layer."""

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlight.losses.kd import _kl_batchmean, _soft_logits


class _ReverseGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by ``-weight``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: Tensor, weight: float) -> Tensor:
    """``x`` unchanged, but the gradient that flows back through it is multiplied by
    ``-weight`` (the gradient-reversal layer of Ganin and Lempitsky, 2015): what lies before
    it climbs the loss that what lies after it descends, ``weight`` times as fast."""
    return _ReverseGradient.apply(x, weight)


def ctkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    parameter: Tensor,
    reversal: float,
    min_temperature: float = 1.0,
    temperature_range: float = 20.0,
    standardize: bool = False,
) -> dict[str, Tensor]:
    r"""The KD term of curriculum temperature KD, at a temperature learned adversarially.

    .. math::
        \tau = \tau_{min} + \tau_{range} \, \sigma\big(\mathrm{GRL}_\lambda(\theta)\big),
        \qquad
        \mathcal{L}_{kd} = \tau^2 \, \mathrm{KL}\big(\mathrm{softmax}(z_t / \tau) \,\|\,
        \mathrm{softmax}(z_s / \tau)\big)

    with :math:`\theta` the learned ``parameter`` (0-dim), :math:`\sigma` the sigmoid and
    :math:`\mathrm{GRL}_\lambda` the identity whose backward multiplies the gradient by
    :math:`-\lambda` (:func:`reverse_gradient`, :math:`\lambda` = ``reversal``): the student
    descends :math:`\mathcal{L}_{kd}` while :math:`\theta` climbs it, :math:`\lambda` times
    as fast. The temperature stays in :math:`(\tau_{min}, \tau_{min} + \tau_{range})`, with
    the defaults (1, 21): the official code's ``t_start + t_end * sigmoid(T)``
    (``helper/loops.py:134``), whose upper end is 21, not 20.

    The KL divergence is summed over the classes and averaged over the batch
    (``batchmean``). The :math:`\tau^2` factor is the official code's
    (``distiller_zoo/KD.py:17-18``), and the temperature's gradient goes through it too:
    :math:`\theta` climbs :math:`\tau^2 \mathrm{KL}`, not the KL alone.
    ``standardize=True`` z-scores both logits first
    (:func:`kdlight.losses.standardize_logits`), as the logit-standardization code's CTKD
    does (Sun et al., CVPR 2024). The weights of this term and of the cross-entropy are
    :class:`kdlight.distillers.CTKD`'s; this function applies none.

    Args:
        student_logits, teacher_logits: ``(N, C)`` logits; the teacher's carry no gradient.
        parameter: :math:`\theta`, the 0-dim learned number the temperature is a sigmoid of.
        reversal: :math:`\lambda \ge 0`, how much of the gradient reaches :math:`\theta`,
            reversed (0: none).
        min_temperature, temperature_range: :math:`\tau_{min} \ge 0` and
            :math:`\tau_{range} > 0`.
        standardize: z-score both logits along the classes first.

    Returns:
        ``{"loss": the KD term (tau^2 * KL), "temperature": tau}``, both 0-dim.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        theta = reverse_gradient(parameter.float(), reversal)
        temperature = min_temperature + temperature_range * torch.sigmoid(theta)
        student, teacher = student_logits.float(), teacher_logits.detach().float()
        soft_student, soft_teacher, scale = _soft_logits(student, teacher, temperature, standardize)
        log_q, log_p = F.log_softmax(soft_student, dim=-1), F.log_softmax(soft_teacher, dim=-1)
        return {"loss": _kl_batchmean(log_p, log_q) * scale, "temperature": temperature}
