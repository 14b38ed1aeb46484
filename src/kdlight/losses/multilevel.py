"""MLKD (Jin et al., CVPR 2023, "Multi-Level Logit Distillation"): the student's
probabilities matched to the teacher's at several temperatures, per sample (instance),
across the batch (batch correlation) and across the classes (class correlation), on a
weakly and a strongly augmented view of each image."""

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlight.losses.kd import _kl_batchmean

#: The official code's temperatures: its configured ``KD.TEMPERATURE`` (4), then 3, 5, 2 and
#: 6 written in (MLKD ``mdistiller/distillers/KD_ours.py:115-140``), in its order.
TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)
#: Those at which the official strong-view KD term reads the strong view (``:142-153``); at
#: 2 and 6 it reads the weak view's logits (``:154-162``).
STRONG_TEMPERATURES = (4.0, 3.0, 5.0)


def instance_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r""":math:`T^2 \, \frac{1}{N} \sum_i \mathrm{KL}(p^t_i \,\|\, p^s_i)`, with
    :math:`p = \mathrm{softmax}(z / T)` over the classes."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return temperature**2 * _kl_batchmean(log_t, log_s)


def class_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r""":math:`\frac{1}{C} \lVert P^{t\top} P^t - P^{s\top} P^s \rVert_F^2`, with :math:`P` the
    ``(N, C)`` probabilities at :math:`T`: the classes' ``(C, C)`` Gram matrices."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / p_s.shape[1]


def batch_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r""":math:`\frac{1}{N} \lVert P^t P^{t\top} - P^s P^{s\top} \rVert_F^2`, with :math:`P` the
    ``(N, C)`` probabilities at :math:`T`: the samples' ``(N, N)`` Gram matrices."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / p_s.shape[0]


def share_at_most_median(values: Tensor) -> Tensor:
    """The fraction of ``values`` at most their median (numpy's ``percentile(50)``: the mean
    of the two middle values of an even count), compared in ``values``' precision as the
    official ``confidence.le(np.percentile(...))`` compares them."""
    median = torch.quantile(values.double(), 0.5).to(values.dtype)
    return (values <= median).float().mean()


def mlkd_loss(
    student_weak: Tensor,
    teacher_weak: Tensor,
    student_strong: Tensor,
    teacher_strong: Tensor,
    temperatures: tuple[float, ...] = TEMPERATURES,
    strong_temperatures: tuple[float, ...] = STRONG_TEMPERATURES,
) -> dict[str, Tensor]:
    r"""MLKD's distillation terms, as its official CIFAR code computes them.

    With :math:`w` the weak view and :math:`s` the strong view of the batch, :math:`z` the
    logits, :math:`\mathcal{T}` = ``temperatures``, :math:`\mathcal{T}_s` =
    ``strong_temperatures``, :math:`\mathrm{KD}_T` :func:`instance_kd`, :math:`\mathrm{CC}_T`
    :func:`class_correlation` and :math:`\mathrm{BC}_T` :func:`batch_correlation`,

    .. math::
        \mathcal{L}_{kd} = m \sum_{T \in \mathcal{T}} \mathrm{KD}_T(z^w_s, z^w_t)
            + \sum_{T \in \mathcal{T}_s} \mathrm{KD}_T(z^s_s, z^s_t)
            + \sum_{T \in \mathcal{T} \setminus \mathcal{T}_s} \mathrm{KD}_T(z^w_s, z^w_t)

        \mathcal{L}_{cc} = m_c \sum_{T \in \mathcal{T}} \mathrm{CC}_T(z^w_s, z^w_t), \qquad
        \mathcal{L}_{bc} = m \sum_{T \in \mathcal{T}} \mathrm{BC}_T(z^w_s, z^w_t), \qquad
        \mathcal{L} = \mathcal{L}_{kd} + \mathcal{L}_{cc} + \mathcal{L}_{bc}

    where :math:`m` is the fraction of the batch's samples whose teacher confidence on the
    weak view (:math:`\max_c p^t_{ic}`, at :math:`T = 1`) is at most the batch's median, and
    :math:`m_c` the fraction of the classes whose summed teacher probability over the batch
    is at most the median of the classes' (:func:`share_at_most_median`); neither carries a
    gradient. Only the KD terms have :math:`T^2`.

    What the official code (MLKD ``mdistiller/distillers/KD_ours.py``, ``forward_train``)
    does and the paper does not say, reproduced here:

    - the confidence masks scale terms that are already averaged: the per-sample
      ``reduce=False`` calls are commented out, so ``(kd_loss(...) * mask).mean()`` is the
      batch's mean loss times the fraction :math:`m` of masked samples (about one half),
      not a mean over the low-confidence samples; the same for the class mask of the class
      correlation and for the batch correlation (``:98-111``, ``:115-140``, ``:164-185``,
      ``:207-227``);
    - the strong view's KD terms at 2 and 6 read the weak view's logits (``:154-162``):
      ``strong_temperatures`` says at which temperatures the strong view is read (all of
      ``temperatures`` for the paper's form);
    - the class and batch correlations of the strong view are computed but not returned
      (``loss_cc`` and ``loss_bc`` are the weak view's alone, ``:249-254``), so they are
      left out here; the strong view's KD terms are not masked.

    The method (:class:`kdlight.distillers.MLKD`) weights the total by the official
    ``KD.LOSS.KD_WEIGHT`` and adds the cross-entropy of both views.

    Args:
        student_weak, teacher_weak: ``(N, C)`` logits on the weak view (the teacher's carry
            no gradient; they also make the masks).
        student_strong, teacher_strong: ``(N, C)`` logits on the strong view.
        temperatures: the temperatures of every term.
        strong_temperatures: those of ``temperatures`` at which the strong view's KD term
            reads the strong view.

    Returns:
        ``{"loss": kd + cc + bc, "kd", "cc", "bc"}`` (:math:`\mathcal{L}_{kd}`,
        :math:`\mathcal{L}_{cc}`, :math:`\mathcal{L}_{bc}`), 0-dim float32 tensors.
    """
    with torch.autocast(device_type=student_weak.device.type, enabled=False):
        s_w, t_w = student_weak.float(), teacher_weak.float().detach()
        s_s, t_s = student_strong.float(), teacher_strong.float().detach()
        probabilities = F.softmax(t_w, dim=1)
        sample_share = share_at_most_median(probabilities.max(dim=1).values)
        class_share = share_at_most_median(probabilities.sum(dim=0))
        strong = set(strong_temperatures)
        kd = sample_share * sum(instance_kd(s_w, t_w, t) for t in temperatures)
        kd = kd + sum(
            instance_kd(s_s, t_s, t) if t in strong else instance_kd(s_w, t_w, t)
            for t in temperatures
        )
        cc = class_share * sum(class_correlation(s_w, t_w, t) for t in temperatures)
        bc = sample_share * sum(batch_correlation(s_w, t_w, t) for t in temperatures)
    return {"loss": kd + cc + bc, "kd": kd, "cc": cc, "bc": bc}
