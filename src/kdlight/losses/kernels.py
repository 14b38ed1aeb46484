"""Stage-map losses that compare kernels of the maps rather than the maps: neuron selectivity
transfer (Huang and Wang, 2017), a polynomial-kernel MMD between the channels' spatial
patterns, and KDSVD (Lee et al., 2018), Gaussian kernels between the leading singular
vectors of consecutive stages.

Both read ``(B, C, H, W)`` maps, one per stage, of the student and the teacher.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlight.losses.attention import _sum_over_stages

#: KDSVD: the student offers this many more leading singular vectors than the teacher's
#: ``k``, the one most aligned with each teacher vector is kept (the official ``k + 3``)
EXTRA_CANDIDATES = 3
#: KDSVD: the Gaussian kernel's ``2 sigma^2`` (the official ``/ 8``)
RBF_SCALE = 8.0


def _finite(x: Tensor) -> Tensor:
    """``x`` with every non-finite entry set to 0 (the official code's ``removenan``)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _channel_patterns(features: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, h*w)``: the map average-pooled to ``size`` where it is
    larger, each channel's flattened map L2-normalised."""
    if features.shape[-2:] != size:
        features = F.adaptive_avg_pool2d(features, size)
    return F.normalize(features.flatten(2), dim=2)


def _mean_squared_gram(a: Tensor, b: Tensor) -> Tensor:
    """The mean over batch and channel pairs of the polynomial kernel ``(a_i . b_j)^2``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    r"""Neuron selectivity transfer (Huang and Wang, 2017): the squared maximum mean
    discrepancy between the channels of student and teacher, summed over stages.

    .. math::
        \mathcal{L} = \sum_l \frac{1}{B} \sum_{b=1}^{B} \Big[
        \frac{1}{C_t^2} \sum_{i,j} k(t_i, t_j) + \frac{1}{C_s^2} \sum_{i,j} k(s_i, s_j)
        - \frac{2}{C_s C_t} \sum_{i,j} k(s_i, t_j) \Big], \qquad k(x, y) = (x^\top y)^2

    where :math:`s_i` (:math:`t_j`) is channel :math:`i` (:math:`j`) of sample :math:`b`'s
    stage-:math:`l` map, flattened over its positions and L2-normalised: each channel is one
    sample of the distribution of spatial patterns, and :math:`k` the paper's polynomial
    kernel with :math:`d = 2, c = 0`. For each stage the larger map is first average-pooled
    to the smaller one's height and width (the official code pools to ``(H, H)``, the same
    on square maps), so channels and sizes may differ. The teacher's term carries no
    gradient; it keeps the loss an MMD (>= 0), as the official code's ``full_loss``. Each
    sum is a mean, over batch and channel pairs, as the official ``.mean()``; the stages
    are summed.

    The paper writes the term as :math:`\frac{\lambda}{2} \mathrm{MMD}^2`; the official
    CIFAR code (RepDistiller ``distiller_zoo/NST.py``, mdistiller ``distillers/NST.py``)
    and kdlight weight :math:`\mathcal{L}` itself, by 50.

    Args:
        student_features: one ``(B, C_s, H_s, W_s)`` map per stage.
        teacher_features: one ``(B, C_t, H_t, W_t)`` map per stage, same batch size.
    """

    def stage_loss(student: Tensor, teacher: Tensor) -> Tensor:
        size = tuple(map(min, student.shape[-2:], teacher.shape[-2:]))  # height, width
        s, t = _channel_patterns(student, size), _channel_patterns(teacher, size)
        return _mean_squared_gram(t, t) + _mean_squared_gram(s, s) - 2 * _mean_squared_gram(s, t)

    return _sum_over_stages(student_features, teacher_features, stage_loss)


class _SingularVectors(torch.autograd.Function):
    r"""The reduced SVD's singular values ``(B, k)`` and right singular vectors ``(B, n, k)``
    of ``(B, m, n)`` matrices, ``k = min(m, n)``, with the gradient of autograd's SVD
    (:math:`\bar A = U [\mathrm{diag}(\bar s) + S (F \circ (V^\top \bar V - \bar V^\top V))]
    V^\top + U S^{-1} \bar V^\top (I - V V^\top)`, :math:`F_{ij} = 1 / (s_j^2 - s_i^2)`)
    except where it divides by 0: a term of two equal singular values (:math:`F_{ij}`) or
    of a zero one (:math:`S^{-1}`) counts 0, as the paper's TensorFlow code's gradient,
    instead of a NaN that would spread over the whole gradient. Equal values are usual in
    a map of fewer independent channels than it has (a 1x1 connector that widens one)."""

    @staticmethod
    def forward(ctx, matrix: Tensor) -> tuple[Tensor, Tensor]:
        left, values, right_h = torch.linalg.svd(matrix, full_matrices=False)
        ctx.save_for_backward(left, values, right_h)
        return values, right_h.mT

    @staticmethod
    def backward(ctx, grad_values: Tensor | None, grad_vectors: Tensor | None) -> Tensor:
        left, values, right_h = ctx.saved_tensors
        core = values.new_zeros(*values.shape, values.shape[-1])
        if grad_vectors is not None:
            projected = right_h @ grad_vectors
            squares = values * values
            gaps = squares.unsqueeze(-2) - squares.unsqueeze(-1)
            inverse = torch.where(gaps == 0, 0.0, gaps.reciprocal())
            core = core + values.unsqueeze(-1) * (projected - projected.mT) * inverse
        if grad_values is not None:
            core = core + torch.diag_embed(grad_values)
        grad = core @ right_h
        if grad_vectors is not None and right_h.shape[-1] > right_h.shape[-2]:  # n > k
            inverse = torch.where(values == 0, 0.0, values.reciprocal())
            scaled = (grad_vectors * inverse.unsqueeze(-2)).mT  # S^-1 V-bar^T
            grad = grad + scaled - (scaled @ right_h.mT) @ right_h
        return left @ grad


def _leading_singular(features: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` leading right singular vectors ``(B, C, count)`` of each sample's
    ``(H*W, C)`` matrix (positions by channels), each L2-normalised, and its ``count``
    largest singular values ``(B, count)``, L2-normalised together."""
    matrix = features.flatten(2).transpose(1, 2)
    values, vectors = _SingularVectors.apply(matrix)
    vectors = _finite(vectors)
    values = _finite(values)
    return F.normalize(vectors[:, :, :count], dim=1), F.normalize(values[:, :count], dim=1)


def _align(student: Tensor, teacher: Tensor) -> Tensor:
    """For each teacher vector, the student vector of largest absolute cosine with it,
    turned to the teacher's side: ``(B, C, K)`` and ``(B, C, k)`` -> ``(B, C, k)``. The
    choice is a mask, so no gradient flows through it."""
    cosine = student.transpose(1, 2) @ teacher
    absolute = cosine.abs()
    largest = absolute.amax(dim=1, keepdim=True)
    mask = torch.where(absolute == largest, torch.sign(cosine), torch.zeros_like(cosine))
    return student @ mask


def _rbf(deeper: Tensor, shallower: Tensor) -> Tensor:
    """``(B, C_l, k)`` and ``(B, C_{l-1}, k)`` -> ``(B, C_l, C_{l-1}, k)``: the Gaussian
    kernel of every pair of entries, one singular vector at a time."""
    return torch.exp(-(deeper.unsqueeze(2) - shallower.unsqueeze(1)).pow(2) / RBF_SCALE)


def kdsvd_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    singular_vectors: int = 1,
) -> Tensor:
    r"""Self-supervised KD with singular value decomposition (Lee et al., ECCV 2018): the
    relations between the leading singular vectors of consecutive stages.

    .. math::
        \mathcal{L} = \frac{1}{B} \sum_{l=2}^{L} \sum_{b, i, j, m}
        \Big( e^{-(\hat v^{l}_{s,bim} - \hat v^{l-1}_{s,bjm})^2 / 8}
            - e^{-(\hat v^{l}_{t,bim} - \hat v^{l-1}_{t,bjm})^2 / 8} \Big)^2

    For each stage :math:`l` and sample :math:`b`, the map is read as a ``(H*W, C)`` matrix
    (positions by channels) and decomposed: :math:`v_t`, the teacher's ``k`` leading right
    singular vectors (over the channels), :math:`\sigma_t` its ``k`` largest singular values
    L2-normalised together; of the student's ``k + 3`` leading vectors, each teacher vector
    keeps the one of largest :math:`|\cos|` with it, signed to agree with it. Both are
    scaled by the teacher's values, :math:`\hat v_{\cdot,bim} = v_{\cdot,bim} \sigma_{t,bm}`
    (for ``k = 1`` :math:`\sigma_t = 1`). The Gaussian kernel then relates every channel
    entry :math:`i` of stage :math:`l` with every entry :math:`j` of stage :math:`l - 1`, one
    vector :math:`m` at a time; the squared differences of student and teacher kernels are
    summed (a non-finite one counts 0, as in the official code) and divided by the batch
    size. So student and teacher need as many channels at each stage, and at least two
    stages; sizes may differ (nothing is pooled). The teacher carries no gradient; the
    student's flows through its singular vectors.

    As RepDistiller's ``distiller_zoo/KDSVD.py`` (a port of the paper's TensorFlow code,
    which also reads the map as ``(H*W, C)``); mdistiller's ``distillers/KDSVD.py``
    decomposes ``(C*H, W)`` matrices instead. The gradient is autograd's SVD gradient, as
    in both official PyTorch codes, but where that divides by 0 (two equal singular values,
    or a zero one) and would be NaN everywhere: there its terms count 0, as the paper's
    TensorFlow code's gradient does. The sign of each teacher vector is the one the SVD
    routine returns (float32 and float64, or CPU and GPU, may differ; the loss depends on
    it). The method's weight: 1 in the official CIFAR setting.

    Args:
        student_features: one ``(B, C_l, H_s, W_s)`` map per stage, at least two stages.
        teacher_features: one ``(B, C_l, H_t, W_t)`` map per stage, the same channels.
        singular_vectors: ``k``, the teacher's leading singular vectors compared (1).
    """
    if len(student_features) < 2 or len(student_features) != len(teacher_features):
        raise ValueError(
            f"KDSVD relates consecutive stages: need as many teacher as student maps, at least "
            f"2, got {len(student_features)} student and {len(teacher_features)} teacher maps"
        )
    for stage, (student, teacher) in enumerate(
        zip(student_features, teacher_features, strict=True)
    ):
        if student.shape[:2] != teacher.shape[:2]:
            raise ValueError(
                f"stage {stage}: KDSVD needs the same batch size and channels, got "
                f"{tuple(student.shape[:2])} student and {tuple(teacher.shape[:2])} teacher"
            )
    with torch.autocast(device_type=student_features[0].device.type, enabled=False):
        total, previous = student_features[0].new_zeros((), dtype=torch.float32), None
        for student, teacher in zip(student_features, teacher_features, strict=True):
            v_t, sigma_t = _leading_singular(teacher.detach().float(), singular_vectors)
            v_s, _ = _leading_singular(student.float(), singular_vectors + EXTRA_CANDIDATES)
            v_s = _align(v_s, v_t)
            scale = sigma_t.unsqueeze(1)
            current = v_s * scale, v_t * scale
            if previous is not None:
                difference = _rbf(current[0], previous[0]) - _rbf(current[1], previous[1])
                total = total + _finite(difference.pow(2)).sum()
            previous = current
        return total / student_features[0].shape[0]
