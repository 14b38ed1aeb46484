"""``ClassificationSystem``: what every kdlight LightningModule shares, for one model or for
a grid of them (its training log, evaluation, report and optimizer);
:func:`classes_predicted`, a model's classes.
"""

import copy
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from kdlight.errors import KDLightError
from kdlight.lit.results import (
    default_class_names,
    format_report,
    student_record,
    summarize_confusion,
    tested_checkpoint,
)
from kdlight.models.fast import FastForward
from kdlight.runs.files import write_json

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

#: The reference recipe: SGD, lr 0.1, momentum 0.9, weight decay 5e-4.
reference_sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)


def classes_predicted(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int | None
) -> int:
    """How many classes ``model`` predicts: the width of its output on one image of
    ``input_shape`` (in eval mode and without gradients, so no statistic, parameter or random
    stream changes). ``num_classes``, when given, must agree with it, and is the answer where
    the model cannot be run on such an image; else the ``out_features`` of its last
    ``nn.Linear`` is (registered last, which is not always the one run last: so it only
    answers, never contradicts)."""
    predicted = probe_classes(model, input_shape)
    if num_classes is not None and predicted not in (None, num_classes):
        raise KDLightError(
            f"num_classes={num_classes} does not fit the model ({type(model).__name__}), which "
            f"predicts {predicted} classes: leave num_classes out or make the model for "
            f"{num_classes} classes"
        )
    if num_classes is not None or predicted is not None:
        return num_classes if num_classes is not None else predicted
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KDLightError(
            f"cannot tell how many classes the model ({type(model).__name__}) predicts: its "
            f"output on one image of shape {tuple(input_shape)} is not (1, classes) and it "
            "has no nn.Linear; pass num_classes="
        )
    return linears[-1].out_features


def probe_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """The width of ``model``'s (1, classes) output on a zero image; None when it cannot be
    run on one (another input shape, parameters on the meta device) or gives another shape."""
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.is_meta:
        return None
    device = parameter.device if parameter is not None else torch.device("cpu")
    training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(torch.zeros(1, *input_shape, device=device))
    except Exception:  # a model for other images: its last Linear is asked instead
        return None
    finally:
        model.train(training)
    if isinstance(output, Tensor) and output.dim() == 2 and output.shape[0] == 1:
        return int(output.shape[1])
    return None


class Evaluated:
    """One model that a system trains, and its evaluation: ``name`` is its grid cell's
    (``None`` for the model of a system of one), which its logged names end with
    (``suffix``: ``val/acc_<cell>``) and its ``metrics.json`` lives under
    (``<run dir>/<cell>/``)."""

    def __init__(
        self, name: str | None, model: nn.Module, classes: int, compile: bool, channels_last: bool
    ) -> None:
        self.name, self.model = name, model
        self.suffix = "" if name is None else f"_{name}"
        self.fast = FastForward(model, compile, channels_last)
        self.val_acc = MulticlassAccuracy(classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints: a resumed run keeps it
        self.test_confusion = MulticlassConfusionMatrix(classes)


class ClassificationSystem(L.LightningModule):
    """Base for systems that train ``self.model``, a classifier, and evaluate it; or, given
    ``cells``, a grid of students (``self.students``, each a copy of ``model``, as separate
    runs with the same seed would start), each evaluated as a single model is.

    Subclasses implement ``training_step``: the logits of ``self.fast_model`` (a grid's
    ``evaluated[i].fast``), the loss, ``self.train_acc.update`` and :meth:`log_training` of
    the loss (and its parts); evaluation, metrics and the report live here.

    A single model logs ``val/acc``, ``val/loss``, ``val/acc_best``, ``test/acc``,
    ``test/loss`` and each class's ``test/acc_<class>`` (from a confusion matrix over the
    whole test set: exact under DDP too), prints its report and writes ``metrics.json`` in
    the run directory; a grid's cell logs ``val/acc_<cell>``, ``val/acc_best_<cell>`` and
    ``test/acc_<cell>`` (``val/acc`` is their mean, what checkpoints monitor), and writes
    ``<run dir>/<cell>/metrics.json``, the layout of a multirun.

    ``run_record``: the run's identity (``kdlight-train`` sets it before fitting or
    testing); when set, ``metrics.json`` holds it as ``"run"``.
    """

    run_record: dict | None = None
    _training_sums: Tensor | None = None
    _training_names: tuple[str, ...] = ()
    _training_count: int = 0

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
        class_names: tuple[str, ...] | list[str] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        input_shape: tuple[int, ...] = (3, 32, 32),
        cells: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        num_classes = classes_predicted(model, input_shape, num_classes)
        self.optimizer_factory = optimizer or reference_sgd
        self.scheduler_factory = scheduler
        self.num_classes = num_classes
        self.class_names = default_class_names(num_classes, class_names)
        self._class_names_given = class_names is not None
        # no argument checks per training step: they read the labels back from the GPU
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        names = [None] if cells is None else list(cells)
        models = [model] if cells is None else [copy.deepcopy(model) for _ in names]
        self.evaluated = [
            Evaluated(name, student, num_classes, compile, channels_last)
            for name, student in zip(names, models, strict=True)
        ]
        fields = ("model", "val_acc", "val_acc_best", "test_confusion")
        parts = [[getattr(evaluated, f) for evaluated in self.evaluated] for f in fields]
        if cells is None:  # registered where checkpoints keep them: model.*, val_acc_best.*
            self.model, self.val_acc, self.val_acc_best, self.test_confusion = (p[0] for p in parts)
            self.fast_model = self.evaluated[0].fast
        else:  # students.<i>.*, val_acc_best.<i>.*
            self.students, self.val_acc, self.val_acc_best, self.test_confusion = map(
                nn.ModuleList, parts
            )
        self.test_summaries: dict[str | None, dict] = {}
        self.tested_weights: dict[str | None, str | None] = {}

    @property
    def test_summary(self) -> dict | None:
        """The last test's summary of a system of one model (None for a grid's)."""
        return self.test_summaries.get(None)

    def setup(self, stage: str) -> None:
        """The data's classes: their names for the report (unless ``class_names`` was
        given), and their number, which must be the model's."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "num_classes", None)
        if classes is None:  # plain dataloaders: nothing says how many classes they hold
            return
        if classes != self.num_classes:
            raise KDLightError(
                f"the model predicts {self.num_classes} classes and the data "
                f"({type(datamodule).__name__}) has {classes}: use a model made for "
                f"{classes} classes (create_model(name, num_classes={classes})) or data "
                f"of {self.num_classes} classes"
            )
        names = getattr(datamodule, "classes", None)
        if not self._class_names_given and names is not None and len(names) == classes:
            self.class_names = tuple(str(name) for name in names)

    def forward(self, images: Tensor) -> Tensor:
        """Logits, as evaluation computes them (training steps use the fast forward): a
        grid's are ``(cells, N, classes)``."""
        logits = [evaluated.fast.eager(images) for evaluated in self.evaluated]
        return logits[0] if self.evaluated[0].name is None else torch.stack(logits)

    def log_training(self, values: dict[str, Tensor], batch_size: int) -> None:
        """Add this step's scalars (0-dim tensors) to the epoch's sums, with no ``self.log``
        call and no read from the device per step (why: README, "No step waits for the GPU").
        Every ``log_every_n_steps`` steps they go straight to the loggers as
        ``train/<name>_step`` (one read); each epoch's batch-weighted means are logged once,
        as ``train/<name>``, averaged over DDP processes."""
        stacked = torch.stack([value.detach().float() for value in values.values()])
        if self._training_sums is None:
            self._training_names = tuple(values)
            self._training_sums = torch.zeros_like(stacked)
            self._training_count = 0
        self._training_sums += stacked * batch_size
        self._training_count += batch_size
        every = self.trainer.log_every_n_steps
        if self.loggers and every and self.global_step % every == 0:
            step_values = {
                f"train/{n}_step": v for n, v in zip(values, stacked.tolist(), strict=True)
            }
            for logger in self.loggers:
                logger.log_metrics(step_values, step=self.global_step)

    def on_train_epoch_end(self) -> None:
        if self._training_sums is not None:
            means = (self._training_sums / max(self._training_count, 1)).unbind()
            for name, mean in zip(self._training_names, means, strict=True):
                self.log(f"train/{name}", mean, prog_bar=name == "loss", sync_dist=True)
        self._training_sums = None
        if self.train_acc.update_called:
            self.log("train/acc", self.train_acc.compute())  # computed over all processes
        self.train_acc.reset()

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        for evaluated in self.evaluated:
            logits = evaluated.fast.eager(images)
            evaluated.val_acc(logits, labels)
            single = evaluated.name is None
            self.log(f"val/acc{evaluated.suffix}", evaluated.val_acc, prog_bar=single)
            if single:  # a grid's cells log their accuracy only: one call each per batch
                self.log("val/loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        accuracies = [evaluated.val_acc.compute() for evaluated in self.evaluated]
        if self.evaluated[0].name is not None:  # what a grid's checkpoints monitor
            self.log("val/acc", torch.stack(accuracies).mean(), prog_bar=True, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        for evaluated, accuracy in zip(self.evaluated, accuracies, strict=True):
            evaluated.val_acc_best(accuracy)
            best = evaluated.val_acc_best.compute()
            self.log(f"val/acc_best{evaluated.suffix}", best, sync_dist=True)

    def on_test_start(self) -> None:
        self.tested_weights = {
            evaluated.name: tested_checkpoint(self.trainer) for evaluated in self.evaluated
        }

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        for evaluated in self.evaluated:
            logits = evaluated.fast.eager(images)
            evaluated.test_confusion.update(logits, labels)
            if evaluated.name is None:
                self.log("test/loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        """Each model's test summary: logged, printed and written to its ``metrics.json``."""
        for evaluated in self.evaluated:
            summary = summarize_confusion(evaluated.test_confusion.compute(), self.class_names)
            evaluated.test_confusion.reset()
            if summary["accuracy"] is not None:
                accuracy = summary["accuracy"] / 100.0
                self.log(f"test/acc{evaluated.suffix}", accuracy, sync_dist=True)
            if evaluated.name is None:  # each class's, for one model (not for every cell)
                for name, accuracy in summary["per_class_accuracy"].items():
                    if accuracy is not None:  # a class without test images has no accuracy
                        self.log(f"test/acc_{name}", accuracy / 100.0, sync_dist=True)
            self.test_summaries[evaluated.name] = summary
            if self.trainer.is_global_zero:
                path = Path(self.trainer.default_root_dir, evaluated.name or "", "metrics.json")
                heading = "" if evaluated.name is None else f"[{evaluated.name}] "
                print(heading + format_report(summary, path), flush=True)
                record = self.metrics_record(evaluated, summary)
                run = {} if self.run_record is None else {"run": self.run_record}
                write_json(path, record | run)

    def metrics_record(self, evaluated: Evaluated, summary: dict) -> dict:
        """What a model's ``metrics.json`` holds; subclasses add their own settings."""
        tested = self.tested_weights.get(evaluated.name)
        return student_record(self, evaluated.model, summary, evaluated.val_acc_best, tested)

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (a distillation teacher is never among them)."""
        return [p for evaluated in self.evaluated for p in evaluated.model.parameters()]

    def configure_optimizers(self):
        """The optimizer over :meth:`trainable_parameters` and, if given, its scheduler,
        stepped once per epoch."""
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the model's name and arguments so it can be rebuilt from the checkpoint alone."""
        checkpoint["kdlight"] = {
            "model_spec": getattr(self.evaluated[0].model, "spec", None),
            "class_names": list(self.class_names),
        }
