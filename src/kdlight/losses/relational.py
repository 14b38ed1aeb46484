"""Relational distillation losses on pooled embeddings ``(B, D)``: probabilistic knowledge
transfer (Passalis and Tefas, 2018), relational KD (Park et al., 2019) and correlation
congruence (Peng et al., 2019).

PKT and RKD compare how the samples of a batch relate to one another, so student and
teacher may have different embedding sizes; only the batch sizes must match. CC compares
embeddings of one size, which its trainable linear connectors make of the pooled features.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

#: Floor of the squared pairwise distances, as in the official RKD code (keeps sqrt finite).
_SQUARED_DISTANCE_FLOOR = 1e-12


def _embedding_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, ...)`` inputs as float32 ``(B, D)`` rows, the teacher's detached."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"batch sizes differ ({student.shape[0]} student, {teacher.shape[0]} teacher)"
        )
    return student.float().flatten(1), teacher.detach().float().flatten(1)


def _cosine_probabilities(embeddings: Tensor, eps: float) -> Tensor:
    """``(B, D)`` -> ``(B, B)``: cosine similarities mapped to [0, 1], rows summing to 1."""
    unit = embeddings / (embeddings.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student_embeddings: Tensor, teacher_embeddings: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Probabilistic knowledge-transfer loss (Passalis and Tefas, 2018).

    .. math::
        K(a, b) = \frac{1}{2} \Big( \frac{a^\top b}{\|a\|_2 \|b\|_2} + 1 \Big), \quad
        p_{ij} = \frac{K(t_i, t_j)}{\sum_k K(t_i, t_k)}, \quad
        q_{ij} = \frac{K(s_i, s_j)}{\sum_k K(s_i, s_k)},

    .. math::
        \mathcal{L} = \frac{1}{B^2} \sum_{i=1}^{B} \sum_{j=1}^{B}
        p_{ij} \log \frac{p_{ij} + \epsilon}{q_{ij} + \epsilon}

    Each row of the cosine-similarity matrix, shifted to :math:`[0, 1]`, is a distribution
    over the batch (the diagonal :math:`j = i` included); the loss is the KL divergence of
    the student's rows from the teacher's. Norms are taken as :math:`\|a\|_2 + \epsilon`.
    Reduction: the mean over all :math:`B^2` entries (the official code's ``torch.mean``),
    that is the batch mean of each row's KL divergence divided by :math:`B`. The method's
    weight, 30000 in the official CIFAR setting, was tuned for this reduction.

    Args:
        student_embeddings: ``(B, D_s)`` pooled features (other shapes are flattened).
        teacher_embeddings: ``(B, D_t)`` pooled features, same batch size.
        eps: :math:`\epsilon`, added to the norms and inside the logarithm.
    """
    with torch.autocast(device_type=student_embeddings.device.type, enabled=False):
        student, teacher = _embedding_pair(student_embeddings, teacher_embeddings)
        q = _cosine_probabilities(student, eps)
        p = _cosine_probabilities(teacher, eps)
        return (p * torch.log((p + eps) / (q + eps))).mean()


def _relations(embeddings: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, D)`` -> mean-normalised distances ``(B, B)`` and angle cosines ``(B, B, B)``."""
    batch = embeddings.shape[0]
    differences = embeddings.unsqueeze(0) - embeddings.unsqueeze(1)  # [j, i] = e_i - e_j
    distances = differences.pow(2).sum(dim=2).clamp(min=_SQUARED_DISTANCE_FLOOR).sqrt()
    distances = distances.masked_fill(
        torch.eye(batch, dtype=torch.bool, device=embeddings.device), 0.0
    )
    # The mean of the positive entries: the clamp leaves every off-diagonal entry positive.
    distances = distances / (distances.sum() / (batch * (batch - 1)))
    unit = F.normalize(differences, dim=2)
    cosines = unit @ unit.transpose(1, 2)  # [j, i, k] = cos of the angle (e_i, e_j, e_k) at e_j
    return distances, cosines


def rkd_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> dict[str, Tensor]:
    r"""Relational knowledge-distillation loss (Park et al., 2019) and its two parts.

    .. math::
        \psi_D(e_i, e_j) = \frac{\|e_i - e_j\|_2}{\mu}, \quad
        \mu = \frac{1}{B (B - 1)} \sum_{i \ne j} \|e_i - e_j\|_2, \qquad
        \psi_A(e_i, e_j, e_k) = \Big\langle \frac{e_i - e_j}{\|e_i - e_j\|_2},
        \frac{e_k - e_j}{\|e_k - e_j\|_2} \Big\rangle

    .. math::
        \mathcal{L} = w_D \, \frac{1}{B^2} \sum_{i, j} \ell_\delta\big(\psi_D(s_i, s_j),
        \psi_D(t_i, t_j)\big) + w_A \, \frac{1}{B^3} \sum_{i, j, k}
        \ell_\delta\big(\psi_A(s_i, s_j, s_k), \psi_A(t_i, t_j, t_k)\big)

    :math:`\ell_\delta` is the smooth L1 (Huber) loss with :math:`\delta = 1`. Each side's
    pairwise Euclidean distances (squared distances floored at 1e-12 before the square
    root, the diagonal set to 0) are divided by their mean over the :math:`i \ne j` pairs,
    so the distance term is unchanged when one side's embeddings are scaled; the angle term
    is scale-free by construction. Reduction: the mean over all :math:`B^2` pairs and
    :math:`B^3` triples, the degenerate ones included (their zero distance or zero cosine
    is the same on both sides), as in the official code. ``distance_weight`` :math:`w_D`
    scales the distance term and ``angle_weight`` :math:`w_A` the angle term; the method
    adds ``loss`` with weight 1 in the official CIFAR setting. The teacher's relations are
    computed under ``no_grad``.

    Args:
        student_embeddings: ``(B, D_s)`` pooled features (other shapes are flattened).
        teacher_embeddings: ``(B, D_t)`` pooled features, same batch size.
        distance_weight: :math:`w_D`, the weight of the distance term.
        angle_weight: :math:`w_A`, the weight of the angle term.

    Returns:
        ``{"loss": w_D * distance + w_A * angle, "distance": distance term (before w_D),
        "angle": angle term (before w_A)}``.
    """
    with torch.autocast(device_type=student_embeddings.device.type, enabled=False):
        student, teacher = _embedding_pair(student_embeddings, teacher_embeddings)
        with torch.no_grad():
            teacher_distances, teacher_cosines = _relations(teacher)
        student_distances, student_cosines = _relations(student)
        distance = F.smooth_l1_loss(student_distances, teacher_distances)
        angle = F.smooth_l1_loss(student_cosines, teacher_cosines)
        return {
            "loss": distance_weight * distance + angle_weight * angle,
            "distance": distance,
            "angle": angle,
        }


def cc_loss(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    r"""Correlation-congruence loss (Peng et al., ICCV 2019) as the official CIFAR code
    computes it (RepDistiller ``distiller_zoo/CC.py``, code its authors gave RepDistiller).

    .. math::
        \delta_{ik} = |s_{ik} - t_{ik}|, \qquad
        \mathcal{L} = \frac{1}{B - 1} \sum_{i=1}^{B-1} \sum_{k=1}^{D}
        \delta_{ik} \, \delta_{i+1,k}

    :math:`s_i, t_i` are the student's and the teacher's embeddings of the batch's sample
    :math:`i` (of the same size :math:`D`, made by the method's linear connectors): the
    absolute differences of each sample are multiplied with those of the next sample in
    batch order, summed over the :math:`D` dimensions, and averaged over the :math:`B - 1`
    consecutive pairs (the official ``mean``). A batch of one sample has no pair: the loss is
    0 there (the official ``mean`` of nothing is NaN).

    This is not the paper's formula, which matches the :math:`B \times B` matrices of a
    Gaussian kernel between the samples (approximated by a Taylor series of order
    :math:`P`); there is no kernel width :math:`\gamma` nor order :math:`P` here. kdlight
    follows the official code, with which the published CIFAR-100 numbers were run. No
    weight is applied: the method scales ``loss`` by its weight (official CIFAR: 0.02).

    Unlike kdlight's other losses, the teacher's embeddings are not detached: they are the
    output of the teacher-side connector, which this loss trains (as the official code does;
    the teacher network's own features come from its frozen forward pass).

    Args:
        student_embeddings: ``(B, D)`` (other shapes are flattened).
        teacher_embeddings: ``(B, D)``, same shape.
    """
    if student_embeddings.shape != teacher_embeddings.shape:
        raise ValueError(
            f"embedding shapes differ ({tuple(student_embeddings.shape)} student, "
            f"{tuple(teacher_embeddings.shape)} teacher)"
        )
    with torch.autocast(device_type=student_embeddings.device.type, enabled=False):
        delta = (student_embeddings.float() - teacher_embeddings.float()).flatten(1).abs()
        pairs = (delta[:-1] * delta[1:]).sum(dim=1)
        return pairs.sum() / max(len(pairs), 1)
