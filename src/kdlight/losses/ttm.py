"""Transformed teacher matching (Zheng and Yang, ICLR 2024): the student's plain softmax
matched to a power transform of the teacher's, TTM as it is and WTTM weighted per sample."""

import torch
import torch.nn.functional as F
from torch import Tensor


def _transformed_teacher(teacher_logits: Tensor, exponent: float) -> tuple[Tensor, Tensor]:
    r"""The log of the teacher's transformed distribution :math:`p_t^\gamma / U_\gamma(p_t)`
    and the log of its normaliser :math:`U_\gamma(p_t) = \sum_j p_{t,j}^\gamma`, from the
    log-probabilities: no probability is raised to the power, so none that underflows to 0
    is lost (:math:`p^\gamma / U_\gamma = \mathrm{softmax}(\gamma z_t)` exactly)."""
    powered = exponent * F.log_softmax(teacher_logits, dim=-1)
    log_norm = torch.logsumexp(powered, dim=-1)
    return powered - log_norm.unsqueeze(-1), log_norm


def _matching(
    student_logits: Tensor, teacher_logits: Tensor, exponent: float, weighted: bool
) -> Tensor:
    r"""Each sample's KL of the student's softmax from the transformed teacher, times
    :math:`U_\gamma(p_t)` when ``weighted``, averaged over the batch (float32)."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_q = F.log_softmax(student_logits.float(), dim=-1)
        log_p, log_norm = _transformed_teacher(teacher_logits.detach().float(), exponent)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        return (log_norm.exp() * kl if weighted else kl).mean()


def ttm_loss(student_logits: Tensor, teacher_logits: Tensor, exponent: float) -> Tensor:
    r"""Transformed teacher matching: the KL divergence of the student's softmax (no
    temperature) from the teacher's probabilities raised to the power :math:`\gamma` and
    renormalised.

    .. math::
        \mathcal{L}_{TTM} = \frac{1}{N} \sum_{n=1}^{N}
        \mathrm{KL}\Big(\frac{p_{t,n}^{\gamma}}{U_\gamma(p_{t,n})} \,\Big\|\, q_n\Big),
        \qquad U_\gamma(p) = \sum_j p_j^{\gamma}

    with :math:`p_t = \mathrm{softmax}(z_t)`, :math:`q = \mathrm{softmax}(z_s)` and
    :math:`\gamma` = ``exponent``. The transformed teacher is
    :math:`\mathrm{softmax}(\gamma z_t)`: KD's teacher at :math:`T = 1/\gamma`, while the
    student is left at :math:`T = 1` (the paper's point: KD is TTM plus a Rényi-entropy
    term of the student). The KL is summed over the classes and averaged over the batch;
    there is no :math:`T^2` factor, as in the paper and its code (``distiller_zoo/ttm.py``),
    whose loss this equals (tests/test_fidelity_ttm.py). The weight is the method's
    (:class:`kdlight.distillers.TTM`: ``ce_weight * CE + weight * ttm_loss``).

    No logit standardization: the student's logits keep their scale here, and a z-scored
    student (standard deviation 1) could not match a z-scored teacher transformed to
    standard deviation :math:`\gamma`; the standardization paper's code has no TTM.

    Args:
        student_logits: ``(N, C)`` logits.
        teacher_logits: ``(N, C)`` logits; they carry no gradient.
        exponent: :math:`\gamma > 0`, the power of the teacher's probabilities (below 1
            smooths them; the official ``--ttm_l``).

    Returns:
        the 0-dim loss, in float32.
    """
    return _matching(student_logits, teacher_logits, exponent, weighted=False)


def wttm_loss(student_logits: Tensor, teacher_logits: Tensor, exponent: float) -> Tensor:
    r"""Weighted transformed teacher matching: :func:`ttm_loss` with each sample's KL
    weighted by the normaliser of its transformed teacher, :math:`U_\gamma(p_t)`.

    .. math::
        \mathcal{L}_{WTTM} = \frac{1}{N} \sum_{n=1}^{N} U_\gamma(p_{t,n}) \,
        \mathrm{KL}\Big(\frac{p_{t,n}^{\gamma}}{U_\gamma(p_{t,n})} \,\Big\|\, q_n\Big)

    (notation of :func:`ttm_loss`). For :math:`\gamma < 1`, :math:`U_\gamma(p_t)` runs from
    1 (a one-hot teacher) to :math:`C^{1 - \gamma}` (a uniform one): samples on which the
    teacher is unsure weigh more. The weight is a constant of the teacher (no gradient).
    Equal to the paper's code (``distiller_zoo/wttm.py``, ``mean(norm * KL)``; no
    :math:`T^2` factor). The method's weight scales it (:class:`kdlight.distillers.WTTM`).

    Args:
        student_logits: ``(N, C)`` logits.
        teacher_logits: ``(N, C)`` logits; they carry no gradient.
        exponent: :math:`\gamma > 0`, the power of the teacher's probabilities.

    Returns:
        the 0-dim loss, in float32.
    """
    return _matching(student_logits, teacher_logits, exponent, weighted=True)
