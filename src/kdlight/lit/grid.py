"""``DistillationGridModule``: many students trained together, one per cell: a T x alpha
grid of KD, or a set of methods (``methods``), or both.

Every cell of the grid is an independent student with its own method, loss, BatchNorm
statistics, metrics, best epoch and optimizer state; what they share is the batch and one
teacher forward per batch (its features computed once, for every cell that reads them),
which is most of the cost of separate runs. A cell's method works through the same
:class:`~kdlight.lit.methods.MethodSlot` as a single ``DistillationModule`` run. The optimizer is one
instance over all students' parameters: SGD and AdamW update each parameter from its own
gradient and state, the summed loss gives each student exactly the gradient of its own
loss, and gradient clipping by norm clips each student's gradient on its own, so every
student follows the same trajectory as its separate ``DistillationModule`` run.
"""

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from kdlight.distillers import KD, method_name
from kdlight.errors import KDLightError
from kdlight.lit.base import (
    FastForward,
    OptimizerFactory,
    SchedulerFactory,
    TrainingLog,
    build_optimizers,
    reference_sgd,
)
from kdlight.lit.cached_teacher import TeacherCacheMixin
from kdlight.lit.methods import MethodSlot, attach_training_data, teacher_taps
from kdlight.lit.results import (
    default_class_names,
    format_report,
    student_record,
    summarize_confusion,
    tested_checkpoint,
    write_metrics,
)
from kdlight.lit.teacher import FrozenTeacherMixin, built_teacher_model
from kdlight.losses import kd_loss
from kdlight.runs.identity import cell_name


def _as_list(values: float | Sequence[float]) -> list[float]:
    return [float(v) for v in values] if isinstance(values, Sequence) else [float(values)]


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model``'s weights and buffers, on their device (no wait for a GPU)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class DistillationGridModule(TeacherCacheMixin, FrozenTeacherMixin, TrainingLog, L.LightningModule):
    """One student per cell, all fed by one frozen teacher.

    Args:
        model: the student architecture; every cell starts from a copy of these weights,
            as separate runs with the same seed would.
        temperature, alpha: a value or a list each: KD cells, the grid of their product.
        distiller: a :class:`kdlight.distillers.KD` (its ``standardize`` applies to every
            KD cell; T and alpha are the grid's) or None.
        methods: cells of any methods instead, by cell name (e.g. ``{"kd": KD(),
            "fitnet": FitNet()}``; Hydra: ``experiment=method_grid``): each cell is the
            method's ``experiment=distill distiller=<method>`` run. When given,
            ``temperature`` and ``alpha`` are not used.
        teacher, teacher_checkpoint, teacher_model, optimizer, scheduler, num_classes,
        class_names, compile, channels_last, input_shape: as for ``DistillationModule``.
        teacher_cache: as for ``DistillationModule``: the teacher's logits, which every cell
            shares, are looked up in the cache and computed only for the misses (when no
            cell's method reads the teacher's features), so seeds and relaunches of a grid
            share one teacher's work too.

    Each cell's results go to ``<run dir>/<cell>/metrics.json`` (``T<T>_alpha<alpha>`` for a
    KD grid, the method's name for ``methods``), the layout of a multirun, so
    ``kdlight-report`` reads both alike. When every cell is KD the cells' losses are
    computed in one pass.

    Each cell keeps its own best: its best validation accuracy (``val/acc_best_<cell>``)
    and its student's weights at that epoch, both kept in the grid's checkpoints so that
    they survive a resume. ``test_weights`` says which weights each cell is tested with:
    ``"last"`` (the weights the Trainer tests: in memory, or of the checkpoint it loads)
    or ``"best"`` (each cell's own best epoch; a cell without one, when nothing was
    validated, is tested with the last). The grid's ``best.ckpt`` is chosen on the mean
    accuracy of all cells, one epoch for all of them, so it is not what ``"best"`` means
    here: test with the weights in memory (``ckpt_path=None``) or the grid's ``last.ckpt``.
    ``run_record``: the run's identity, as for the other systems, in every cell's ``metrics.json``.
    """

    run_record: dict | None = None
    test_weights: str = "last"

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        teacher_model: str | Mapping | nn.Module | None = None,
        temperature: float | Sequence[float] | None = (1, 2, 4, 8, 16),
        alpha: float | Sequence[float] | None = (0.1, 0.5, 0.9),
        distiller: KD | None = None,
        methods: Mapping[str, object] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        input_shape: tuple[int, ...] = (3, 32, 32),
        teacher_cache: bool = False,
    ) -> None:
        super().__init__()
        if methods:
            self.names, cell_methods = list(methods), list(methods.values())
            temperature = alpha = None
        else:
            if distiller is not None and not isinstance(distiller, KD):
                name = method_name(distiller)
                raise KDLightError(
                    f"the fused T x alpha grid trains KD cells, not distiller={name}: for "
                    f"cells of other methods use experiment=method_grid (or run "
                    f"kdlight-train -m experiment=distill distiller={name})"
                )
            standardize = bool(distiller and distiller.standardize)
            # plain lists in the hyperparameters (not Hydra's ListConfig), so that the
            # grid's checkpoints load with torch.load(weights_only=True), as load_model does
            temperature, alpha = _as_list(temperature), _as_list(alpha)
            product = [(t, a) for t in temperature for a in alpha]
            self.names = [cell_name(t, a) for t, a in product]  # made once, used every step
            cell_methods = [KD(t, a, standardize) for t, a in product]
        if len(set(self.names)) != len(self.names) or not self.names:
            raise KDLightError(f"the grid's cells need distinct names, got {self.names}")
        self.save_hyperparameters(
            ignore=["model", "teacher", "optimizer", "scheduler", "distiller", "methods"]
            + built_teacher_model(teacher_model)
        )
        self.attach_teacher(
            teacher, teacher_checkpoint, teacher_model, num_classes, compile, channels_last
        )
        self.students = nn.ModuleList(copy.deepcopy(model) for _ in self.names)
        self.fast_students = [FastForward(s, compile, channels_last) for s in self.students]
        self.slots = [
            MethodSlot(method, student, self.teacher, input_shape)
            for method, student in zip(cell_methods, self.students, strict=True)
        ]
        self.teacher_taps = teacher_taps(self.teacher, self.slots)
        # the methods are children (trained, saved, restored); a plain callable holds no state
        self.methods = nn.ModuleList(
            m if isinstance(m, nn.Module) else nn.Identity() for m in cell_methods
        )
        #: each cell's (temperature, alpha), None for a method without them
        self.cells = [
            (getattr(m, "temperature", None), getattr(m, "alpha", None)) for m in cell_methods
        ]
        self.fused_kd = self._fusable(cell_methods)
        if self.fused_kd:  # each cell's T and alpha, for the loss of all students in one pass
            temperatures = torch.tensor([t for t, _ in self.cells])
            self.register_buffer("temperatures", temperatures, persistent=False)
            self.register_buffer(
                "alphas", torch.tensor([a for _, a in self.cells]), persistent=False
            )
            self.standardize = cell_methods[0].standardize
        self.optimizer_factory = optimizer or reference_sgd
        self.scheduler_factory = scheduler
        self.class_names = default_class_names(num_classes, class_names)
        cells = range(len(self.names))
        self.val_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes, average="micro") for _ in cells
        )
        self.val_acc_best = nn.ModuleList(MaxMetric() for _ in cells)
        for best in self.val_acc_best:
            best.persistent(True)  # in checkpoints: a resumed run keeps each cell's best
        #: each cell's student weights at its best validation epoch, and that epoch
        self.best_weights: dict[str, dict[str, Tensor]] = {}
        self.best_epochs: dict[str, int] = {}
        self.test_confusion = nn.ModuleList(MulticlassConfusionMatrix(num_classes) for _ in cells)
        self.test_summaries: dict[str, dict] = {}
        self.tested_weights: dict[str, str | None] = {}
        self._last_weights: dict[str, dict[str, Tensor]] = {}

    @staticmethod
    def _fusable(methods: list) -> bool:
        """Plain KD in every cell, one standardization: one ``kd_loss`` call for all."""
        kinds = {(type(m), getattr(m, "standardize", None)) for m in methods}
        return len(kinds) == 1 and next(iter(kinds))[0] is KD

    def forward(self, images: Tensor) -> Tensor:
        """Logits of every student, ``(cells, N, classes)``, as evaluation computes them."""
        return torch.stack([student.eager(images) for student in self.fast_students])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            attach_training_data(self.trainer, self.slots)
            if self.hparams.teacher_cache:
                self.open_teacher_cache(self.slots)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor]:
        images, labels, *extra = batch
        index = extra[0] if extra else None  # (indices, augmentation) when asked for
        teacher = self.teacher_outputs(images, extra)
        if self.fused_kd:
            logits = torch.stack([student(images) for student in self.fast_students])
            losses = kd_loss(
                logits, teacher.logits, labels, self.temperatures, self.alphas, self.standardize
            )["loss"]
        else:
            losses = torch.stack(
                [
                    slot.step(student, images, labels, teacher, self.current_epoch, index)[1][
                        "loss"
                    ]
                    for slot, student in zip(self.slots, self.fast_students, strict=True)
                ]
            )
        self.log_training(
            {"loss": losses.mean()}
            | {f"loss_{n}": v for n, v in zip(self.names, losses, strict=True)},
            len(labels),
        )
        # the sum gives each student the gradient of its own loss; the cells' losses are
        # returned too, so that a non-finite loss is reported with the cell it came from
        return {"loss": losses.sum()} | dict(zip(self.names, losses, strict=True))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each student's gradient norm on its own, as its separate run clips it.

        Lightning's clipping takes one norm over every parameter of the optimizer: over all
        students, so each cell would be scaled by the others' gradients and leave its
        separate run's trajectory. A cell's norm covers its student and its method's
        connectors, as its separate run's does. Clipping by value acts on each element,
        which is the same for one student or many.
        """
        algorithm = gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm"
        by_norm = GradClipAlgorithmType(algorithm.lower()) is GradClipAlgorithmType.NORM
        if not gradient_clip_val or not by_norm:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for student, slot in zip(self.students, self.slots, strict=True):
            torch.nn.utils.clip_grad_norm_(
                [*student.parameters(), *slot.parameters()], gradient_clip_val
            )

    # ------------------------------------------------------------------ validation
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
        before = torch.stack([best.max_value.to(accuracies) for best in self.val_acc_best])
        for name, best, accuracy in zip(self.names, self.val_acc_best, accuracies, strict=True):
            best(accuracy)
            self.log(f"val/acc_best_{name}", best.compute(), sync_dist=True)
        # a strictly better epoch, as ModelCheckpoint(mode="max") decides; one read per epoch
        improved = (accuracies > before).tolist()
        for name, student, better in zip(self.names, self.students, improved, strict=True):
            if better:
                self.best_weights[name] = _copy_state(student)
                self.best_epochs[name] = self.current_epoch

    # ------------------------------------------------------------------ testing
    def on_test_start(self) -> None:
        """With ``test_weights="best"``, give each student its own best weights (the last
        ones come back in :meth:`on_test_end`)."""
        super().on_test_start()
        if self.test_weights not in ("last", "best"):
            raise KDLightError(f"test_ckpt must be last or best, got {self.test_weights!r}")
        loaded = tested_checkpoint(self.trainer)
        self.tested_weights = dict.fromkeys(self.names, loaded)
        self._last_weights = {}
        if self.test_weights == "last":
            return
        for name, student in zip(self.names, self.students, strict=True):
            if name in self.best_weights:
                self._last_weights[name] = _copy_state(student)
                student.load_state_dict(self.best_weights[name])
                self.tested_weights[name] = "best"

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        for confusion, logits in zip(self.test_confusion, self(images), strict=True):
            confusion.update(logits, labels)
        self.test_teacher(images, labels)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()  # the teacher's accuracy, when it was not measured here
        for name, slot, confusion, best in zip(
            self.names, self.slots, self.test_confusion, self.val_acc_best, strict=True
        ):
            summary = summarize_confusion(confusion.compute(), self.class_names)
            confusion.reset()
            if summary["accuracy"] is not None:
                self.log(f"test/acc_{name}", summary["accuracy"] / 100.0, sync_dist=True)
            self.test_summaries[name] = summary
            if self.trainer.is_global_zero:
                metrics = Path(self.trainer.default_root_dir) / name / "metrics.json"
                print(f"[{name}] {format_report(summary, metrics)}", flush=True)
                write_metrics(
                    metrics,
                    self._record(name, slot, summary, best),
                    self.run_record,
                )

    def on_test_end(self) -> None:
        """Put the last weights back where the best ones were tested."""
        super().on_test_end()
        for name, student in zip(self.names, self.students, strict=True):
            if name in self._last_weights:
                student.load_state_dict(self._last_weights.pop(name))

    def _record(self, name: str, slot: MethodSlot, summary: dict, best: MaxMetric) -> dict:
        """A cell's ``metrics.json``: what a single run of its method writes."""
        tested = self.tested_weights.get(name)
        record = student_record(self, self.students[0], summary, best, tested)
        return record | slot.record() | self.teacher_record() | self.teacher_cache_record()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what rebuilds a cell's student without the teacher (``kdlight.load_model``)
        and each cell's best weights and epoch, so that a resumed grid still has them."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["kdlight"] = {
            "model_spec": getattr(self.students[0], "spec", None),
            "class_names": list(self.class_names),
            "cells": list(self.names),
            "best_students": {
                name: {
                    "epoch": self.best_epochs[name],
                    "state_dict": {k: v.cpu() for k, v in weights.items()},
                }
                for name, weights in self.best_weights.items()
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        best = checkpoint.get("kdlight", {}).get("best_students", {})
        self.best_weights = {name: record["state_dict"] for name, record in best.items()}
        self.best_epochs = {name: record["epoch"] for name, record in best.items()}

    def configure_optimizers(self):
        parameters = [*self.students.parameters()]
        parameters += [p for slot in self.slots for p in slot.parameters()]
        return build_optimizers(self.optimizer_factory, self.scheduler_factory, parameters)
