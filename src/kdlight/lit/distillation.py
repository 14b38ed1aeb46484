"""``DistillationModule``: train a student from a frozen teacher with a distillation method
(:mod:`kdlight.distillers`; Hinton et al.'s KD by default)."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdlight.distillers import KD, Outputs, method_name, method_settings
from kdlight.errors import KDLightError
from kdlight.lit.base import ClassificationSystem, OptimizerFactory, SchedulerFactory
from kdlight.lit.teacher import FrozenTeacherMixin


def check_distillation_settings(temperature: float, alpha: float) -> None:
    """Raise a one-line :class:`KDLightError` for a temperature or alpha out of range."""
    if not temperature > 0:
        raise KDLightError(f"distill.temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise KDLightError(
            f"distill.alpha must be in [0, 1] (the weight of the teacher's soft term), got {alpha}"
        )


class DistillationModule(FrozenTeacherMixin, ClassificationSystem):
    """Distil a frozen teacher into ``model`` (the student) with a distillation method:
    :class:`kdlight.distillers.KD` (:func:`kdlight.losses.kd_loss`) at ``temperature`` and
    ``alpha`` unless another ``distiller`` is given.

    The teacher is frozen for good, and kept out of the student's checkpoints (see
    :class:`~kdlight.lit.teacher.FrozenTeacherMixin`). ``load_from_checkpoint`` restores the
    whole system, teacher included (read again from ``teacher_checkpoint``); to evaluate or
    reuse the trained student alone, ``kdlight.load_model(checkpoint)`` rebuilds it from the
    checkpoint without any teacher.

    Args:
        model: the student.
        teacher: a teacher module; if omitted it is restored from ``teacher_checkpoint``.
        teacher_checkpoint: a ``ClassifierModule`` checkpoint (``experiment=teacher``).
        teacher_model: if given, the architecture the checkpoint must hold.
        temperature: softmax temperature ``T > 0`` of the soft targets (KD).
        alpha: weight of the soft (teacher) term; ``1 - alpha`` weights the hard labels (KD).
        distiller: the method, any callable with the interface of :mod:`kdlight.distillers`
            (e.g. ``DKD()`` or a user's own); an ``nn.Module`` method's own parameters are
            trained with the student and saved in its checkpoints. ``None``: KD at
            ``temperature`` and ``alpha``.
        optimizer, scheduler, num_classes, class_names, compile, channels_last: as for
            ``ClassifierModule`` (compile and channels_last apply to the teacher too).
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        teacher_model: str | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        distiller: Callable[..., dict[str, Tensor]] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            model, optimizer, scheduler, num_classes, class_names, compile, channels_last
        )
        if distiller is None:
            distiller = KD(temperature, alpha)
        if isinstance(distiller, KD):
            check_distillation_settings(distiller.temperature, distiller.alpha)
        self.save_hyperparameters(
            ignore=["model", "teacher", "optimizer", "scheduler", "distiller"]
        )
        self.attach_teacher(
            teacher, teacher_checkpoint, teacher_model, num_classes, compile, channels_last
        )
        self.distiller = distiller  # an nn.Module one is a child: trained, saved, restored

    @property
    def student(self) -> nn.Module:
        return self.model

    @property
    def temperature(self) -> float | None:
        """The method's temperature (KD's T; None for a method without one)."""
        return getattr(self.distiller, "temperature", None)

    @property
    def alpha(self) -> float | None:
        """The method's alpha (KD's weight of the soft term; None for a method without one)."""
        return getattr(self.distiller, "alpha", None)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        with torch.no_grad():
            teacher = Outputs(self.fast_teacher(images))
        student = Outputs(self.fast_model(images))
        parts = self.distiller(student, teacher, labels, epoch=self.current_epoch)
        self.train_acc.update(student.logits, labels)
        self.log_training(parts, len(labels))
        return parts  # the parts too, so that a non-finite loss can be reported with them

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.test_teacher(*batch)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and the method's own (a connector's), never the teacher's."""
        own = self.distiller.parameters() if isinstance(self.distiller, nn.Module) else []
        return [*self.model.parameters(), *own]

    def metrics_record(self, summary: dict) -> dict:
        """The method and its settings; KD's T and alpha also at the top (the report's grid)."""
        record = super().metrics_record(summary)
        if isinstance(self.distiller, KD):
            record |= {"temperature": self.distiller.temperature, "alpha": self.distiller.alpha}
        record |= {
            "distiller": method_name(self.distiller),
            "distiller_settings": method_settings(self.distiller),
        }
        return record | self.teacher_record()
