"""The overhaul of feature distillation (OFD; Heo et al., 2019): the one method that reads
the stages before their ReLU (the models' ``preact_stages`` taps) and the teacher's BN
layers before those ReLUs (the models' ``bn_before_relu``), whose affine terms give the
margins. ``tests/test_fidelity_ofd.py`` checks a training step, built from the command
line's config, against mdistiller's OFD step on the same weights.
"""

from collections.abc import Sequence

from torch import Tensor, nn

from kdlight.config.settings import check
from kdlight.distillers.base import FeatureDistiller
from kdlight.errors import KDLightError
from kdlight.losses import OFDConnector, ofd_loss, ofd_margins


class OFD(FeatureDistiller):
    r"""Overhaul of feature distillation (Heo et al., 2019) at every paired stage:

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE} + w \sum_{l=1}^{L} 2^{-(L - l)} \,
        \mathrm{PL2}\big(c_l(s_l), \mathrm{pool}(t_l), m_l\big)

    with :func:`kdlight.losses.ofd_loss`: the student's pre-activation map :math:`s_l`
    through a trainable :class:`~kdlight.losses.OFDConnector` :math:`c_l` (convolution and
    BN), the teacher's pre-activation map :math:`t_l` after the margin ReLU, the margins
    :math:`m_l` from the teacher's BN before that ReLU (:func:`kdlight.losses.ofd_margins`).
    Parts: ``loss``, ``ce``, ``ofd`` (the sum, before ``weight``).

    As mdistiller's CIFAR code (``mdistiller/distillers/OFD.py``, ``engine/cfg.py``):
    ``weight`` 0.001 (``OFD.LOSS.FEAT_WEIGHT``, cfg.py:103), ``ce_weight`` 1
    (cfg.py:102), ``connector_kernel_size`` 1 (``OFD.CONNECTOR.KERNEL_SIZE``, cfg.py:105);
    every stage (the ``preact_feats[1:]`` of OFD.py:137), the deepest of each network
    paired where their depths differ (``_align_list``, OFD.py:163-165); the margins from the
    teacher's ``bn_before_relu`` (its ``get_bn_before_relu``, OFD.py:78, 90-109), one per
    paired teacher stage (mdistiller indexes them from the shallowest, which is the same
    stages when both networks have as many, as on every CIFAR pair).

    One departure: mdistiller's ``OFD.train`` (OFD.py:114-121) puts the teacher in train
    mode with the student, so its maps are normalised with each batch's statistics and its
    BN running statistics move as the student trains; kdlight's teacher is frozen in eval
    mode for every method, OFD's too.

    A teacher of kdlight's zoo declares its BN before each ``preact_stages`` tap
    (``model.bn_before_relu``, a dict of tap name to BN module name); another teacher needs
    that dict set on it, for the tapped names. ShuffleNets declare none (mdistiller refuses
    them as OFD teachers) and MobileNetV2 has no pre-activation taps (mdistiller's returns
    no ``preact_feats``: its stages end in a linear bottleneck).
    """

    name = "ofd"
    features = "preact_stages"
    setting_names = (*FeatureDistiller.setting_names, "connector_kernel_size")

    def __init__(
        self,
        weight: float = 0.001,
        ce_weight: float = 1.0,
        connector_kernel_size: int = 1,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, ce_weight, student_taps, teacher_taps)
        check("distiller", connector_kernel_size=connector_kernel_size)
        self.connector_kernel_size = connector_kernel_size
        self.connectors = nn.ModuleList()
        self.margin_count = 0

    def read_teacher(self, teacher: nn.Module, names: list[str]) -> None:
        """The margins of the teacher's taps ``names``, from the BN before each one's ReLU
        (``teacher.bn_before_relu``): buffers, not saved (they are the frozen teacher's)."""
        norms = getattr(teacher, "bn_before_relu", None) or {}
        for index, name in enumerate(names):
            if name not in norms:
                raise KDLightError(
                    f"distiller=ofd takes its margins from the BN before the ReLU of each "
                    f"teacher tap, and the teacher ({type(teacher).__name__}) names none for "
                    f"{name!r} in its bn_before_relu (a dict of tap name to BN module name; "
                    "kdlight's ShuffleNets have none, as mdistiller refuses them as OFD teachers)"
                )
            bn = teacher.get_submodule(norms[name])
            margin = ofd_margins(bn.weight, bn.bias)
            self.register_buffer(f"margin{index}", margin, persistent=False)
        self.margin_count = len(names)

    def margins(self) -> list[Tensor]:
        """The margin of each paired teacher stage, shallow to deep."""
        return [getattr(self, f"margin{index}") for index in range(self.margin_count)]

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        pairs = zip(student_shapes.values(), teacher_shapes.values(), strict=True)
        self.connectors = nn.ModuleList(
            OFDConnector(student[0], teacher[0], self.connector_kernel_size)
            for student, teacher in pairs
        )

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], **batch) -> Tensor:
        connected = [connector(s) for connector, s in zip(self.connectors, student, strict=True)]
        return ofd_loss(connected, teacher, self.margins())
