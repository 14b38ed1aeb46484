"""Feature-map distillation losses over a list of stage outputs: attention transfer
(Zagoruyko and Komodakis, 2017) and similarity-preserving KD (Tung and Mori, 2019).

Both compare ``(B, C, H, W)`` maps of student and teacher stage by stage; the two networks
may have different channel counts at every stage.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _sum_over_stages(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    stage_loss: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """``stage_loss`` of the student's and teacher's maps, paired stage by stage (the
    teacher's detached), summed over the stages; in float32, also under mixed precision."""
    if len(student_features) == 0 or len(student_features) != len(teacher_features):
        raise ValueError(
            f"need one teacher map per student map, got {len(student_features)} student and "
            f"{len(teacher_features)} teacher stages"
        )
    pairs = list(zip(student_features, teacher_features, strict=True))
    for stage, (student, teacher) in enumerate(pairs):
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"stage {stage}: batch sizes differ ({student.shape[0]} student, "
                f"{teacher.shape[0]} teacher)"
            )
    with torch.autocast(device_type=student_features[0].device.type, enabled=False):
        losses = [
            stage_loss(student.float(), teacher.detach().float()) for student, teacher in pairs
        ]
        return torch.stack(losses).sum()


def _attention_map(features: Tensor, p: float, size: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, h*w)``: the map average-pooled to ``size = (h, w)`` where it is
    larger, then the channel mean of ``|f|^p``, L2-normalised per sample."""
    if features.shape[-2:] != size:
        features = F.adaptive_avg_pool2d(features, size)
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(
    student_features: Sequence[Tensor], teacher_features: Sequence[Tensor], p: float = 2
) -> Tensor:
    r"""Attention-transfer loss (Zagoruyko and Komodakis, 2017), summed over stages.

    .. math::
        Q(f) = \frac{\operatorname{vec}(A)}{\|\operatorname{vec}(A)\|_2}, \quad
        A_{hw} = \frac{1}{C} \sum_{c=1}^{C} |f_{chw}|^p, \qquad
        \mathcal{L} = \sum_{l} \frac{1}{B \, H_l W_l} \sum_{b=1}^{B}
        \big\| Q(f^l_{s,b}) - Q(f^l_{t,b}) \big\|_2^2

    For each stage ``l`` the larger of the two maps is first average-pooled
    (``adaptive_avg_pool2d``) to the smaller one's ``H_l x W_l`` (height and width each to
    the smaller of the two; the official code, RepDistiller's and mdistiller's ``AT.py``,
    pools to ``(H, H)``, the same on square maps), then each map's attention :math:`Q` is
    taken: the channel mean of :math:`|f|^p`, flattened and L2-normalised per sample. The
    official code takes :math:`f^p` without the absolute value: the same for its ``p = 2``
    (any even ``p``). The squared difference is averaged over batch and positions (the
    official code's ``(at(f_s) - at(f_t)).pow(2).mean()``) and the stages are summed. The
    method's weight: 1000 in the official CIFAR setting.

    Args:
        student_features: one ``(B, C_s, H_s, W_s)`` map per stage.
        teacher_features: one ``(B, C_t, H_t, W_t)`` map per stage, same batch size.
        p: the exponent of :math:`|f|^p`; the paper's and official code's default is 2.
    """

    def stage_loss(student: Tensor, teacher: Tensor) -> Tensor:
        size = tuple(map(min, student.shape[-2:], teacher.shape[-2:]))  # height, width
        difference = _attention_map(student, p, size) - _attention_map(teacher, p, size)
        return difference.pow(2).mean()

    return _sum_over_stages(student_features, teacher_features, stage_loss)


def _similarity(features: Tensor) -> Tensor:
    """``(B, ...)`` -> ``(B, B)``: the batch's Gram matrix, each row L2-normalised."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


def sp_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    r"""Similarity-preserving loss (Tung and Mori, 2019), summed over stages.

    .. math::
        G = \mathrm{rownorm}\big(F F^\top\big), \quad F = f.\mathrm{view}(B, -1), \qquad
        \mathcal{L} = \sum_{l} \frac{1}{B^2} \big\| G^l_s - G^l_t \big\|_F^2

    :math:`G` is the ``(B, B)`` matrix of similarities between the samples of the batch at
    one stage, each row divided by its L2 norm. Only the batch sizes must match: channels
    and spatial sizes of student and teacher may differ. The squared Frobenius norm is
    divided by :math:`B^2` and the stages are summed. The method's weight: 3000 in the
    official CIFAR setting.

    Args:
        student_features: one ``(B, ...)`` map per stage.
        teacher_features: one ``(B, ...)`` map per stage, same batch size.
    """

    def stage_loss(student: Tensor, teacher: Tensor) -> Tensor:
        difference = _similarity(student) - _similarity(teacher)
        return difference.pow(2).sum() / student.shape[0] ** 2

    return _sum_over_stages(student_features, teacher_features, stage_loss)
