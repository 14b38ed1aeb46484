"""The knowledge-distillation loss of Hinton, Vinyals and Dean (2015), with the optional logit
standardization of Sun et al. (2024), and the helpers the other logit losses share."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STANDARDIZE_EPS = 1e-7  # as in the logit-standardization paper's code


def standardize_logits(logits: Tensor) -> Tensor:
    r"""Z-score ``logits`` along the classes (the last dimension), as Sun et al. (2024) do.

    .. math::
        \mathcal{Z}(z) = \frac{z - \bar z}{10^{-7} + \sigma(z)}

    with :math:`\bar z` the mean and :math:`\sigma` the sample (unbiased,
    ``torch.std``'s default) standard deviation over the classes. The result does not
    change when a constant is added to the logits or they are multiplied by a positive
    factor (up to the :math:`10^{-7}`).
    """
    std, mean = torch.std_mean(logits, dim=-1, keepdim=True)
    return (logits - mean) / (STANDARDIZE_EPS + std)


def _soft_logits(
    student: Tensor, teacher: Tensor, temperature: float | Tensor, standardize: bool
) -> tuple[Tensor, Tensor, float | Tensor]:
    """The inputs of a soft term, both logits divided by T (z-scored first with
    ``standardize``), and its T^2 factor. A ``(K,)`` temperature, taken in float32, divides
    the ``(N, C)`` logits once per student, giving ``(K, N, C)``, and a ``(K,)`` T^2; a 0-dim
    one (a learned temperature, CTKD's) divides them as a number would."""
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
    divisor = temperature
    if isinstance(temperature, Tensor):
        temperature = temperature.float()
        divisor = temperature.view(-1, 1, 1) if temperature.dim() else temperature
    return student / divisor, teacher / divisor, temperature**2


def _kl_batchmean(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) from log-probabilities: summed over the last dimension, averaged over the
    batch (the one before it)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(dim=-1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float | Tensor,
    alpha: float | Tensor,
    standardize: bool = False,
) -> dict[str, Tensor]:
    r"""Hinton-style distillation loss and its two parts.

    .. math::
        \mathcal{L} = \alpha \, T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z_t / T) \,\|\,
        \mathrm{softmax}(z_s / T)\big) + (1 - \alpha) \, \mathrm{CE}(z_s, y)

    ``alpha`` weights the soft (teacher) term and ``1 - alpha`` the hard-label
    cross-entropy. The KL divergence is summed over classes and averaged over the batch
    (``batchmean``), as is the cross-entropy. The :math:`T^2` factor keeps the soft term's
    gradient on the same scale whatever the temperature (its gradient scales as
    :math:`1/T^2` otherwise). With ``alpha=0.9`` and ``T=4`` it is mdistiller's KD loss,
    ``0.1 * CE + 0.9 * kd_loss`` (``distillers/KD.py``), to float32 rounding.

    With ``standardize=True`` (logit standardization, Sun et al., CVPR 2024) both
    :math:`z_s` and :math:`z_t` in the soft term are replaced by their z-scores over the
    classes (:func:`standardize_logits`) before the division by :math:`T`; the student then
    matches the teacher's logit relations, not their range. The cross-entropy always uses
    the raw student logits.

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
        standardize: z-score both logits along the classes in the soft term.

    Returns:
        ``{"loss": total, "kd": T^2 * KL (before alpha), "ce": cross-entropy}``.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student = student_logits.float()
        teacher = teacher_logits.detach().float()
        soft_student, soft_teacher, scale = _soft_logits(student, teacher, temperature, standardize)
        log_q, log_p = F.log_softmax(soft_student, dim=-1), F.log_softmax(soft_teacher, dim=-1)
        kd = _kl_batchmean(log_p, log_q) * scale
        ce = F.cross_entropy(
            student.movedim(-1, 1) if student.dim() > 2 else student,  # classes on dim 1
            targets.expand(student.shape[:-1]),
            reduction="none",
        ).mean(dim=-1)
        return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


class KDLoss(nn.Module):
    """:func:`kd_loss` with a fixed ``temperature``, ``alpha`` and ``standardize``."""

    def __init__(
        self, temperature: float = 4.0, alpha: float = 0.9, standardize: bool = False
    ) -> None:
        super().__init__()
        self.temperature, self.alpha, self.standardize = temperature, alpha, standardize

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor
    ) -> dict[str, Tensor]:
        settings = self.temperature, self.alpha, self.standardize
        return kd_loss(student_logits, teacher_logits, targets, *settings)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, standardize={self.standardize}"
