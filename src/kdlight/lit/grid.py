"""``DistillationGridModule``: a whole T x alpha grid of students trained together.

Every cell of the grid is an independent student with its own loss, BatchNorm statistics,
metrics and optimizer state; what they share is the batch and one teacher forward per
batch, which is most of the cost of separate runs. The optimizer is one instance over all
students' parameters: SGD and AdamW update each parameter from its own gradient and
state, and the summed loss gives each student exactly the gradient of its own loss, so
every student follows the same trajectory as its separate ``DistillationModule`` run.
"""

import copy
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from kdlight.data.sources import CIFAR10_CLASSES
from kdlight.lit.base import (
    FastForward,
    OptimizerFactory,
    SchedulerFactory,
    TrainingLog,
    build_optimizers,
    reference_sgd,
)
from kdlight.lit.distillation import check_distillation_settings
from kdlight.lit.results import format_report, summarize_confusion, write_metrics
from kdlight.lit.teacher import FrozenTeacherMixin
from kdlight.losses import kd_loss


def cell_name(temperature: float, alpha: float) -> str:
    """A cell's directory and metric suffix, as a multirun of ``experiment=distill`` names it."""
    return f"T{temperature:g}_alpha{alpha:g}"


def _as_list(values: float | Sequence[float]) -> list[float]:
    return [float(v) for v in values] if isinstance(values, Sequence) else [float(values)]


class DistillationGridModule(FrozenTeacherMixin, TrainingLog, L.LightningModule):
    """One student per (temperature, alpha) cell, all fed by one frozen teacher.

    Args:
        model: the student architecture; every cell starts from a copy of these weights,
            as separate runs with the same seed would.
        temperature, alpha: a value or a list each; the grid is their product.
        teacher, teacher_checkpoint, teacher_model, optimizer, scheduler, num_classes,
        class_names, compile, channels_last: as for ``DistillationModule``.

    Each cell's results go to ``<run dir>/T<T>_alpha<alpha>/metrics.json``, the layout of a
    ``experiment=distill`` multirun, so ``kdlight-report`` reads both alike.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        teacher_model: str | None = None,
        temperature: float | Sequence[float] = (1, 2, 4, 8, 16),
        alpha: float | Sequence[float] = (0.1, 0.5, 0.9),
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.cells = [(t, a) for t in _as_list(temperature) for a in _as_list(alpha)]
        for t, a in self.cells:
            check_distillation_settings(t, a)
        self.names = [cell_name(t, a) for t, a in self.cells]  # made once, used every step
        self.save_hyperparameters(ignore=["model", "teacher", "optimizer", "scheduler"])
        self.attach_teacher(
            teacher, teacher_checkpoint, teacher_model, num_classes, compile, channels_last
        )
        # each cell's T and alpha, for the loss of all students in one pass
        self.register_buffer(
            "temperatures", torch.tensor([t for t, _ in self.cells]), persistent=False
        )
        self.register_buffer("alphas", torch.tensor([a for _, a in self.cells]), persistent=False)
        self.students = nn.ModuleList(copy.deepcopy(model) for _ in self.cells)
        self.fast_students = [FastForward(s, compile, channels_last) for s in self.students]
        self.optimizer_factory = optimizer or reference_sgd
        self.scheduler_factory = scheduler
        self.class_names = tuple(class_names or CIFAR10_CLASSES[:num_classes])
        cells = range(len(self.cells))
        self.val_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes, average="micro") for _ in cells
        )
        self.val_acc_best = nn.ModuleList(MaxMetric() for _ in cells)
        self.test_confusion = nn.ModuleList(MulticlassConfusionMatrix(num_classes) for _ in cells)
        self.test_summaries: dict[str, dict] = {}

    def forward(self, images: Tensor) -> Tensor:
        """Logits of every student, ``(cells, N, classes)``, as evaluation computes them."""
        return torch.stack([student.eager(images) for student in self.fast_students])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        with torch.no_grad():
            teacher_logits = self.fast_teacher(images)
        logits = torch.stack([student(images) for student in self.fast_students])
        losses = kd_loss(logits, teacher_logits, labels, self.temperatures, self.alphas)["loss"]
        self.log_training(
            {"loss": losses.mean()}
            | {f"loss_{n}": v for n, v in zip(self.names, losses, strict=True)},
            len(labels),
        )
        # the sum gives each student the gradient of its own loss; the cells' losses are
        # returned too, so that a non-finite loss is reported with the cell it came from
        return {"loss": losses.sum()} | dict(zip(self.names, losses, strict=True))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        for name, metric, logits in zip(self.names, self.val_acc, self(images), strict=True):
            metric(logits, labels)
            self.log(f"val/acc_{name}", metric)

    def on_validation_epoch_end(self) -> None:
        accuracies = torch.stack([metric.compute() for metric in self.val_acc])
        self.log(
            "val/acc", accuracies.mean(), prog_bar=True, sync_dist=True
        )  # what checkpoints monitor
        if self.trainer.sanity_checking:
            return
        for name, best, accuracy in zip(self.names, self.val_acc_best, accuracies, strict=True):
            best(accuracy)
            self.log(f"val/acc_best_{name}", best.compute(), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        for confusion, logits in zip(self.test_confusion, self(images), strict=True):
            confusion.update(logits, labels)
        with torch.no_grad():
            self.teacher_test_acc(self.fast_teacher.eager(images), labels)
        self.log("test/teacher_acc", self.teacher_test_acc)

    def on_test_epoch_end(self) -> None:
        for name, (t, a), confusion, best in zip(
            self.names, self.cells, self.test_confusion, self.val_acc_best, strict=True
        ):
            summary = summarize_confusion(confusion.compute(), self.class_names)
            confusion.reset()
            self.log(f"test/acc_{name}", summary["accuracy"] / 100.0, sync_dist=True)
            self.test_summaries[name] = summary
            if self.trainer.is_global_zero:
                print(f"[{name}] {format_report(summary)}", flush=True)
                write_metrics(
                    Path(self.trainer.default_root_dir) / name / "metrics.json",
                    self._record(t, a, summary, best),
                )

    def _record(self, temperature: float, alpha: float, summary: dict, best: MaxMetric) -> dict:
        spec = getattr(self.students[0], "spec", {})
        return {
            "system": type(self).__name__,
            "model": spec.get("name", type(self.students[0]).__name__),
            "epochs": self.trainer.max_epochs,
            **summary,
            "val_acc_best": 100.0 * float(best.compute()) if best.update_called else None,
            "temperature": temperature,
            "alpha": alpha,
            **self.teacher_record(),
        }

    def configure_optimizers(self):
        return build_optimizers(
            self.optimizer_factory, self.scheduler_factory, list(self.students.parameters())
        )
