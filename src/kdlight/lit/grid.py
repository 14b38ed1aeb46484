"""``DistillationGridModule``: many students trained together, one per cell: a T x alpha
grid of KD, or a set of methods (``methods``), or both.

Every cell of the grid is an independent student with its own method, loss, BatchNorm
statistics, metrics, best epoch and optimizer state, trained and evaluated by the same code
as a single ``DistillationModule`` run (:class:`~kdlight.lit.distillation.DistillationSystem`);
what they share is the batch and one teacher forward per batch, which is most of the cost
of separate runs. The grid's own are the fused KD loss, the gradient clipping per cell and
each cell's best weights. The optimizer is one instance over all students' parameters: SGD
and AdamW update each parameter from its own gradient and state, and the summed loss gives
each student exactly the gradient of its own loss, so every student follows the same
trajectory as its separate run.
"""

from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn

from kdlight.config.settings import check
from kdlight.distillers import KD, method_name
from kdlight.errors import KDLightError
from kdlight.lit.base import OptimizerFactory, SchedulerFactory
from kdlight.lit.distillation import DistillationSystem
from kdlight.losses import kd_loss
from kdlight.runs.identity import cell_name


def _as_list(values: float | Sequence[float]) -> list[float]:
    return [float(v) for v in values] if isinstance(values, Sequence) else [float(values)]


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model``'s weights and buffers, on their device (no wait for a GPU)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class DistillationGridModule(DistillationSystem):
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
        class_names, compile, channels_last, input_shape, teacher_cache: as for
        ``DistillationModule`` (the cached logits serve every cell, unless a cell's method
        reads the teacher's features).

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
    """

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
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        input_shape: tuple[int, ...] = (3, 32, 32),
        teacher_cache: bool = False,
    ) -> None:
        if methods:
            names, cell_methods = list(methods), list(methods.values())
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
            names = [cell_name(t, a) for t, a in product]  # made once, used every step
            cell_methods = [KD(t, a, standardize) for t, a in product]
        if len(set(names)) != len(names) or not names:
            raise KDLightError(f"the grid's cells need distinct names, got {names}")
        super().__init__(
            model, cell_methods, teacher, teacher_checkpoint, teacher_model, optimizer,
            scheduler, num_classes, class_names, compile, channels_last, input_shape,
            teacher_cache, cells=names,
        )  # fmt: skip
        self.names = names
        # the methods are children (trained, saved, restored); a plain callable holds no state
        self.methods = nn.ModuleList(
            m if isinstance(m, nn.Module) else nn.Identity() for m in cell_methods
        )
        #: each cell's (temperature, alpha), None for a method without them
        self.cells = [
            (getattr(m, "temperature", None), getattr(m, "alpha", None)) for m in cell_methods
        ]
        # plain KD in every cell, one standardization: one kd_loss call for all
        kinds = {(type(m), getattr(m, "standardize", None)) for m in cell_methods}
        self.fused_kd = len(kinds) == 1 and next(iter(kinds))[0] is KD
        if self.fused_kd:  # each cell's T and alpha, for the loss of all students in one pass
            temperatures, alphas = zip(*self.cells, strict=True)
            self.register_buffer("temperatures", torch.tensor(temperatures), persistent=False)
            self.register_buffer("alphas", torch.tensor(alphas), persistent=False)
            self.standardize = cell_methods[0].standardize
        #: each cell's student weights at its best validation epoch, and that epoch
        self.best_weights: dict[str, dict[str, Tensor]] = {}
        self.best_epochs: dict[str, int] = {}
        self._last_weights: dict[str, dict[str, Tensor]] = {}

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor]:
        images, labels, *extra = batch
        strong = self.take_strong_view(extra)
        index = extra[0] if extra else None  # (indices, augmentation) when asked for
        teacher = self.frozen.outputs(images, extra)
        students = [evaluated.fast for evaluated in self.evaluated]
        if self.fused_kd:
            logits = torch.stack([student(images) for student in students])
            losses = kd_loss(
                logits, teacher.logits, labels, self.temperatures, self.alphas, self.standardize
            )["loss"]
        else:
            epoch = self.current_epoch
            losses = torch.stack(
                [
                    slot.step(student, images, labels, teacher, epoch, index, strong)[1]["loss"]
                    for slot, student in zip(self.slots, students, strict=True)
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

    # ------------------------------------------------------------------ each cell's best
    def on_validation_epoch_end(self) -> None:
        """Keep the weights of each student whose validation accuracy is its best so far
        (strictly better, as ModelCheckpoint(mode="max") decides; one read per epoch)."""
        before = torch.stack([e.val_acc_best.max_value.clone() for e in self.evaluated])
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            return
        after = torch.stack([e.val_acc_best.max_value for e in self.evaluated])
        for evaluated, better in zip(self.evaluated, (after > before).tolist(), strict=True):
            if better:
                self.best_weights[evaluated.name] = _copy_state(evaluated.model)
                self.best_epochs[evaluated.name] = self.current_epoch

    def on_test_start(self) -> None:
        """With ``test_weights="best"``, give each student its own best weights (the last
        ones come back in :meth:`on_test_end`)."""
        check("", test_ckpt=self.test_weights)
        super().on_test_start()
        self._last_weights = {}
        if self.test_weights == "last":
            return
        for evaluated in self.evaluated:
            if evaluated.name in self.best_weights:
                self._last_weights[evaluated.name] = _copy_state(evaluated.model)
                evaluated.model.load_state_dict(self.best_weights[evaluated.name])
                self.tested_weights[evaluated.name] = "best"

    def on_test_end(self) -> None:
        """Put the last weights back where the best ones were tested."""
        super().on_test_end()
        for evaluated in self.evaluated:
            if evaluated.name in self._last_weights:
                evaluated.model.load_state_dict(self._last_weights.pop(evaluated.name))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Besides what rebuilds a cell's student without the teacher (``kdlight.load_model``),
        each cell's best weights and epoch, so that a resumed grid still has them."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["kdlight"] |= {
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
