"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): the
student's probabilities matched to the teacher's by Pearson correlation, within each sample
and within each class, instead of by a KL divergence."""

import torch
from torch import Tensor

from kdlight.losses.kd import _soft_logits

#: Added to the product of the two norms in the correlation's denominator, as in the
#: official code (``cosine_similarity(..., eps=1e-8)``): a row or column of equal
#: probabilities has norm 0 after centring.
CORRELATION_EPS = 1e-8


def pearson_correlation(a: Tensor, b: Tensor, eps: float = CORRELATION_EPS) -> Tensor:
    r"""Pearson's correlation of the rows of ``a`` and ``b``, ``(N, C)`` each, along the
    last dimension: a ``(N,)`` tensor.

    .. math::
        \rho(a, b) = \frac{\langle a - \bar a, \, b - \bar b \rangle}
        {\lVert a - \bar a \rVert \, \lVert b - \bar b \rVert + \epsilon}
    """
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    standardize: bool = False,
) -> dict[str, Tensor]:
    r"""DIST's loss and its two parts.

    With :math:`P^s = \mathrm{softmax}(z_s / T)` and :math:`P^t = \mathrm{softmax}(z_t / T)`
    the ``(N, C)`` probabilities of a batch (softmax over the classes) and :math:`\rho` the
    Pearson correlation (:func:`pearson_correlation`),

    .. math::
        \mathcal{L}_{inter} = T^2 \Big(1 - \frac{1}{N} \sum_{i=1}^{N}
        \rho(P^s_{i,:}, P^t_{i,:})\Big), \qquad
        \mathcal{L}_{intra} = T^2 \Big(1 - \frac{1}{C} \sum_{c=1}^{C}
        \rho(P^s_{:,c}, P^t_{:,c})\Big), \qquad
        \mathcal{L} = \beta \, \mathcal{L}_{inter} + \gamma \, \mathcal{L}_{intra}

    The inter-class term correlates the classes' probabilities within each sample (the
    teacher's ranking of the classes, not their values), the intra-class term each class's
    probabilities across the batch (which samples the teacher finds more of that class).
    ``beta`` weights the inter-class term and ``gamma`` the intra-class one. Both are
    averaged (over the samples, over the classes) and multiplied by :math:`T^2`, as in the
    paper and its official code; the correlation's denominator has
    :math:`\epsilon = 10^{-8}` added, as the official code has (the paper writes none). The
    intra-class term depends on the whole batch: it is not a mean of per-sample losses.

    This is the distillation term only: the DIST method (:class:`kdlight.distillers.DIST`)
    adds the cross-entropy and the weight of its official CIFAR code. Equal to the official
    ``DIST`` loss (hunto/image_classification_sota ``lib/models/losses/dist_kd.py``) on
    resnet56_resnet20 and vgg13_vgg8 (tests/test_fidelity_recent_logit.py).

    With ``standardize=True`` both logits are z-scored over the classes before the division
    by :math:`T` (logit standardization, Sun et al., CVPR 2024; see :func:`kd_loss`).

    Args:
        student_logits: ``(N, C)`` logits.
        teacher_logits: ``(N, C)`` logits; they carry no gradient.
        temperature: :math:`T > 0`, shared by both terms.
        beta: weight of the inter-class (within each sample) term.
        gamma: weight of the intra-class (within each class) term.
        standardize: z-score both logits along the classes first.

    Returns:
        ``{"loss": beta * inter + gamma * intra, "inter": T^2 * (1 - mean row correlation),
        "intra": T^2 * (1 - mean column correlation)}``, the parts before their weights.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student, teacher, scale = _soft_logits(
            student_logits.float(), teacher_logits.detach().float(), temperature, standardize
        )
        p_student, p_teacher = student.softmax(dim=-1), teacher.softmax(dim=-1)
        inter = (1.0 - pearson_correlation(p_student, p_teacher).mean()) * scale
        intra = (1.0 - pearson_correlation(p_student.T, p_teacher.T).mean()) * scale
        return {"loss": beta * inter + gamma * intra, "inter": inter, "intra": intra}
