"""The interface of a distillation method, and what kdlight's methods share.

A method is any callable with this interface (subclassing :class:`Distiller` is not
required)::

    parts = method(student, teacher, targets, epoch=epoch)

- ``student``, ``teacher``: :class:`Outputs` of one batch, the logits and the features the
  method asked for (the teacher's carry no gradient);
- ``targets``: the ``(N,)`` class indices; ``epoch``: the current epoch, from 0;
- ``parts``: a dict of 0-dim tensors, ``"loss"`` (what is minimised, the hard-label term
  included) and the parts logged as ``train/<name>`` (``"ce"``, ``"kd"``...).

Optional attributes, all read once when the method is given to a ``DistillationModule``:

- ``name``: a short name for directories and reports (by default the class name in lower
  case); ``settings()``: a dict of its settings for ``metrics.json``;
- ``student_taps``, ``teacher_taps``: the module names whose outputs it reads
  (:mod:`kdlight.models.taps`), in ``Outputs.features`` by name in that order; or ``features``,
  the kind of default taps the models name (``"stages"``, ``"preact_stages"`` or
  ``"embedding"``), which ``pair_taps(student_names, teacher_names)`` may narrow;
- ``read_teacher(teacher, teacher_taps)``: called with the teacher network and the names
  of its taps, before ``build``, for what a method derives from the frozen teacher's
  weights (OFD's margins, from its BN layers);
- ``build(student_shapes, teacher_shapes)``: called with each tap's output shape for one
  sample (``torch.Size`` without the batch dimension), to make connectors that depend on
  them before training;
- ``needs_index = True``: it is also called with ``index=``, each training image's position
  in the training set, and ``attach_data(train_labels)`` is called at the start of fitting.
- ``needs_strong_view = True``: it is also called with ``student_strong=`` and
  ``teacher_strong=``, the :class:`Outputs` of a second, strongly augmented view of the batch
  (:mod:`kdlight.data.strong`; the student runs on it after the batch).

A method that is an ``nn.Module`` with parameters of its own (a connector) has them trained
with the student and saved in its checkpoints; they are not part of the student that
:func:`kdlight.load_model` returns.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlight.models.taps import check_tap_names, default_taps


@dataclass
class Outputs:
    """What a method may read of one network's forward pass on a batch."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


class Distiller(nn.Module):
    """Base of kdlight's methods: a ``name``, ``settings()`` and, for feature methods, which
    taps they read. ``forward`` is the interface in this module's docstring.

    Args:
        student_taps, teacher_taps: module names to read instead of the models' default
            taps of kind ``features`` (e.g. ``distiller.student_taps=[layer2]`` on the CLI).
    """

    name = "distiller"
    #: the kind of default taps the method reads (``"stages"``, ``"embedding"``) or None
    features: str | None = None
    needs_index = False
    #: which stages :meth:`pair_taps` pairs when the networks' depths differ: ``"deepest"``
    #: or ``"shallowest"``
    pairing = "deepest"
    #: the attributes :meth:`settings` reports, in order
    setting_names: tuple[str, ...] = ()

    def __init__(
        self, student_taps: Sequence[str] | None = None, teacher_taps: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.student_taps = list(student_taps) if student_taps is not None else None
        self.teacher_taps = list(teacher_taps) if teacher_taps is not None else None

    def pair_taps(self, student: list[str], teacher: list[str]) -> tuple[list[str], list[str]]:
        """The taps read of the default ones: as many stages of each network as the
        shallower network has, paired in order; by default (``pairing = "deepest"``) the
        deepest of each (a 4-stage teacher's last 3 for a 3-stage student), with
        ``pairing = "shallowest"`` the first of each, as the official CIFAR code pairs them
        (``zip(feat_s[1:-1], feat_t[1:-1])``: RepDistiller ``helper/loops.py``, mdistiller
        ``AT.py`` and ``VID.py``).

        Why deepest by default, where kdlight otherwise follows the official code: the two
        pairings are the same pairs whenever both networks have as many stages, as on every
        CIFAR-100 pair of the official READMEs and every kdlight zoo pair (``conf/pair/``,
        tested). They differ only on networks of different depths, where the official code
        never went, such as ``experiment=distill``'s 4-stage ``resnet18_half`` and 3-stage
        ``small_cnn``: there the deepest stages are maps of the same sizes (16x16, 8x8 and
        4x4), while the zip pairs each student map with a teacher map of twice its height
        and leaves the teacher's deepest stage unread. No accuracy has been measured
        between the two.
        """
        count = min(len(student), len(teacher))
        if self.pairing == "shallowest":
            return student[:count], teacher[:count]
        return student[len(student) - count :], teacher[len(teacher) - count :]

    def settings(self) -> dict:
        """The method's settings, as ``metrics.json`` and ``kdlight-report`` show them."""
        return {name: getattr(self, name) for name in self.setting_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.settings().items())


class FeatureDistiller(Distiller):
    r"""A method that adds a weighted feature term to the hard-label cross-entropy:

    .. math::
        \mathcal{L} = w_{ce} \, \mathrm{CE}(z_s, y) + w \, \mathcal{L}_{feat}

    (the form of RepDistiller's and mdistiller's CIFAR code, with no KD term). Subclasses
    implement :meth:`feature_loss` of the tapped features, in tap order. Parts: ``loss``,
    ``ce`` and ``<name>``, the feature term before ``weight`` (or the parts
    :meth:`feature_loss` names).
    """

    setting_names = ("weight", "ce_weight")

    def __init__(
        self,
        weight: float,
        ce_weight: float = 1.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.weight, self.ce_weight = weight, ce_weight

    def feature_loss(
        self, student: list[Tensor], teacher: list[Tensor], **batch
    ) -> Tensor | dict[str, Tensor]:
        """The feature term of the tapped outputs (``batch``: what else the call was given,
        e.g. ``index``), or a dict of it as ``loss`` and its parts."""
        raise NotImplementedError

    def forward(
        self, student: Outputs, teacher: Outputs, targets: Tensor, epoch: int = 0, **batch
    ) -> dict[str, Tensor]:
        ce = F.cross_entropy(student.logits.float(), targets)
        term = self.feature_loss(
            list(student.features.values()), list(teacher.features.values()), **batch
        )
        parts = dict(term) if isinstance(term, dict) else {"loss": term, self.name: term}
        loss = self.ce_weight * ce + self.weight * parts.pop("loss")
        return {"loss": loss, "ce": ce, **parts}


def method_name(method) -> str:
    """A method's short name: its ``name``, else its class name in lower case."""
    return str(getattr(method, "name", None) or type(method).__name__.lower())


def method_settings(method) -> dict:
    """A method's ``settings()``, or nothing for a method that has none."""
    settings = getattr(method, "settings", None)
    return dict(settings()) if callable(settings) else {}


def resolve_taps(method, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
    """The module names ``method`` reads of the student and of the teacher: its own
    ``student_taps``/``teacher_taps`` where given, else the models' default taps of its
    ``features`` kind narrowed by its ``pair_taps``; none for a logit method. A name given
    that the network does not have is a one-line error listing the names it has."""
    kind = getattr(method, "features", None)
    student_taps = getattr(method, "student_taps", None)
    teacher_taps = getattr(method, "teacher_taps", None)
    # the names given are checked before pairing: a name that is not there is the error,
    # not the stage that pairing it with the other network's default taps cannot find
    check_tap_names(student, student_taps or [], "student")
    check_tap_names(teacher, teacher_taps or [], "teacher")
    if kind is None:
        return list(student_taps or []), list(teacher_taps or [])
    chosen_s = student_taps if student_taps is not None else default_taps(student, kind, "student")
    chosen_t = teacher_taps if teacher_taps is not None else default_taps(teacher, kind, "teacher")
    pair = getattr(method, "pair_taps", None)
    if callable(pair) and (student_taps is None or teacher_taps is None):
        chosen_s, chosen_t = pair(list(chosen_s), list(chosen_t))
    return list(chosen_s), list(chosen_t)


@contextmanager
def own_random_stream() -> Iterator[None]:
    """Random numbers drawn inside come from a stream of their own, seeded with the run's
    seed (``torch.initial_seed()``), and the global stream is left where it was: a method's
    connectors start the same in a separate run and in a grid cell, and a method that
    builds some draws nothing that the augmentation would have drawn."""
    with torch.random.fork_rng(devices=[]):  # the CPU stream, where modules are built
        torch.default_generator.manual_seed(torch.initial_seed())
        yield
