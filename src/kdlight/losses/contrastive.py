r"""Contrastive representation distillation (CRD; Tian et al., 2020): the embedding heads, the
memory banks of past embeddings, the NCE loss and the sampling of negatives.

One CRD step, as in RepDistiller's CIFAR code (``crd/criterion.py``, ``crd/memory.py``,
``dataset/cifar100.py``):

1. ``contrast_index = sample_contrast_indices(index, labels, 16384)``: each image's own
   index, then 16384 distinct images of other classes;
2. ``student_embedding = Embed(D_s)(f_s)`` and ``teacher_embedding = Embed(D_t)(f_t)``:
   the pooled penultimate features (the teacher's computed without gradient) mapped to 128
   dimensions and L2-normalised; both heads are trained;
3. ``student_scores, teacher_scores = ContrastMemory(128, num_data)(student_embedding,
   teacher_embedding, index, contrast_index)``: each embedding against the other network's
   memory bank, which then takes in this batch's embeddings;
4. ``crd_loss(student_scores, num_data) + crd_loss(teacher_scores, num_data)``, weighted by
   the method (:class:`kdlight.distillers.CRD`); each argument's official value is in its
   docstring.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlight.errors import KDLightError


class Embed(nn.Module):
    """CRD's embedding head: flatten, ``Linear(dim_in, dim_out)``, L2-normalise each row.

    As RepDistiller's ``Embed`` (its ``Normalize`` has power 2), with the norm floored at
    1e-12 (``F.normalize``). The input is not detached: the same head embeds the student;
    the teacher's features must come from its frozen forward pass.

    Args:
        dim_in: the flattened feature size ``D``.
        dim_out: the embedding size (official: 128).
    """

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, ...)`` with ``D`` elements per sample -> ``(B, dim_out)`` unit rows."""
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class ContrastMemory(nn.Module):
    r"""CRD's two memory banks and the scores of a batch against them.

    .. math::
        s^{\mathrm{student}}_{bk} = \frac{\exp(\langle M^t_{j_{bk}}, z^s_b \rangle / \tau)}
        {Z_s}, \qquad
        s^{\mathrm{teacher}}_{bk} = \frac{\exp(\langle M^s_{j_{bk}}, z^t_b \rangle / \tau)}
        {Z_t}

    :math:`z^s, z^t` are the batch's student and teacher embeddings, :math:`M^s, M^t` the
    banks of past student and teacher embeddings (one row per training image), and
    :math:`j_{b0} = ` ``index[b]``, :math:`j_{bk} = ` ``contrast_index[b, k]``. The constants
    :math:`Z` stand in for the partition functions: on the first batch each is set to the
    mean of its unnormalised scores times ``num_data``, then kept fixed (stored in the
    buffers ``normalizer_student`` and ``normalizer_teacher``, -1 until set, so they travel
    with a checkpoint). The bank rows carry no gradient; the embeddings get gradient from
    the scores, so both embedding heads are trained.

    After the scores, each bank takes in the batch without gradient: the rows at ``index``
    become :math:`\mathrm{normalise}(m \, M_{j} + (1 - m) \, z)`, the student bank from
    :math:`z^s` and the teacher bank from :math:`z^t`. The banks start uniform in
    :math:`[-\sigma, \sigma]`, :math:`\sigma = 1/\sqrt{\mathrm{dim}/3}`. As RepDistiller's
    ``ContrastMemory`` (``v1`` the student, ``v2`` the teacher), except that the constants
    are set without reading them back to the host.

    Args:
        dim: the embedding size.
        num_data: the number of training images, one bank row each.
        momentum: :math:`m` (official: 0.5).
        temperature: :math:`\tau` (official: 0.07).
    """

    def __init__(self, dim: int, num_data: int, momentum: float = 0.5, temperature: float = 0.07):
        super().__init__()
        self.num_data, self.momentum, self.temperature = num_data, momentum, temperature
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_student", torch.rand(num_data, dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_data, dim) * 2 * bound - bound)
        self.register_buffer("normalizer_student", torch.full((), -1.0))
        self.register_buffer("normalizer_teacher", torch.full((), -1.0))

    def _scores(
        self, memory: Tensor, embedding: Tensor, contrast_index: Tensor, normalizer: Tensor
    ) -> Tensor:
        """``(B, K+1)``: ``exp(<memory[contrast_index[b, k]], embedding[b]> / T) / Z``, ``Z``
        first set from these scores where it is still -1 (``torch.where``, not an ``if``).

        The same dot products as the official code's, taken with the whole bank, ``(B, N)``
        (25 MB for CIFAR), then gathered: the official code gathers the rows first, a
        ``(B, K+1, dim)`` copy (1 GB at B=128, K=16384) kept for the backward pass, 20 times
        slower per bank on a CPU.
        """
        products = embedding @ memory.T  # the bank is a buffer: it gets no gradient
        scores = torch.exp(products.gather(1, contrast_index) / self.temperature)
        value = torch.where(normalizer < 0, scores.detach().mean() * self.num_data, normalizer)
        normalizer.copy_(value)
        return scores / value

    @torch.no_grad()
    def _update(self, name: str, embedding: Tensor, index: Tensor) -> None:
        """The momentum update of the bank ``name`` at ``index``, into a new tensor: the
        scores' backward pass still needs the bank as it was."""
        memory = getattr(self, name)
        mixed = memory[index] * self.momentum + embedding * (1 - self.momentum)
        setattr(self, name, memory.index_copy(0, index, F.normalize(mixed, dim=1)))

    def forward(
        self,
        student_embedding: Tensor,
        teacher_embedding: Tensor,
        index: Tensor,
        contrast_index: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Scores of the batch, then the momentum update of both banks at ``index``.

        Args:
            student_embedding: ``(B, dim)`` unit rows from the student's :class:`Embed`.
            teacher_embedding: ``(B, dim)`` unit rows from the teacher's :class:`Embed`.
            index: ``(B,)`` the images' indices in the training set.
            contrast_index: ``(B, K+1)`` from :func:`sample_contrast_indices`, column 0
                equal to ``index``.

        Returns:
            ``(student_scores, teacher_scores)``, each ``(B, K+1)``: the student's
            embeddings against the teacher bank and the teacher's against the student bank.
        """
        with torch.autocast(device_type=student_embedding.device.type, enabled=False):
            student = student_embedding.float()
            teacher = teacher_embedding.float()
            student_scores = self._scores(
                self.memory_teacher, student, contrast_index, self.normalizer_student
            )
            teacher_scores = self._scores(
                self.memory_student, teacher, contrast_index, self.normalizer_teacher
            )
            self._update("memory_student", student.detach(), index)
            self._update("memory_teacher", teacher.detach(), index)
        return student_scores, teacher_scores


def crd_loss(scores: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    r"""CRD's NCE loss of one side's scores (RepDistiller's ``ContrastLoss``).

    .. math::
        \mathcal{L} = -\frac{1}{B} \sum_{b=1}^{B} \Big( \log \frac{s_{b0}}{s_{b0} + K P_n +
        \epsilon} + \sum_{k=1}^{K} \log \frac{K P_n}{s_{bk} + K P_n + \epsilon} \Big),
        \qquad P_n = \frac{1}{N}

    The scores ``(B, K+1)`` from :class:`ContrastMemory` are taken as unnormalised
    probabilities of their pairs under the data distribution; column 0 is the positive pair
    (the same image seen by both networks), columns 1..K the negatives, and the noise
    distribution is uniform over the :math:`N` = ``num_data`` training images. Reduction: the
    sum over the batch divided by its size, as official. CRD adds this loss of the student's
    scores and of the teacher's and scales the sum by 0.8 in the official CIFAR setting (no
    weight is applied here). The negatives' terms are computed as
    :math:`-\log(1 + (s_{bk} + \epsilon) / (K P_n))`: the quotient is close to 1, where
    float32 keeps few of the logarithm's digits, and its logarithm as written drifts the sum
    4e-5 from its float64 value (1e-7 this way).

    Args:
        scores: ``(B, K+1)``, positive first.
        num_data: :math:`N`, the number of training images.
        eps: :math:`\epsilon` in the denominators.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"need (B, K+1) scores with K >= 1, got shape {tuple(scores.shape)}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.float()
        batch, negatives = scores.shape[0], scores.shape[1] - 1
        noise = negatives / num_data  # K * P_n
        positive = scores[:, 0]
        log_positive = torch.log(positive / (positive + noise + eps))
        log_negative = -torch.log1p((scores[:, 1:] + eps) / noise)
        return -(log_positive.sum() + log_negative.sum()) / batch


class NegativeSampler(nn.Module):
    """Draws CRD's contrast indices for a training set with the given labels.

    Each anchor of class ``c`` gets ``K`` negatives among the ``N - n_c`` training images of
    the other classes, as the official "exact" mode draws them (RepDistiller and mdistiller
    ``dataset/cifar100.py``, ``CIFAR100InstanceSample``: ``np.random.choice(cls_negative[c],
    K, replace=K > len(cls_negative[c]))``):

    - **without replacement** (the default): ``K`` distinct images of other classes, every
      such ``K``-subset equally likely; only an anchor whose class has fewer than ``K``
      negatives (``N - n_c < K``) gets them with replacement, as the official ``replace``
      rule says. It costs ``B x N`` uniform keys (12.8 MB at ``N`` = 50000, ``B`` = 64;
      1.3 GB for ImageNet's 1.28M images at ``B`` = 256), about 3 times the time of a draw
      with replacement on a CPU.
    - **with replacement** (``replacement=True``, not the official draw): ``K`` independent
      uniform draws from the other classes' images, which repeats 14.8% of a row's
      negatives at ``K`` = 16384 of CIFAR-100's 49500.

    The class order and counts are computed once and kept as buffers (not saved in
    checkpoints), so the sampler moves with ``.to(device)`` like any module; a draw reads
    no value back to the host.

    Args:
        labels: ``(N,)`` class of every training image, in the order of the indices.
        num_negatives: ``K``, negatives per anchor (official: 16384).
        replacement: draw every row with replacement (not the official draw).
    """

    def __init__(self, labels: Tensor, num_negatives: int, replacement: bool = False):
        super().__init__()
        labels = torch.as_tensor(labels).long().flatten()
        if num_negatives < 1:
            raise KDLightError(f"num_negatives must be at least 1, got {num_negatives}")
        counts = torch.bincount(labels)
        if (counts > 0).sum() < 2:
            raise KDLightError("CRD's negatives need a training set of at least two classes")
        self.num_negatives, self.replacement = num_negatives, replacement
        order = torch.argsort(labels, stable=True)
        short = (labels.shape[0] - counts) < num_negatives  # classes with fewer than K others
        present = counts > 0
        # decided here, once, on the host: a draw then needs no value from the device
        self._short_everywhere = bool(short[present].all())
        self._short_somewhere = bool(short[present].any())
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order_twice", torch.cat([order, order]), persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        self.register_buffer("class_end", torch.cumsum(counts, 0), persistent=False)
        self.register_buffer("class_short", short, persistent=False)

    def forward(self, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(B,)`` indices -> ``(B, K+1)`` long tensor on ``index``'s device: column 0 is
        ``index``, columns 1..K images of other classes than each anchor's.

        ``generator`` makes the draw reproducible; its device is where the draw happens.
        """
        anchor = index.to(self.labels.device).long()
        classes = self.labels[anchor]
        if self.replacement or self._short_everywhere:
            contrast = self._with_replacement(anchor, classes, generator)
        else:
            negatives = self._without_replacement(classes, generator)
            if self._short_somewhere:  # those rows as the official code draws them
                drawn = self._with_replacement(anchor, classes, generator)
                short = self.class_short[classes].unsqueeze(1)
                negatives = torch.where(short, drawn[:, 1:], negatives)
            contrast = torch.cat([anchor.unsqueeze(1), negatives], dim=1)
        return contrast.to(index.device)

    def _uniform(self, shape: tuple[int, int], generator: torch.Generator | None) -> Tensor:
        """Uniforms in [0, 1) drawn on ``generator``'s device (the sampler's without one),
        on the sampler's device."""
        device = self.labels.device if generator is None else generator.device
        return torch.rand(shape, generator=generator, device=device).to(self.labels.device)

    def _without_replacement(self, classes: Tensor, generator: torch.Generator | None) -> Tensor:
        """``(B, K)``: for each row, the ``K`` images of other classes with the smallest
        uniform keys, a uniformly random ``K``-subset of them (in no particular order), in
        one vectorised draw for the batch (``topk``)."""
        keys = self._uniform((classes.shape[0], self.labels.shape[0]), generator)
        # 2 is above every uniform in [0, 1): the anchor's own class is never among the K
        keys.masked_fill_(self.labels.unsqueeze(0) == classes.unsqueeze(1), 2.0)
        return keys.topk(self.num_negatives, dim=1, largest=False, sorted=False).indices

    def _with_replacement(
        self, anchor: Tensor, classes: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """``(B, K+1)``: column 0 ``anchor``, then ``K`` independent uniform draws from the
        images of other classes. With the images sorted by class kept twice over, those of
        the other classes are the positions ``end_c, ..., end_c + N - n_c - 1``; a uniform
        offset in ``[0, N - n_c)`` picks one (from float32 uniforms: each image's
        probability within 0.5% of uniform for ``N`` up to 2**16)."""
        others = (self.labels.shape[0] - self.class_count[classes]).unsqueeze(1)  # N - n_c
        shape = (anchor.shape[0], self.num_negatives + 1)  # column 0 is overwritten below
        uniform = self._uniform(shape, generator)
        # float32 rounding can carry u * (N - n_c) up to N - n_c: the clamp keeps it out.
        offset = uniform.mul_(others).long().clamp_(max=others - 1)
        position = offset.add_(self.class_end[classes].unsqueeze(1))
        contrast = self.order_twice.index_select(0, position.flatten()).view(shape)
        contrast[:, 0] = anchor
        return contrast


def sample_contrast_indices(
    index: Tensor,
    labels: Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
    replacement: bool = False,
) -> Tensor:
    """CRD's ``(B, K+1)`` contrast indices of the batch ``index`` (column 0), drawn by a
    one-off :class:`NegativeSampler` of ``labels`` (its arguments and its ``forward``'s);
    build one to sort ``labels`` once for many batches."""
    sampler = NegativeSampler(labels.to(index.device), num_negatives, replacement)
    return sampler(index, generator=generator)
