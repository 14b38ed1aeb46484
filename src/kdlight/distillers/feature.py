"""Methods that read stage outputs: FitNet, attention transfer (AT), similarity-preserving
KD (SP), variational information distillation (VID), neuron selectivity transfer (NST) and
KDSVD.

Each adds its feature term to the cross-entropy (:class:`FeatureDistiller`), with the
official CIFAR code's weights (RepDistiller; mdistiller agrees; KDSVD's, which RepDistiller's
script does not set, mdistiller's) as defaults, and reads the
models' ``stages`` taps (the official ``feat[1:-1]``, each stage's output after its ReLU).
``tests/test_fidelity_stages.py`` checks a training step of each, built from the command
line's config, against the official code's step on the same weights.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdlight.config.settings import check
from kdlight.distillers.base import FeatureDistiller
from kdlight.errors import KDLightError
from kdlight.losses import (
    ConvRegressor,
    VIDRegressor,
    at_loss,
    hint_loss,
    kdsvd_loss,
    nst_loss,
    sp_loss,
)


def _one_pair(student: list[str], teacher: list[str], stage: int, method: str):
    """The ``stage``-th pair (negative: counted from the deepest) of the aligned stages."""
    if not -len(student) <= stage < len(student):
        raise KDLightError(
            f"distiller.stage={stage}: {method} pairs {len(student)} stages of the student "
            f"and the teacher, so it must be in [{-len(student)}, {len(student) - 1}]"
        )
    return [student[stage]], [teacher[stage]]


class FitNet(FeatureDistiller):
    r"""FitNets (Romero et al., 2015): a hint at one stage.

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE} + w \, \mathrm{MSE}\big(r(f_s), f_t\big)

    with :math:`r` a trainable :class:`~kdlight.losses.ConvRegressor` (convolution, BN,
    ReLU) from the student's map to the teacher's channels and size.

    Which stage, as the official code counts it: ``hint_layer`` indexes each network's
    feature list of the official CIFAR code (RepDistiller's ``train_student.py``,
    mdistiller's ``FitNet.py``: ``feats[hint_layer]``), whose entry 0 is the stem's output
    and entry ``k`` the ``k``-th stage's, so the tap is stage ``hint_layer`` of each
    network's ``stages`` taps, each network counted on its own. The official default 2 is
    the second stage of every zoo network (``layer2`` of a ResNet, vgg's ``relu2``). The
    stem (``hint_layer=0``) is no default tap: name it with ``student_taps``/``teacher_taps``.

    ``stage``, kdlight's own count, replaces ``hint_layer`` when given: which of the stages
    :meth:`pair_taps` pairs (0 the shallowest, -1 the deepest), ``hint_layer = stage + 1``
    when both networks have as many stages. The official code trains the hint together with
    the task, as here (its two-stage FitNet schedule is not used). Parts: ``loss``, ``ce``,
    ``fitnet`` (the MSE).
    """

    name = "fitnet"
    features = "stages"

    def __init__(
        self,
        weight: float = 100.0,
        ce_weight: float = 1.0,
        stage: int | None = None,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
        hint_layer: int = 2,
    ) -> None:
        # hint_layer comes last so that calls of an older kdlight, by position, still mean
        # what they meant
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        self.hint_layer, self.stage = hint_layer, stage
        self.regressor: nn.Module | None = None

    def pair_taps(self, student, teacher):
        if self.stage is not None:
            return _one_pair(*super().pair_taps(student, teacher), self.stage, self.name)
        # taps given by name are the hint of that network as they are; the other network's
        # default stages are indexed as the official code indexes its feature list
        return (
            student if self.student_taps is not None else self._hint(student, "student"),
            teacher if self.teacher_taps is not None else self._hint(teacher, "teacher"),
        )

    def _hint(self, stages: list[str], role: str) -> list[str]:
        """The official ``feats[hint_layer]`` among ``stages`` (``feats[1:]``)."""
        if not 1 <= self.hint_layer <= len(stages):
            raise KDLightError(
                f"distiller.hint_layer={self.hint_layer}: the {role} has {len(stages)} stages, "
                f"so it must be in [1, {len(stages)}] (0, the stem's output, is no default "
                f"tap: name it with distiller.{role}_taps=[...])"
            )
        return [stages[self.hint_layer - 1]]

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        (student,), (teacher,) = student_shapes.values(), teacher_shapes.values()
        self.regressor = ConvRegressor(tuple(student), tuple(teacher))

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        return hint_loss(self.regressor(student[0]), teacher[0])

    def settings(self) -> dict:
        chosen = {"hint_layer": self.hint_layer} if self.stage is None else {"stage": self.stage}
        return super().settings() | chosen


class AT(FeatureDistiller):
    r"""Attention transfer (Zagoruyko and Komodakis, 2017) at every paired stage:
    :math:`\mathcal{L} = w_{ce} \, \mathrm{CE} + w \sum_l \mathrm{AT}_l` with
    :func:`kdlight.losses.at_loss` (attention maps of :math:`|f|^p`). Parts: ``loss``,
    ``ce``, ``at``.

    As the official CIFAR code (RepDistiller ``distiller_zoo/AT.py``, mdistiller
    ``distillers/AT.py``): every stage of both networks, paired in order; ``pairing``
    matters only for networks of different depths (:meth:`Distiller.pair_taps
    <kdlight.distillers.Distiller.pair_taps>`).
    """

    name = "at"
    features = "stages"
    setting_names = (*FeatureDistiller.setting_names, "p", "pairing")

    def __init__(
        self,
        weight: float = 1000.0,
        ce_weight: float = 1.0,
        p: float = 2.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
        pairing: str = "deepest",
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        check("distiller", pairing=pairing)
        self.p, self.pairing = p, pairing

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        return at_loss(student, teacher, p=self.p)


class SP(FeatureDistiller):
    r"""Similarity-preserving KD (Tung and Mori, 2019) at the deepest paired stage, as the
    official code: :math:`\mathcal{L} = w_{ce} \, \mathrm{CE} + w \, \mathrm{SP}` with
    :func:`kdlight.losses.sp_loss` (the batch's similarity matrices). Parts: ``loss``,
    ``ce``, ``sp``."""

    name = "sp"
    features = "stages"

    def __init__(
        self,
        weight: float = 3000.0,
        ce_weight: float = 1.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)

    def pair_taps(self, student, teacher):
        return _one_pair(*super().pair_taps(student, teacher), -1, self.name)

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        return sp_loss(student, teacher)


class VID(FeatureDistiller):
    r"""Variational information distillation (Ahn et al., 2019) at every paired stage:
    :math:`\mathcal{L} = w_{ce} \, \mathrm{CE} + w \sum_l \mathrm{VID}_l` with
    :func:`kdlight.losses.vid_loss` and a trainable :class:`~kdlight.losses.VIDRegressor`
    per stage, whose variances start at ``init_pred_var``. Parts: ``loss``, ``ce``, ``vid``.

    As RepDistiller's CIFAR code (``distiller_zoo/VID.py``), which produced the published
    VID numbers (CRD's tables): every stage of both networks, paired in order (``pairing``
    as for :class:`AT`), the variances trained with the student (mdistiller's stay at
    ``init_pred_var``: :class:`~kdlight.losses.VIDRegressor`).
    """

    name = "vid"
    features = "stages"
    setting_names = (*FeatureDistiller.setting_names, "init_pred_var", "pairing")

    def __init__(
        self,
        weight: float = 1.0,
        ce_weight: float = 1.0,
        init_pred_var: float = 5.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
        pairing: str = "deepest",
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        check("distiller", pairing=pairing, init_pred_var=init_pred_var)
        self.init_pred_var, self.pairing = init_pred_var, pairing
        self.regressors = nn.ModuleList()

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        pairs = zip(student_shapes.values(), teacher_shapes.values(), strict=True)
        self.regressors = nn.ModuleList(
            VIDRegressor(student[0], teacher[0], init_pred_var=self.init_pred_var)
            for student, teacher in pairs
        )

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        pairs = zip(self.regressors, student, teacher, strict=True)
        return torch.stack([regressor(s, t) for regressor, s, t in pairs]).sum()


class NST(FeatureDistiller):
    r"""Neuron selectivity transfer (Huang and Wang, 2017) at every paired stage:
    :math:`\mathcal{L} = w_{ce} \, \mathrm{CE} + w \sum_l \mathrm{MMD}^2_l` with
    :func:`kdlight.losses.nst_loss` (polynomial-kernel MMD between the channels' normalised
    spatial patterns). Parts: ``loss``, ``ce``, ``nst``.

    As the official CIFAR code, where RepDistiller (``distiller_zoo/NST.py``,
    ``helper/loops.py:139-143``, ``feat[1:-1]``) and mdistiller (``distillers/NST.py``,
    ``feats[1:]``) compute the same: every stage of both networks, paired in order
    (``pairing`` as for :class:`AT`), weight 50 (RepDistiller
    ``scripts/run_cifar_distill.sh:27`` ``-b 50``, mdistiller ``engine/cfg.py:111``).
    """

    name = "nst"
    features = "stages"
    setting_names = (*FeatureDistiller.setting_names, "pairing")

    def __init__(
        self,
        weight: float = 50.0,
        ce_weight: float = 1.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
        pairing: str = "deepest",
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        check("distiller", pairing=pairing)
        self.pairing = pairing

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        return nst_loss(student, teacher)


class KDSVD(FeatureDistiller):
    r"""Self-supervised KD with singular value decomposition (Lee et al., ECCV 2018) over
    every paired stage: :math:`\mathcal{L} = w_{ce} \, \mathrm{CE} + w \,
    \mathrm{KDSVD}` with :func:`kdlight.losses.kdsvd_loss` (Gaussian kernels between the
    leading singular vectors of consecutive stages). Parts: ``loss``, ``ce``, ``kdsvd``.

    As RepDistiller's CIFAR code (``distiller_zoo/KDSVD.py``, ``helper/loops.py:157-161``,
    ``feat[1:-1]``; mdistiller reads the same stages, ``feats[1:]``, but decomposes other
    matrices: :func:`~kdlight.losses.kdsvd_loss`): every stage of both networks, paired in
    order (``pairing`` as for :class:`AT`), ``singular_vectors`` k = 1 (RepDistiller
    ``KDSVD.py:13``, mdistiller ``engine/cfg.py:94``), weight 1 (mdistiller
    ``engine/cfg.py:97``; RepDistiller's script gives KDSVD no ``-b``).

    The loss compares the student's and the teacher's singular vectors over the channels,
    so the official code runs only where each paired stage has as many channels in both
    (of the zoo pairs, ``conf/pair/``: those of one family but ``wrn_40_2_wrn_40_1``).
    Where a stage's channels differ, kdlight's own addition, with no official counterpart:
    a trainable 1x1 convolution (no bias) maps the student's stage onto the teacher's
    channels first (``connectors``; an identity, with no parameters, where they agree).
    """

    name = "kdsvd"
    features = "stages"
    setting_names = (*FeatureDistiller.setting_names, "singular_vectors", "pairing")

    def __init__(
        self,
        weight: float = 1.0,
        ce_weight: float = 1.0,
        singular_vectors: int = 1,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
        pairing: str = "deepest",
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        check("distiller", pairing=pairing, singular_vectors=singular_vectors)
        self.singular_vectors, self.pairing = singular_vectors, pairing
        self.connectors = nn.ModuleList()

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        if len(student_shapes) < 2:
            raise KDLightError(
                f"distiller=kdsvd relates consecutive stages, so it reads at least 2 of each "
                f"network, got {len(student_shapes)} ({', '.join(student_shapes)})"
            )
        for name, (channels, *size) in teacher_shapes.items():
            most = min(channels, math.prod(size))  # the singular vectors of a (H*W, C) matrix
            if self.singular_vectors > most:
                raise KDLightError(
                    f"distiller.singular_vectors={self.singular_vectors} is not allowed: the "
                    f"teacher's {name} of shape {tuple([channels, *size])} has {most}, so it "
                    f"must be in [1, {most}]"
                )
        pairs = zip(student_shapes.values(), teacher_shapes.values(), strict=True)
        self.connectors = nn.ModuleList(
            nn.Identity()
            if student[0] == teacher[0]
            else nn.Conv2d(student[0], teacher[0], kernel_size=1, bias=False)
            for student, teacher in pairs
        )

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        mapped = [connector(s) for connector, s in zip(self.connectors, student, strict=True)]
        return kdsvd_loss(mapped, teacher, self.singular_vectors)
