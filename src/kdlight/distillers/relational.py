"""Methods that read the pooled feature (the embedding the classifier sees): probabilistic
knowledge transfer (PKT), relational KD (RKD), correlation congruence (CC) and contrastive
representation distillation (CRD).

Each adds its feature term to the cross-entropy (:class:`FeatureDistiller`), with the
official CIFAR code's settings (RepDistiller; mdistiller agrees where it has the method)
as defaults, and reads each network's pooled feature (the official ``feat[-1]``). A
training step of each equals the official code's (its loss parts, the total and the
student's gradients) on the shipped pairs resnet56_resnet20 and vgg13_vgg8
(tests/test_fidelity_embedding.py)."""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdlight.config.settings import check
from kdlight.distillers.base import FeatureDistiller, own_random_stream
from kdlight.errors import KDLightError
from kdlight.losses import (
    ContrastMemory,
    Embed,
    NegativeSampler,
    cc_loss,
    crd_loss,
    pkt_loss,
    rkd_loss,
)


class PKT(FeatureDistiller):
    r"""Probabilistic knowledge transfer (Passalis and Tefas, 2018) on the embeddings:
    :math:`\mathcal{L} = w_{ce} \, \mathrm{CE} + w \, \mathrm{PKT}` with
    :func:`kdlight.losses.pkt_loss` of the pooled features, as RepDistiller's
    ``distiller_zoo/PKT.py``. Parts: ``loss``, ``ce``, ``pkt``."""

    name = "pkt"
    features = "embedding"

    def __init__(
        self,
        weight: float = 30000.0,
        ce_weight: float = 1.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        return pkt_loss(student[0], teacher[0])


class RKD(FeatureDistiller):
    r"""Relational KD (Park et al., 2019) on the embeddings:
    :math:`\mathcal{L} = w_{ce} \, \mathrm{CE} + w \, (w_D \, \mathrm{distance} + w_A \,
    \mathrm{angle})` with :func:`kdlight.losses.rkd_loss`. Parts: ``loss``, ``ce``,
    ``distance`` and ``angle`` (before :math:`w_D`, :math:`w_A` and ``weight``). As
    RepDistiller's ``distiller_zoo/RKD.py``."""

    name = "rkd"
    features = "embedding"
    setting_names = (*FeatureDistiller.setting_names, "distance_weight", "angle_weight")

    def __init__(
        self,
        weight: float = 1.0,
        ce_weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> dict:
        return rkd_loss(student[0], teacher[0], self.distance_weight, self.angle_weight)


class CC(FeatureDistiller):
    r"""Correlation congruence (Peng et al., ICCV 2019) as RepDistiller runs it:

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE} + w \, \mathrm{CC}(W_s f_s + b_s, \;
        W_t f_t + b_t)

    with :func:`kdlight.losses.cc_loss` (the official code's form, not the paper's kernel)
    of two trainable linear maps of the pooled features :math:`f_s, f_t` to ``dim``
    dimensions, without normalisation (RepDistiller ``models/util.py:185-194``
    ``LinearEmbed``, built in ``train_student.py:211-218`` and applied in
    ``helper/loops.py:162-165``). Both maps are trained by the loss, the teacher's
    too, as in the official code; they are saved with the student and not exported.

    Defaults, the official CIFAR settings: ``weight`` 0.02 and ``ce_weight`` 1
    (``scripts/run_cifar_distill.sh:13``, ``-a 0 -b 0.02`` and ``train_student.py:73``'s
    ``-r 1``), ``dim`` 128 (``train_student.py:81``, ``--feat_dim``). Parts: ``loss``,
    ``ce``, ``cc``.
    """

    name = "cc"
    features = "embedding"
    setting_names = (*FeatureDistiller.setting_names, "dim")

    def __init__(
        self,
        weight: float = 0.02,
        ce_weight: float = 1.0,
        dim: int = 128,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        check("distiller", dim=dim)  # nn.Linear takes 0 outputs: a loss of 0, said nowhere
        self.dim = dim

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        (student,), (teacher,) = student_shapes.values(), teacher_shapes.values()
        self.embed_student = nn.Linear(math.prod(student), self.dim)
        self.embed_teacher = nn.Linear(math.prod(teacher), self.dim)

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        return cc_loss(
            self.embed_student(student[0].flatten(1)), self.embed_teacher(teacher[0].flatten(1))
        )


class CRD(FeatureDistiller):
    r"""Contrastive representation distillation (Tian et al., ICLR 2020):

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE} + w \, \big(\mathcal{L}_{NCE}(e_s; M_t)
        + \mathcal{L}_{NCE}(e_t; M_s)\big)

    The embeddings :math:`e_s, e_t` are trainable linear maps of the pooled features to
    ``dim`` dimensions, L2-normalised (:class:`~kdlight.losses.Embed`). Each is contrasted
    with the other network's memory bank (:class:`~kdlight.losses.ContrastMemory`: one
    embedding per training image, updated with ``momentum``) at its own image (the
    positive) and ``num_negatives`` images of other classes, at ``nce_temperature``, by
    :func:`kdlight.losses.crd_loss`.

    The negatives are drawn as the official "exact" mode draws them, or with
    ``replacement=True`` every row with replacement (:class:`~kdlight.losses.NegativeSampler`),
    on the batch's device from a generator of their own, seeded from the run's seed and kept
    in checkpoints, so a resumed run draws what an uninterrupted one would.

    As RepDistiller's ``crd/criterion.py`` and ``crd/memory.py`` (mdistiller's
    ``distillers/CRD.py``): given the same negatives, a step's embeddings' gradients, the
    normalising constants and the memory banks after the update are the official ones too.

    It needs the images' indices and the training set's labels (``needs_index``). The memory
    banks are this process's: under DDP the processes would train on banks that disagree, so
    it runs on one process and stops with one line otherwise. Parts: ``loss``, ``ce``,
    ``crd``.
    """

    name = "crd"
    features = "embedding"
    needs_index = True
    setting_names = FeatureDistiller.setting_names + (
        "dim", "num_negatives", "nce_temperature", "momentum", "replacement",
    )  # fmt: skip

    def __init__(
        self,
        weight: float = 0.8,
        ce_weight: float = 1.0,
        dim: int = 128,
        num_negatives: int = 16384,
        nce_temperature: float = 0.07,
        momentum: float = 0.5,
        replacement: bool = False,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        check("distiller", num_negatives=num_negatives)
        self.dim, self.num_negatives = dim, num_negatives
        self.nce_temperature, self.momentum = nce_temperature, momentum
        self.replacement = replacement
        self.memory: ContrastMemory | None = None
        self.sampler: NegativeSampler | None = None
        self._negatives: torch.Generator | None = None
        self._negatives_state: Tensor | None = None  # restored, for the next generator

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        (student,), (teacher,) = student_shapes.values(), teacher_shapes.values()
        self.embed_student = Embed(math.prod(student), self.dim)
        self.embed_teacher = Embed(math.prod(teacher), self.dim)

    def attach_data(self, train_labels: Tensor) -> None:
        """Make the memory banks for the training set whose labels are ``train_labels``
        (kept as they are when a resumed run has restored them for the same set)."""
        labels = train_labels.long().cpu()
        if self.memory is not None and self.memory.num_data == len(labels):
            return
        with own_random_stream():  # the run's random stream is left as a KD run's
            self.memory = ContrastMemory(
                self.dim, len(labels), momentum=self.momentum, temperature=self.nce_temperature
            )
        self.register_buffer("labels", labels)  # in checkpoints: the banks' training set
        self.sampler = NegativeSampler(labels, self.num_negatives, self.replacement)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The negatives' own random stream, on ``device``: seeded from the run's seed,
        kept in checkpoints, and drawing nothing from the global stream (which, on the
        first process, also draws the augmentation)."""
        if self._negatives is None or self._negatives.device != device:
            generator = torch.Generator(device).manual_seed(torch.initial_seed())
            if self._negatives_state is not None:
                generator.set_state(self._negatives_state)
            self._negatives, self._negatives_state = generator, None
        return self._negatives

    def get_extra_state(self) -> dict:
        state = self._negatives.get_state() if self._negatives is not None else None
        return {"negatives": state if state is not None else self._negatives_state}

    def set_extra_state(self, state: dict) -> None:
        self._negatives, self._negatives_state = None, state.get("negatives")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint's memory banks are restored even where fitting has not made them
        (``load_from_checkpoint``): the banks are made first, for its training set."""
        labels = state_dict.get(f"{prefix}labels")
        if labels is not None:
            self.attach_data(labels)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def feature_loss(
        self, student: list[Tensor], teacher: list[Tensor], index: Tensor | None = None, **batch
    ) -> Tensor:
        if index is None or self.memory is None:
            raise KDLightError(
                "distiller=crd needs each training image's index and the training set's "
                "labels: train it with DistillationModule on a kdlight data module"
            )
        contrast = self.sampler(index, generator=self._generator(index.device))
        embeddings = self.embed_student(student[0]), self.embed_teacher(teacher[0])
        student_scores, teacher_scores = self.memory(*embeddings, index, contrast)
        num_data = self.memory.num_data
        return crd_loss(student_scores, num_data) + crd_loss(teacher_scores, num_data)
