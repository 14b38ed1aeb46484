"""Methods that read only the logits: KD, DKD and DIST (each optionally with logit
standardization), CTKD (a learned temperature), TTM and WTTM (a transformed teacher) and
MLKD (several temperatures on two views of each image).

Each equals its official code on resnet56_resnet20 and vgg13_vgg8, each part, the total and
the student's gradients of a step: KD and DKD mdistiller's (tests/test_fidelity_logit.py,
which also follows a short run step by step with the official loop's learning rate and
momentum), DIST its authors' CIFAR code (tests/test_fidelity_recent_logit.py), CTKD
zhengli97/CTKD's, its learned temperature's gradient included (tests/test_fidelity_ctkd.py),
TTM and WTTM zkxufo/TTM's (tests/test_fidelity_ttm.py), MLKD its ``KD_ours.py``
(tests/test_fidelity_mlkd.py)."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlight.config.settings import check, not_allowed
from kdlight.distillers.base import Distiller, Outputs
from kdlight.errors import KDLightError
from kdlight.losses import ctkd_loss, dist_loss, dkd_loss, kd_loss
from kdlight.losses.multilevel import STRONG_TEMPERATURES, TEMPERATURES, mlkd_loss
from kdlight.losses.ttm import ttm_loss, wttm_loss


class KD(Distiller):
    r"""Hinton et al. (2015): :func:`kdlight.losses.kd_loss` (its formula and parts) at
    ``temperature`` and ``alpha``; ``standardize=True`` z-scores both logits inside the soft
    term first (logit standardization, Sun et al., CVPR 2024). The official settings (CE
    weight 0.1, KD weight 0.9, T 4) are ``experiment=zoo_distill``'s."""

    name = "kd"
    setting_names = ("temperature", "alpha", "standardize")

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, standardize: bool = False):
        super().__init__()
        self.temperature, self.alpha, self.standardize = temperature, alpha, standardize

    def forward(
        self, student: Outputs, teacher: Outputs, targets: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]:
        settings = self.temperature, self.alpha, self.standardize
        return kd_loss(student.logits, teacher.logits, targets, *settings)


class DKD(Distiller):
    r"""Decoupled KD (Zhao et al., CVPR 2022) with the cross-entropy and warm-up of its
    official CIFAR code (mdistiller):

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE}(z_s, y) + \min\!\Big(\frac{e + 1}{E_w}, 1\Big)
        \big(\alpha \, T^2 \, \mathrm{TCKD} + \beta \, T^2 \, \mathrm{NCKD}\big)

    with :func:`kdlight.losses.dkd_loss` for the two KL terms, :math:`e` the epoch counted
    from 0 (mdistiller counts from 1: the weight reaches 1 at the same epoch) and
    :math:`E_w` = ``warmup_epochs``. Defaults: mdistiller's CIFAR-100 settings (T 4, alpha 1,
    beta 8, CE weight 1, 20 warm-up epochs); a zoo pair whose official beta is another sets
    it in ``conf/pair/<pair>/dkd.yaml`` (2 for resnet56 -> resnet20, 6 for vgg13 -> vgg8).
    Parts: ``loss``, ``ce``, ``tckd``, ``nckd`` (the last two before their weights and the
    warm-up). The official steps it equals are at the start, the middle and the end of the
    warm-up, and the short run crosses two epoch boundaries.
    """

    name = "dkd"
    setting_names = ("temperature", "alpha", "beta", "ce_weight", "warmup_epochs", "standardize")

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 20,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.ce_weight, self.warmup_epochs, self.standardize = ce_weight, warmup_epochs, standardize

    def forward(
        self, student: Outputs, teacher: Outputs, targets: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]:
        settings = self.temperature, self.alpha, self.beta, self.standardize
        parts = dkd_loss(student.logits, teacher.logits, targets, *settings)
        ce = F.cross_entropy(student.logits.float(), targets)
        warmup = min((epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0
        loss = self.ce_weight * ce + warmup * parts["loss"]
        return {"loss": loss, "ce": ce, "tckd": parts["tckd"], "nckd": parts["nckd"]}


class DIST(Distiller):
    r"""DIST (Huang et al., NeurIPS 2022) with the cross-entropy and weights of its official
    CIFAR code (hunto/image_classification_sota, the code of the DIST_KD README's CIFAR-100
    numbers):

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE}(z_s, y) + w \, \big(\beta \,
        \mathcal{L}_{inter} + \gamma \, \mathcal{L}_{intra}\big)

    with :func:`kdlight.losses.dist_loss` for the two correlation terms, each times
    :math:`T^2`. Defaults, of that code: ``configs/strategies/distill/dist_cifar.yaml:34-36``
    (``ori_loss_weight: 1.`` the CE weight, ``kd_loss_weight: 2.`` the weight :math:`w`,
    ``kd: dist_t4``: T 4) read by ``lib/models/losses/kd_loss.py:69-71``
    (``DIST(beta=1, gamma=1, tau=4)``) and combined at ``kd_loss.py:167``. The paper's
    ImageNet setting is T 1 (``kd: 'dist'``, ``configs/strategies/distill/resnet_dist.yaml``);
    no CIFAR-100 pair has settings of its own. Parts: ``loss``, ``ce``, ``inter``,
    ``intra`` (the last two times :math:`T^2`, before their weights).
    """

    name = "dist"
    setting_names = ("temperature", "beta", "gamma", "weight", "ce_weight", "standardize")

    def __init__(
        self,
        temperature: float = 4.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        weight: float = 2.0,
        ce_weight: float = 1.0,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.temperature, self.beta, self.gamma = temperature, beta, gamma
        self.weight, self.ce_weight, self.standardize = weight, ce_weight, standardize

    def forward(
        self, student: Outputs, teacher: Outputs, targets: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]:
        settings = self.temperature, self.beta, self.gamma, self.standardize
        parts = dist_loss(student.logits, teacher.logits, *settings)
        ce = F.cross_entropy(student.logits.float(), targets)
        loss = self.ce_weight * ce + self.weight * parts["loss"]
        return {"loss": loss, "ce": ce, "inter": parts["inter"], "intra": parts["intra"]}


class CTKD(Distiller):
    r"""Curriculum temperature KD (Li et al., AAAI 2023): KD at a temperature learned against
    the student, with the cross-entropy and schedule of its official CIFAR code
    (zhengli97/CTKD):

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE}(z_s, y) + \alpha \, \tau^2 \,
        \mathrm{KL}\big(\mathrm{softmax}(z_t / \tau) \,\|\, \mathrm{softmax}(z_s / \tau)\big),
        \qquad \tau = \tau_{min} + \tau_{range} \, \sigma(\theta)

    with :func:`kdlight.losses.ctkd_loss` for the KD term and :math:`\tau`. The number
    :math:`\theta` is a parameter of the method (``raw_temperature``, 1 at the start, so
    :math:`\tau` starts at :math:`1 + 20\,\sigma(1) \approx 15.6`: ``models/temp_global.py:13``),
    trained with the student by the same optimizer, learning rate and weight decay, as
    the official code trains it (``train_student.py:309-311,379-382``), saved and resumed
    with the student, not exported by :func:`kdlight.load_model`. Its gradient is reversed
    and scaled by :math:`\lambda`, which a cosine raises from 0 to ``reversal`` over the
    first ``ramp_epochs`` epochs (``train_student.py:186-202,401-419``, decay_max 0,
    decay_min -1, decay_loops 10):

    .. math::
        \lambda(e) = \lambda_{max} \, \frac{1 - \cos\big(\pi \min(e + 1, E) / E\big)}{2}

    with :math:`e` the epoch counted from 0 (the official loop counts from 1: the same
    :math:`\lambda` in the same epoch) and :math:`E` = ``ramp_epochs`` (0: :math:`\lambda`
    is ``reversal`` from the start).

    Defaults: the official CIFAR-100 script, ``scripts/run_cifar_distill.sh:19-22``
    (``-r 0.1 -a 0.9``: CE weight 0.1, KD weight :math:`\alpha` 0.9; ``--cosine_decay 1
    --decay_max 0 --decay_min -1 --decay_loops 10``) and ``train_student.py:89-90``
    (``t_start`` 1, ``t_end`` 20: :math:`\tau_{min}`, :math:`\tau_{range}`); no pair has
    settings of its own. ``standardize=True`` z-scores both logits first, as the
    logit-standardization code's CTKD does (its CIFAR script weights the KD term 9:
    ``distiller.alpha=9``). Parts: ``loss``, ``ce``, ``kd`` (:math:`\tau^2` KL, before
    :math:`\alpha`) and ``temperature`` (:math:`\tau`).
    """

    name = "ctkd"
    setting_names = (
        "alpha", "ce_weight", "min_temperature", "temperature_range", "reversal",
        "ramp_epochs", "standardize",
    )  # fmt: skip

    def __init__(
        self,
        alpha: float = 0.9,
        ce_weight: float = 0.1,
        min_temperature: float = 1.0,
        temperature_range: float = 20.0,
        reversal: float = 1.0,
        ramp_epochs: int = 10,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        settings = {"min_temperature": min_temperature, "temperature_range": temperature_range}
        check("distiller", **settings, reversal=reversal, ramp_epochs=ramp_epochs)
        self.alpha, self.ce_weight, self.standardize = alpha, ce_weight, standardize
        self.min_temperature, self.temperature_range = min_temperature, temperature_range
        self.reversal, self.ramp_epochs = reversal, ramp_epochs
        self.raw_temperature = nn.Parameter(torch.ones(()))

    def reversal_at(self, epoch: int) -> float:
        """:math:`\\lambda` in ``epoch`` (counted from 0): how much of the KD term's gradient
        reaches the temperature, reversed."""
        if not self.ramp_epochs:
            return self.reversal
        progress = min(epoch + 1, self.ramp_epochs) / self.ramp_epochs
        return self.reversal * (1.0 - math.cos(math.pi * progress)) / 2.0

    def forward(
        self, student: Outputs, teacher: Outputs, targets: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]:
        settings = self.min_temperature, self.temperature_range, self.standardize
        term = ctkd_loss(
            student.logits, teacher.logits, self.raw_temperature, self.reversal_at(epoch), *settings
        )
        ce = F.cross_entropy(student.logits.float(), targets)
        loss = self.ce_weight * ce + self.alpha * term["loss"]
        return {"loss": loss, "ce": ce, "kd": term["loss"], "temperature": term["temperature"]}


class TTM(Distiller):
    r"""Transformed teacher matching (Zheng and Yang, ICLR 2024) with the cross-entropy of
    its official CIFAR code (zkxufo/TTM):

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE}(z_s, y) + w \, \mathcal{L}_{TTM}

    with :func:`kdlight.losses.ttm_loss` (the student's softmax matched to the teacher's
    probabilities raised to ``exponent``, :math:`\gamma`). The official loop's sum,
    ``opt.gamma * loss_cls + opt.alpha * loss_div + opt.beta * loss_kd``
    (``helper/loops.py:83``): ``-r`` is :math:`w_{ce}`, ``-b`` is :math:`w`, and ``-a 0``
    leaves out its extra KD term. Defaults: ``-r`` 1, the code's default
    (``train_student.py:60``); :math:`\gamma` 0.1 and :math:`w` 45, the CIFAR-100 run the
    README gives (``README.md:19-22``, vgg13 -> vgg8: ``--ttm_l 0.1 -r 1 -b 45 -a 0``; the
    code's own ``--ttm_l`` default, 1, is KD at T 1, and ``-b`` has none). The code has no
    per-pair settings; the paper lists its per-pair T and beta in its appendix A.4. Parts:
    ``loss``, ``ce``, ``ttm`` (before its weight). No ``standardize``: see
    :func:`~kdlight.losses.ttm_loss`.
    """

    name = "ttm"
    setting_names = ("exponent", "weight", "ce_weight")

    def __init__(self, exponent: float = 0.1, weight: float = 45.0, ce_weight: float = 1.0):
        super().__init__()
        self.exponent, self.weight, self.ce_weight = exponent, weight, ce_weight

    def matching(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The distillation term, before its weight."""
        return ttm_loss(student_logits, teacher_logits, self.exponent)

    def forward(
        self, student: Outputs, teacher: Outputs, targets: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]:
        term = self.matching(student.logits, teacher.logits)
        ce = F.cross_entropy(student.logits.float(), targets)
        return {"loss": self.ce_weight * ce + self.weight * term, "ce": ce, self.name: term}


class WTTM(TTM):
    r"""Weighted TTM (Zheng and Yang, ICLR 2024): :class:`TTM` with
    :func:`kdlight.losses.wttm_loss`, each sample's term weighted by the normaliser of its
    transformed teacher (larger where the teacher is unsure):

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE}(z_s, y) + w \, \mathcal{L}_{WTTM}

    Defaults: ``-r`` 1 (``train_student.py:60``); :math:`\gamma` 0.2 and :math:`w` 4, the one
    WTTM setting the official README gives (``README.md:37-42``, vgg13 -> vgg8, WTTM as
    ``--add wttm --ttm_l 0.2 -a 4`` beside CRD's ``-b 0.8``, the weight ``opt.alpha`` of
    ``loss_div`` at ``helper/loops.py:83``). Parts: ``loss``, ``ce``, ``wttm`` (before its
    weight).
    """

    name = "wttm"

    def __init__(self, exponent: float = 0.2, weight: float = 4.0, ce_weight: float = 1.0):
        super().__init__(exponent, weight, ce_weight)

    def matching(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return wttm_loss(student_logits, teacher_logits, self.exponent)


class MLKD(Distiller):
    r"""Multi-level logit distillation (Jin et al., CVPR 2023) with the cross-entropy and
    weights of its official CIFAR code, on a weak and a strong view of each image:

    .. math::
        \mathcal{L} = w_{ce} \big(\mathrm{CE}(z^w_s, y) + \mathrm{CE}(z^s_s, y)\big)
        + w \, (\mathcal{L}_{kd} + \mathcal{L}_{cc} + \mathcal{L}_{bc})

    with :func:`kdlight.losses.mlkd_loss` for the three terms (instance KD, class and
    batch correlation at ``temperatures``) and the official code's quirks it keeps. The
    data module gives the strong view (:mod:`kdlight.data.strong`, ``needs_strong_view``):
    the student runs on the weak view, then on the strong one, and its accuracy is counted
    on the weak one, as the official ``forward_train`` does; the teacher cache serves the
    weak view only. Defaults: the official code's (MLKD ``mdistiller/distillers/KD_ours.py``
    with ``mdistiller/engine/cfg.py:60-64``): T 4 (``KD.TEMPERATURE``) with 3, 5, 2 and 6,
    KD weight 0.9 (``KD.LOSS.KD_WEIGHT``, of all three terms) and CE weight 0.1
    (``KD.LOSS.CE_WEIGHT``, of each view's). Its own recipe is ``recipe=mlkd``. Parts:
    ``loss``, ``ce`` (both views' summed), ``kd``, ``cc``, ``bc`` (before ``weight``).
    """

    name = "mlkd"
    needs_strong_view = True
    setting_names = ("temperatures", "strong_temperatures", "weight", "ce_weight")

    def __init__(
        self,
        temperatures: Sequence[float] = TEMPERATURES,
        strong_temperatures: Sequence[float] = STRONG_TEMPERATURES,
        weight: float = 0.9,
        ce_weight: float = 0.1,
    ) -> None:
        super().__init__()
        temperatures, strong_temperatures = _listed(temperatures), _listed(strong_temperatures)
        check("distiller", temperatures=temperatures, strong_temperatures=strong_temperatures)
        if not set(strong_temperatures) <= set(temperatures):
            raise not_allowed(
                "distiller.strong_temperatures",
                strong_temperatures,
                f"some of distiller.temperatures={temperatures}",
            )
        # plain floats: metrics.json and the checkpoint's hyperparameters hold them as such
        self.temperatures = [float(t) for t in temperatures]
        self.strong_temperatures = [float(t) for t in strong_temperatures]
        self.weight, self.ce_weight = weight, ce_weight

    def forward(
        self,
        student: Outputs,
        teacher: Outputs,
        targets: Tensor,
        epoch: int = 0,
        student_strong: Outputs | None = None,
        teacher_strong: Outputs | None = None,
    ) -> dict[str, Tensor]:
        if student_strong is None or teacher_strong is None:
            raise KDLightError(
                "distiller=mlkd trains on a strong view too: call it with student_strong= "
                "and teacher_strong= (a DistillationModule gives them)"
            )
        term = mlkd_loss(
            student.logits, teacher.logits, student_strong.logits, teacher_strong.logits,
            tuple(self.temperatures), tuple(self.strong_temperatures),
        )  # fmt: skip
        ce = F.cross_entropy(student.logits.float(), targets) + F.cross_entropy(
            student_strong.logits.float(), targets
        )
        loss = self.ce_weight * ce + self.weight * term.pop("loss")
        return {"loss": loss, "ce": ce, **term}


def _listed(value):
    """A list or a config's list as a plain list (anything else as it is, for the check)."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
