"""The knowledge-distillation loss of Hinton, Vinyals and Dean (2015)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float | Tensor,
    alpha: float | Tensor,
) -> dict[str, Tensor]:
    r"""Hinton-style distillation loss and its two parts.

    .. math::
        \mathcal{L} = \alpha \, T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z_t / T) \,\|\,
        \mathrm{softmax}(z_s / T)\big) + (1 - \alpha) \, \mathrm{CE}(z_s, y)

    ``alpha`` weights the soft (teacher) term and ``1 - alpha`` the hard-label
    cross-entropy. The KL divergence is summed over classes and averaged over the batch
    (``batchmean``), as is the cross-entropy. The :math:`T^2` factor keeps the soft term's
    gradient on the same scale whatever the temperature (its gradient scales as
    :math:`1/T^2` otherwise). Everything is computed in float32, also under mixed precision.

    Several students at once (a T x alpha grid, in one pass): ``student_logits`` of shape
    ``(K, N, C)`` with ``temperature`` and ``alpha`` tensors of shape ``(K,)`` give each part
    as a ``(K,)`` tensor, student ``k``'s loss at its own ``T`` and ``alpha``; the teacher's
    logits and the targets are shared.

    Args:
        student_logits: ``(N, C)`` logits, or ``(K, N, C)`` for K students.
        teacher_logits: ``(N, C)`` logits; they carry no gradient.
        targets: ``(N,)`` class indices.
        temperature: :math:`T > 0`; larger values soften both distributions.
        alpha: weight of the soft term, in ``[0, 1]``.

    Returns:
        ``{"loss": total, "kd": T^2 * KL (before alpha), "ce": cross-entropy}``.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student = student_logits.float()
        teacher = teacher_logits.detach().float()
        t = temperature
        if isinstance(temperature, Tensor):  # one T per student, over its (N, C) logits
            temperature = temperature.float()
            t = temperature.view(-1, 1, 1)
        log_q = F.log_softmax(student / t, dim=-1)
        log_p = F.log_softmax(teacher / t, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(dim=-1)  # KL(p || q), batchmean
        kd = kl * temperature**2
        ce = F.cross_entropy(
            student.movedim(-1, 1) if student.dim() > 2 else student,  # classes on dim 1
            targets.expand(student.shape[:-1]),
            reduction="none",
        ).mean(dim=-1)
        return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


class KDLoss(nn.Module):
    """:func:`kd_loss` with a fixed ``temperature`` and ``alpha``."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor
    ) -> dict[str, Tensor]:
        return kd_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
