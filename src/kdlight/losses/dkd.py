"""Decoupled knowledge distillation (Zhao et al., CVPR 2022): the KD term split into its
target-class and non-target-class parts, weighted apart."""

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlight.losses.kd import _kl_batchmean, _soft_logits

# Subtracted from the target logit (after the division by T) to leave it out of the
# non-target softmax, as mdistiller does: a finite offset, unlike -inf, keeps 0 * log 0 out
# of the KL.
TARGET_MASK_OFFSET = 1000.0


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float | Tensor = 4.0,
    alpha: float | Tensor = 1.0,
    beta: float | Tensor = 8.0,
    standardize: bool = False,
) -> dict[str, Tensor]:
    r"""Decoupled KD loss and its two parts.

    With :math:`p = \mathrm{softmax}(z_t / T)` (teacher), :math:`q = \mathrm{softmax}(z_s / T)`
    (student) and :math:`t` the target class, let :math:`b^p = (p_t, 1 - p_t)` be the binary
    target-vs-rest split and :math:`\hat p_i = p_i / (1 - p_t)`, :math:`i \ne t`, the softmax
    over the non-target classes (likewise :math:`b^q`, :math:`\hat q`). Then

    .. math::
        \mathrm{TCKD} = \mathrm{KL}(b^p \,\|\, b^q), \qquad
        \mathrm{NCKD} = \mathrm{KL}(\hat p \,\|\, \hat q), \qquad
        \mathcal{L} = \alpha \, T^2 \, \mathrm{TCKD} + \beta \, T^2 \, \mathrm{NCKD}

    and :math:`\mathrm{KL}(p \,\|\, q) = \mathrm{TCKD} + (1 - p_t) \, \mathrm{NCKD}` per sample:
    classical KD ties NCKD's weight to the teacher's confidence, DKD frees it.

    ``alpha`` scales the target-class term (TCKD) and ``beta`` the non-target-class term
    (NCKD). Each KL is summed over its classes, multiplied by :math:`T^2` and averaged over
    the batch. The target logit is left out of the non-target softmax by subtracting 1000
    from it after the division by :math:`T`, as in mdistiller.

    This is the distillation term only: the DKD method (:class:`kdlight.distillers.DKD`, with
    mdistiller's CIFAR-100 settings) adds the cross-entropy and the linear warm-up. Equal to
    mdistiller's ``dkd_loss`` (``distillers/DKD.py``) on resnet56_resnet20 and vgg13_vgg8
    (tests/test_fidelity_logit.py).

    With ``standardize=True`` both logits are z-scored over the classes before the division
    by :math:`T` (logit standardization, Sun et al., CVPR 2024; see :func:`kd_loss`).

    Several students at once as for :func:`kd_loss`, ``beta`` too a float or a ``(K,)`` tensor.

    Args:
        student_logits: ``(N, C)`` logits, or ``(K, N, C)`` for K students.
        teacher_logits: ``(N, C)`` logits; they carry no gradient.
        targets: ``(N,)`` class indices.
        temperature: :math:`T > 0`, shared by both terms.
        alpha: weight of TCKD.
        beta: weight of NCKD.
        standardize: z-score both logits along the classes first.

    Returns:
        ``{"loss": alpha * tckd + beta * nckd, "tckd": T^2 * TCKD, "nckd": T^2 * NCKD}``,
        ``tckd`` and ``nckd`` before their weights.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student, teacher, scale = _soft_logits(
            student_logits.float(), teacher_logits.detach().float(), temperature, standardize
        )
        is_target = F.one_hot(targets, teacher.shape[-1]).bool()  # (N, C), shared by K students
        binary_q, others_q = _decoupled_log_probs(student, is_target)
        binary_p, others_p = _decoupled_log_probs(teacher, is_target)
        tckd = _kl_batchmean(binary_p, binary_q) * scale
        nckd = _kl_batchmean(others_p, others_q) * scale
        return {"loss": alpha * tckd + beta * nckd, "tckd": tckd, "nckd": nckd}


def _decoupled_log_probs(scaled_logits: Tensor, is_target: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of softmax(``scaled_logits``) split in two: ``(..., 2)`` for
    (target, rest) and ``(..., C)`` for the softmax over the non-target classes.

    Worked from log-sum-exps: ``log(1 - p_t)`` stays finite when every non-target
    probability underflows to zero, where the log of their sum would be ``-inf``.
    """
    log_total = torch.logsumexp(scaled_logits, dim=-1, keepdim=True)
    others = scaled_logits - TARGET_MASK_OFFSET * is_target
    log_others_total = torch.logsumexp(others, dim=-1, keepdim=True)
    target_logit = torch.where(is_target, scaled_logits, 0.0).sum(dim=-1, keepdim=True)
    binary = torch.cat([target_logit, log_others_total], dim=-1) - log_total
    return binary, others - log_others_total
