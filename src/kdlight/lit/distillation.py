"""The distillation systems: students trained from one frozen teacher with a distillation
method (:mod:`kdlight.distillers`; Hinton et al.'s KD by default). ``DistillationSystem``
is what one student (``DistillationModule``) and a grid of them
(:class:`~kdlight.lit.grid.DistillationGridModule`) share."""

import inspect
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from kdlight.distillers import KD, Outputs, method_name
from kdlight.errors import KDLightError
from kdlight.lit.base import (
    ClassificationSystem,
    Evaluated,
    OptimizerFactory,
    SchedulerFactory,
    probe_classes,
)
from kdlight.lit.methods import MethodSlot, attach_training_data
from kdlight.teacher import FrozenTeacher, load_teacher


class DistillationSystem(ClassificationSystem):
    """Students, each with its method (``methods``, one each; ``cells`` names a grid's),
    distilled from one frozen teacher: ``teacher``, or the one restored from
    ``teacher_checkpoint``. The other arguments are ``DistillationModule``'s.

    Each method works through a :class:`~kdlight.lit.methods.MethodSlot`. The teacher is
    the child ``teacher`` (it moves with the system), held with its taps, cache and test
    accuracy as a :class:`~kdlight.teacher.FrozenTeacher` (``self.frozen``) that the hooks
    here call: in eval mode after every ``train()`` call, never in the optimizer, and not
    in the students' checkpoints (``__init__`` reads it again from ``teacher_checkpoint``).
    """

    def __init__(
        self,
        model: nn.Module,
        methods: Sequence[Callable[..., dict[str, Tensor]]],
        teacher: nn.Module | None,
        teacher_checkpoint: str | None,
        teacher_model: str | Mapping | nn.Module | None,
        optimizer: OptimizerFactory | None,
        scheduler: SchedulerFactory | None,
        num_classes: int | None,
        class_names: list[str] | None,
        compile: bool,
        channels_last: bool,
        input_shape: tuple[int, ...],
        teacher_cache: bool,
        cells: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            model, optimizer, scheduler, num_classes, class_names, compile, channels_last,
            input_shape, cells,
        )  # fmt: skip
        # the hyperparameters: the arguments of the concrete system, whose __init__ calls this,
        # but its modules (a teacher_model too, when Hydra built it from a config's _target_)
        ignored = ["model", "teacher", "optimizer", "scheduler", "distiller", "methods"]
        built_model = ["teacher_model"] if isinstance(teacher_model, nn.Module) else []
        self.save_hyperparameters(ignore=ignored + built_model, frame=inspect.currentframe().f_back)
        num_classes = self.num_classes  # measured from the student when not given
        if teacher is None:
            if not teacher_checkpoint:
                raise KDLightError(
                    f"{type(self).__name__} needs a teacher or distill.teacher_checkpoint=PATH"
                )
            teacher = load_teacher(teacher_checkpoint, teacher_model, num_classes)
        teacher_classes = probe_classes(teacher, input_shape)
        if teacher_classes not in (None, num_classes):
            raise KDLightError(
                f"the teacher ({type(teacher).__name__}) predicts {teacher_classes} "
                f"classes and the student ({type(model).__name__}) {num_classes}: distil "
                "between models made for the same classes"
            )
        self.teacher = teacher
        self.slots = [
            MethodSlot(method, evaluated.model, teacher, input_shape)
            for method, evaluated in zip(methods, self.evaluated, strict=True)
        ]
        taps = [name for slot in self.slots for name in slot.teacher_names]
        self.frozen = FrozenTeacher(
            teacher, teacher_checkpoint, num_classes, taps, compile, channels_last
        )
        self.teacher_cache = teacher_cache
        #: the methods that train on a strong view too, by name (the batches then end with it)
        self.strong_view_methods = [
            method_name(slot.method) for slot in self.slots if slot.needs_strong_view
        ]

    def train(self, mode: bool = True):
        """Switch the students' mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            attach_training_data(self.trainer, self.slots)
            if self.teacher_cache:
                live = [method_name(slot.method) for slot in self.slots if slot.teacher_names]
                strong = self.strong_view_methods
                self.frozen.open_cache(
                    self.trainer, live[0] if live else None, strong[0] if strong else None
                )

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self.frozen.announce(self)

    def on_train_start(self) -> None:
        self.frozen.end_quiet()  # Lightning's eval-mode check has run, just before this hook

    def on_fit_end(self) -> None:
        self.frozen.end_quiet()  # a fit that never reached on_train_start

    def on_train_epoch_start(self) -> None:
        self.frozen.start_epoch()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        hit_rate = self.frozen.end_epoch()
        if hit_rate is not None:
            self.log("train/teacher_cache_hit_rate", hit_rate, rank_zero_only=True)

    def take_strong_view(self, extra: list[Tensor]) -> tuple[Tensor, Outputs] | None:
        """The strong view at the end of a training batch's ``extra`` entries, taken off
        them, with the teacher's outputs of it, run live (the cache serves the weak view
        only); None where no method trains on it."""
        if not self.strong_view_methods:
            return None
        images = extra.pop()
        return images, self.frozen.live(images)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The students' parameters, then their methods' own (connectors'), never the teacher's."""
        return [*super().trainable_parameters(), *(p for s in self.slots for p in s.parameters())]

    # ------------------------------------------------------------------ testing
    def on_test_start(self) -> None:
        super().on_test_start()
        self.frozen.start_test(self.trainer)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.frozen.test(*batch)

    def on_test_epoch_end(self) -> None:
        accuracy = self.frozen.end_test(self.trainer)
        self.log("test/teacher_acc", accuracy / 100.0, sync_dist=True)
        super().on_test_epoch_end()

    def metrics_record(self, evaluated: Evaluated, summary: dict) -> dict:
        """A student's: the method, its settings and taps (KD's T and alpha also at the
        top), and the teacher's and its cache's parts."""
        slot = self.slots[self.evaluated.index(evaluated)]
        record = super().metrics_record(evaluated, summary) | slot.record()
        return record | self.frozen.record() | self.frozen.cache_record()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep student checkpoints student-sized: the teacher has its own checkpoint."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore with the teacher already read from ``teacher_checkpoint`` in ``__init__``."""
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].update(
            {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        )


class DistillationModule(DistillationSystem):
    """Distil a frozen teacher into ``model`` (the student) with a distillation method:
    :class:`kdlight.distillers.KD` (:func:`kdlight.losses.kd_loss`) at ``temperature`` and
    ``alpha`` unless another ``distiller`` is given.

    The method and the frozen teacher are held as :class:`DistillationSystem` says:
    ``load_from_checkpoint`` reads the teacher again from ``teacher_checkpoint``;
    ``kdlight.load_model(checkpoint)`` rebuilds the student alone.

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
        if distiller is None:
            distiller = KD(temperature, alpha)
        super().__init__(
            model, [distiller], teacher, teacher_checkpoint, teacher_model, optimizer,
            scheduler, num_classes, class_names, compile, channels_last, input_shape,
            teacher_cache,
        )  # fmt: skip
        self.distiller = distiller  # an nn.Module one is a child: trained, saved, restored
        (self.slot,) = self.slots

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

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor]:
        images, labels, *extra = batch
        strong = self.take_strong_view(extra)
        index = extra[0] if extra else None  # (indices, augmentation) when asked for
        teacher = self.frozen.outputs(images, extra)
        logits, parts = self.slot.step(
            self.fast_model, images, labels, teacher, self.current_epoch, index, strong
        )
        self.train_acc.update(logits, labels)
        self.log_training(parts, len(labels))
        return parts  # the parts too, so that a non-finite loss can be reported with them
