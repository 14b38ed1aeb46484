"""A distillation method at work on one student, the same in a single run and in every
cell of a grid (:class:`MethodSlot`), and the training data a method may need
(:func:`attach_training_data`)."""

from collections.abc import Sequence

import lightning as L
from torch import Tensor, nn

from kdlight.config.settings import check, check_one_process
from kdlight.distillers import KD, Outputs, method_name, method_settings, resolve_taps
from kdlight.distillers.base import own_random_stream
from kdlight.errors import KDLightError
from kdlight.models.fast import FastForward
from kdlight.models.taps import FeatureTaps, probe_shapes


class MethodSlot:
    """``method`` distilling ``teacher`` into ``student``.

    On creation: the student's modules the method reads are hooked (:class:`FeatureTaps`),
    the teacher's are named in :attr:`teacher_names` (the system hooks the teacher once for
    all its students), the method's ``read_teacher`` reads what it needs of the teacher's
    weights, and its ``build`` makes its connectors from the tapped shapes, with random
    numbers of its own (so a connector starts the same in a separate run and in a grid
    cell, and the run's random stream is left as a KD run's).
    """

    def __init__(
        self,
        method,
        student: nn.Module,
        teacher: nn.Module,
        input_shape: Sequence[int] = (3, 32, 32),
    ) -> None:
        if isinstance(method, KD):  # the command line's one-line error for T or alpha
            check("distill", temperature=method.temperature, alpha=method.alpha)
        self.method = method
        self.needs_index = bool(getattr(method, "needs_index", False))
        self.needs_strong_view = bool(getattr(method, "needs_strong_view", False))
        student_names, self.teacher_names = resolve_taps(method, student, teacher)
        self.student_taps = FeatureTaps(student, student_names, "student")
        teacher_taps = FeatureTaps(teacher, self.teacher_names, "teacher")  # checks the names
        read_teacher = getattr(method, "read_teacher", None)
        if callable(read_teacher):
            read_teacher(teacher, list(self.teacher_names))
        build = getattr(method, "build", None)
        if callable(build):
            shapes = (
                probe_shapes(student, self.student_taps, input_shape),
                probe_shapes(teacher, teacher_taps, input_shape),
            )
            with own_random_stream():
                build(*shapes)
        teacher_taps.remove()

    def step(
        self,
        student: FastForward,
        images: Tensor,
        labels: Tensor,
        teacher: Outputs,
        epoch: int,
        index: Tensor | None = None,
        strong: tuple[Tensor, Outputs] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's logits on ``images`` and the method's parts, given the teacher's
        outputs (its features of every slot, by name: this method sees its own). A method
        that ``needs_strong_view`` is also given the student's and the teacher's outputs of
        the strong view, ``strong`` (its images and the teacher's outputs): the student
        runs on it after the weak view, as MLKD's official code runs it."""
        with self.student_taps.capture() as features:
            logits = student(images)
        extra = {"index": index} if self.needs_index else {}
        if self.needs_strong_view:
            strong_images, strong_teacher = strong
            with self.student_taps.capture() as strong_features:
                strong_logits = student(strong_images)
            extra["student_strong"] = Outputs(strong_logits, strong_features)
            extra["teacher_strong"] = self._seen(strong_teacher)
        parts = self.method(
            Outputs(logits, features), self._seen(teacher), labels, epoch=epoch, **extra
        )
        return logits, parts

    def _seen(self, teacher: Outputs) -> Outputs:
        """The teacher's outputs this method reads: the logits and its own taps."""
        return Outputs(
            teacher.logits, {name: teacher.features[name] for name in self.teacher_names}
        )

    def parameters(self) -> list[nn.Parameter]:
        """The method's own parameters (its connectors'), trained with the student."""
        return list(self.method.parameters()) if isinstance(self.method, nn.Module) else []

    def record(self) -> dict:
        """The method's part of ``metrics.json``: its name and settings, the modules it
        read, and KD's T and alpha at the top (the report's T x alpha grid)."""
        record = {}
        if isinstance(self.method, KD):
            record = {"temperature": self.method.temperature, "alpha": self.method.alpha}
        record |= {
            "distiller": method_name(self.method),
            "distiller_settings": method_settings(self.method),
        }
        if self.student_taps.names or self.teacher_names:
            record["taps"] = {"student": self.student_taps.names, "teacher": self.teacher_names}
        return record


def attach_training_data(trainer: L.Trainer, slots: Sequence[MethodSlot]) -> None:
    """For the methods that need each image's index (``needs_index``): ask the data module
    for indices (its training batches become ``(images, labels, indices)``) and give each
    method the training set's labels. Such a method trains on one process unless it says
    ``supports_ddp``. For the methods that train on a second, strongly augmented view
    (``needs_strong_view``): ask the data module for it (its training batches end with
    it); a data module that another system asked before is told again to leave it out
    where no method needs it. Called from the systems' ``setup("fit")``."""
    datamodule = trainer.datamodule
    strong = [slot for slot in slots if slot.needs_strong_view]
    if strong and not hasattr(datamodule, "with_strong_view"):
        raise KDLightError(
            f"distiller={method_name(strong[0].method)} trains on a strongly augmented second "
            "view of each image: use a data module with with_strong_view, such as kdlight's "
            "CIFAR100DataModule"
        )
    if hasattr(datamodule, "with_strong_view"):
        datamodule.with_strong_view = bool(strong)
    for slot in [slot for slot in slots if slot.needs_index]:
        check_one_process(slot.method, trainer.num_devices, trainer.num_nodes)
        labels = getattr(datamodule, "train_labels", None)
        if labels is None or not hasattr(datamodule, "with_index"):
            raise KDLightError(
                f"distiller={method_name(slot.method)} needs each training image's index: use "
                "a data module with with_index and train_labels, such as kdlight's "
                "CIFAR10DataModule"
            )
        datamodule.with_index = True
        slot.method.attach_data(labels)
