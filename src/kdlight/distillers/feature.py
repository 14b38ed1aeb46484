"""Methods that read stage outputs: FitNet, attention transfer (AT), similarity-preserving
KD (SP) and variational information distillation (VID).

Each adds its feature term to the hard-label cross-entropy with the weights of the official
CIFAR code (RepDistiller; mdistiller agrees): FitNet 100, AT 1000, SP 3000, VID 1, CE 1, no
KD term. By default they read the models' ``stages`` taps (the official ``feat[1:-1]``, each
stage's output after its ReLU): AT and VID every stage, paired as
:meth:`Distiller.pair_taps <kdlight.distillers.Distiller.pair_taps>` says (the official pairs
on every zoo pair); SP each network's deepest stage; FitNet the official hint layer of each
network (:class:`FitNet`). ``tests/test_fidelity_stages.py`` checks a training step of each,
built from the command line's config, against the official code's step on the same weights.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdlight.distillers.base import FeatureDistiller, check_pairing
from kdlight.errors import KDLightError
from kdlight.losses import ConvRegressor, VIDRegressor, at_loss, hint_loss, sp_loss


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
    the second stage of every zoo network: ``layer2`` of a ResNet or ShuffleNet, ``block2``
    of a WRN, vgg's ``relu2`` (256x8x8 on vgg8 and vgg13) and MobileNetV2's ``blocks.2``.
    The stem (``hint_layer=0``) is not among the default taps: name it with
    ``student_taps``/``teacher_taps``.

    ``stage``, kdlight's own count, replaces ``hint_layer`` when given: which of the paired
    stages (the deepest stages of both networks, as many as the shallower has; 0 the
    shallowest of them, -1 the deepest). It equals ``hint_layer = stage + 1`` when both
    networks have as many stages. The official code trains the hint together with the task,
    as here (its two-stage FitNet schedule is not used). Parts: ``loss``, ``ce``, ``fitnet``
    (the MSE).
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

    As the official CIFAR code (RepDistiller ``distiller_zoo/AT.py`` with ``-b 1000``,
    mdistiller ``distillers/AT.py``): every stage output, after its ReLU, of both networks
    (``feat[1:-1]``), paired in order; where two paired maps differ in size, the larger is
    average-pooled to the smaller. ``pairing`` matters only for networks of different
    depths (:meth:`~kdlight.distillers.Distiller.pair_taps`): ``"deepest"`` (the default)
    or ``"shallowest"``, the official ``zip``.
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
        self.p, self.pairing = p, check_pairing(pairing)

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

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE} + w \sum_l \frac{1}{2} \,
        \mathrm{mean}\Big(\frac{(\mu_l(f_s) - f_t)^2}{\sigma_l^2} + \log \sigma_l^2\Big)

    with a trainable :class:`~kdlight.losses.VIDRegressor` per stage (the mean
    :math:`\mu_l`, three 1x1 convolutions, and a per-channel variance
    :math:`\sigma_l^2` starting at ``init_pred_var``). Parts: ``loss``, ``ce``, ``vid``.

    As RepDistiller's CIFAR code (``distiller_zoo/VID.py``, ``train_student.py`` with
    ``-b 1``): every stage output of both networks (``feat[1:-1]``), paired in order, the
    larger of two maps average-pooled to the smaller; ``pairing`` as for :class:`AT`.

    The variances are trained: each regressor's ``log_scale`` is a parameter of this
    method, so it is in the optimizer with the student, as in RepDistiller (its
    ``VIDLoss`` is in ``trainable_list``) and in the paper, which learns the variance.
    mdistiller differs here: it keeps its ``log_scales`` in a plain Python list, outside its
    modules and its optimizer, so its variances stay at ``init_pred_var`` for the whole run.
    kdlight follows RepDistiller, whose code produced the published VID numbers (CRD's
    tables, which both official READMEs report).
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
        self.init_pred_var, self.pairing = init_pred_var, check_pairing(pairing)
        self.regressors = nn.ModuleList()

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        self.regressors = nn.ModuleList(
            VIDRegressor(student[0], teacher[0], init_pred_var=self.init_pred_var)
            for student, teacher in zip(
                student_shapes.values(), teacher_shapes.values(), strict=True
            )
        )

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        losses = [
            regressor(s, t)
            for regressor, s, t in zip(self.regressors, student, teacher, strict=True)
        ]
        return torch.stack(losses).sum()
