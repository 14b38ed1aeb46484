"""``DistillationModule``: train a student from a frozen teacher with a distillation method
(:mod:`kdlight.distillers`; Hinton et al.'s KD by default)."""

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from kdlight.distillers import KD
from kdlight.errors import KDLightError
from kdlight.lit.base import (
    ClassificationSystem,
    OptimizerFactory,
    SchedulerFactory,
    probe_classes,
)
from kdlight.lit.cached_teacher import TeacherCacheMixin
from kdlight.lit.methods import MethodSlot, attach_training_data, teacher_taps
from kdlight.lit.teacher import FrozenTeacherMixin, built_teacher_model


class DistillationModule(TeacherCacheMixin, FrozenTeacherMixin, ClassificationSystem):
    """Distil a frozen teacher into ``model`` (the student) with a distillation method:
    :class:`kdlight.distillers.KD` (:func:`kdlight.losses.kd_loss`) at ``temperature`` and
    ``alpha`` unless another ``distiller`` is given.

    A method that reads features gets them from forward hooks on the student's and the
    teacher's modules (:mod:`kdlight.models.taps`), its connectors are built from their shapes here,
    and a method that needs each image's index gets it from the data module (its training
    batches are then ``(images, labels, indices)``).

    The teacher is frozen for good, and kept out of the student's checkpoints (see
    :class:`~kdlight.lit.teacher.FrozenTeacherMixin`). ``load_from_checkpoint`` restores the
    whole system, teacher included (read again from ``teacher_checkpoint``); to evaluate or
    reuse the trained student alone, ``kdlight.load_model(checkpoint)`` rebuilds it from the
    checkpoint without any teacher.

    Args:
        model: the student.
        teacher: a teacher module; if omitted it is restored from ``teacher_checkpoint``.
        teacher_checkpoint: a ``ClassifierModule`` checkpoint (``experiment=teacher``).
        teacher_model: the teacher's architecture: a registered name (which a kdlight
            checkpoint must hold), a model config with ``_target_`` or a built ``nn.Module``,
            for a checkpoint that does not record its model (see
            :func:`~kdlight.lit.load_teacher`).
        temperature: softmax temperature ``T > 0`` of the soft targets (KD).
        alpha: weight of the soft (teacher) term; ``1 - alpha`` weights the hard labels (KD).
        distiller: the method, any callable with the interface of
            :mod:`kdlight.distillers.base` (e.g. ``DKD()``, ``FitNet()`` or a user's own); an
            ``nn.Module`` method's own parameters (connectors) are trained with the student
            and saved in its checkpoints. ``None``: KD at ``temperature`` and ``alpha``.
        input_shape: one image's shape, for the forward passes that measure the tapped
            features' shapes (feature methods only) and how many classes the student and
            the teacher predict (which must be one number, and the data's).
        teacher_cache: look the teacher's logits up in a cache on disk, by training image
            and augmentation, and run the teacher only for the misses
            (:mod:`kdlight.teacher.cache`); methods that read the teacher's features keep
            running it live.
        optimizer, scheduler, num_classes, class_names, compile, channels_last: as for
            ``ClassifierModule`` (compile and channels_last apply to the teacher too;
            ``num_classes``, measured from the student when not given, is the teacher's too).
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        teacher_model: str | Mapping | nn.Module | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        distiller: Callable[..., dict[str, Tensor]] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        input_shape: tuple[int, ...] = (3, 32, 32),
        teacher_cache: bool = False,
    ) -> None:
        super().__init__(
            model, optimizer, scheduler, num_classes, class_names, compile, channels_last,
            input_shape,
        )  # fmt: skip
        num_classes = self.num_classes  # measured from the student when not given
        if distiller is None:
            distiller = KD(temperature, alpha)
        self.save_hyperparameters(
            ignore=[
                "model",
                "teacher",
                "optimizer",
                "scheduler",
                "distiller",
                *built_teacher_model(teacher_model),
            ]
        )
        self.attach_teacher(
            teacher, teacher_checkpoint, teacher_model, num_classes, compile, channels_last
        )
        teacher_classes = probe_classes(self.teacher, input_shape)
        if teacher_classes not in (None, num_classes):
            raise KDLightError(
                f"the teacher ({type(self.teacher).__name__}) predicts {teacher_classes} "
                f"classes and the student ({type(model).__name__}) {num_classes}: distil "
                "between models made for the same classes"
            )
        self.slot = MethodSlot(distiller, model, self.teacher, input_shape)
        self.teacher_taps = teacher_taps(self.teacher, [self.slot])
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

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            attach_training_data(self.trainer, [self.slot])
            if self.hparams.teacher_cache:
                self.open_teacher_cache([self.slot])

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor]:
        images, labels, *extra = batch
        index = extra[0] if extra else None  # (indices, augmentation) when asked for
        teacher = self.teacher_outputs(images, extra)
        logits, parts = self.slot.step(
            self.fast_model, images, labels, teacher, self.current_epoch, index
        )
        self.train_acc.update(logits, labels)
        self.log_training(parts, len(labels))
        return parts  # the parts too, so that a non-finite loss can be reported with them

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.test_teacher(*batch)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and the method's own (a connector's), never the teacher's."""
        return [*self.model.parameters(), *self.slot.parameters()]

    def metrics_record(self, summary: dict) -> dict:
        """The method, its settings and taps; KD's T and alpha also at the top."""
        record = super().metrics_record(summary) | self.slot.record() | self.teacher_record()
        return record | self.teacher_cache_record()
