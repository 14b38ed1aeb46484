"""Methods that read stage outputs: FitNet, attention transfer (AT), similarity-preserving
KD (SP) and variational information distillation (VID).

Each adds its feature term to the hard-label cross-entropy with the weights of the official
CIFAR code (RepDistiller; mdistiller agrees): FitNet 100, AT 1000, SP 3000, VID 1, CE 1. By
default they read the models' ``stages`` taps, the deepest stages of each network paired
(:meth:`Distiller.pair_taps <kdlight.distillers.Distiller.pair_taps>`); FitNet reads one of
them, SP the last.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdlight.distillers.base import FeatureDistiller
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
    ReLU) from the student's map to the teacher's channels and size. ``stage``: which of
    the paired stages (0 the shallowest, -1 the deepest); the default -2 is the official
    code's ``hint_layer=2`` for the 3-stage CIFAR networks. The official code trains the
    hint together with the task, as here (its two-stage FitNet schedule is not used).
    Parts: ``loss``, ``ce``, ``fitnet`` (the MSE).
    """

    name = "fitnet"
    features = "stages"

    def __init__(
        self,
        weight: float = 100.0,
        ce_weight: float = 1.0,
        stage: int = -2,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        self.stage = stage
        self.regressor: nn.Module | None = None

    def pair_taps(self, student, teacher):
        return _one_pair(*super().pair_taps(student, teacher), self.stage, self.name)

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        (student,), (teacher,) = student_shapes.values(), teacher_shapes.values()
        self.regressor = ConvRegressor(tuple(student), tuple(teacher))

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        return hint_loss(self.regressor(student[0]), teacher[0])

    def settings(self) -> dict:
        return super().settings() | {"stage": self.stage}


class AT(FeatureDistiller):
    r"""Attention transfer (Zagoruyko and Komodakis, 2017) at every paired stage:
    :math:`\mathcal{L} = w_{ce} \, \mathrm{CE} + w \sum_l \mathrm{AT}_l` with
    :func:`kdlight.losses.at_loss` (attention maps of :math:`|f|^p`). Parts: ``loss``,
    ``ce``, ``at``."""

    name = "at"
    features = "stages"

    def __init__(
        self,
        weight: float = 1000.0,
        ce_weight: float = 1.0,
        p: float = 2.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        self.p = p

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        return at_loss(student, teacher, p=self.p)

    def settings(self) -> dict:
        return super().settings() | {"p": self.p}


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
    """

    name = "vid"
    features = "stages"

    def __init__(
        self,
        weight: float = 1.0,
        ce_weight: float = 1.0,
        init_pred_var: float = 5.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        self.init_pred_var = init_pred_var
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

    def settings(self) -> dict:
        return super().settings() | {"init_pred_var": self.init_pred_var}
