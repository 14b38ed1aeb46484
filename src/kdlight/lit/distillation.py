"""``DistillationModule``: train a student on a frozen teacher's soft targets (Hinton et al., 2015)."""

import torch
from torch import Tensor, nn

from kdlight.errors import KDLightError
from kdlight.lit.base import ClassificationSystem, OptimizerFactory, SchedulerFactory
from kdlight.lit.teacher import FrozenTeacherMixin
from kdlight.losses import kd_loss


def check_distillation_settings(temperature: float, alpha: float) -> None:
    """Raise a one-line :class:`KDLightError` for a temperature or alpha out of range."""
    if not temperature > 0:
        raise KDLightError(f"distill.temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise KDLightError(
            f"distill.alpha must be in [0, 1] (the weight of the teacher's soft term), got {alpha}"
        )


class DistillationModule(FrozenTeacherMixin, ClassificationSystem):
    """Distil a frozen teacher into ``model`` (the student) with :func:`kdlight.losses.kd_loss`.

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
        temperature: softmax temperature ``T > 0`` of the soft targets.
        alpha: weight of the soft (teacher) term; ``1 - alpha`` weights the hard labels.
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
        check_distillation_settings(temperature, alpha)
        self.save_hyperparameters(ignore=["model", "teacher", "optimizer", "scheduler"])
        self.attach_teacher(
            teacher, teacher_checkpoint, teacher_model, num_classes, compile, channels_last
        )
        self.temperature = temperature
        self.alpha = alpha

    @property
    def student(self) -> nn.Module:
        return self.model

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        with torch.no_grad():
            teacher_logits = self.fast_teacher(images)
        logits = self.fast_model(images)
        parts = kd_loss(logits, teacher_logits, labels, self.temperature, self.alpha)
        self.train_acc.update(logits, labels)
        self.log_training(parts, len(labels))
        return parts  # the parts too, so that a non-finite loss can be reported with them

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.test_teacher(*batch)

    def metrics_record(self, summary: dict) -> dict:
        return {
            **super().metrics_record(summary),
            "temperature": self.temperature,
            "alpha": self.alpha,
            **self.teacher_record(),
        }
