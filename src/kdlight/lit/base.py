"""``ClassificationSystem``: what every kdlight LightningModule shares.

Accuracy metrics per stage, ``val/acc_best`` (kept in checkpoints, so that a resumed run
knows the best epoch before the interruption), per-class test accuracy over the whole test
set (from a confusion matrix, so it is exact under DDP too), the printed report and
``metrics.json``, and the optimizer/scheduler built from Hydra ``_partial_`` callables.
"""

from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
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
    write_metrics,
)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

#: The reference recipe: SGD, lr 0.1, momentum 0.9, weight decay 5e-4.
reference_sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)


def build_optimizers(
    optimizer: OptimizerFactory, scheduler: SchedulerFactory | None, params: list[nn.Parameter]
) -> torch.optim.Optimizer | dict:
    """What ``configure_optimizers`` returns: the optimizer over ``params`` and, if given,
    its scheduler stepped once per epoch."""
    built = optimizer(params=params)
    if scheduler is None:
        return built
    return {
        "optimizer": built,
        "lr_scheduler": {"scheduler": scheduler(optimizer=built), "interval": "epoch"},
    }


class FastForward:
    """``model`` for training steps, through ``torch.compile`` when asked and in
    channels-last memory format when asked; if compiling fails (no compiler on this
    platform, say) warn once and run eagerly. The model itself is untouched, so state-dict
    keys stay the same.

    Evaluation goes through :meth:`eager` instead: compiled, validation (``no_grad``) and
    testing (``inference_mode``) would each cost a compilation of their own, and at their
    large batches on a GPU the compiled forward gains little on about a tenth of the work.
    """

    def __init__(
        self, model: nn.Module, compile: bool = False, channels_last: bool = False
    ) -> None:
        self.model = model
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.run = torch.compile(model) if compile else model

    def _format(self, images: Tensor) -> Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def __call__(self, images: Tensor) -> Tensor:
        images = self._format(images)
        if self.run is self.model:
            return self.model(images)
        try:
            return self.run(images)
        except Exception as err:  # torch.compile compiles lazily, on the first call
            rank_zero_warn(
                f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); running eagerly"
            )
            self.run = self.model
            return self.model(images)

    def eager(self, images: Tensor) -> Tensor:
        """The model run eagerly (in channels-last format when asked), for evaluation."""
        return self.model(self._format(images))


class TrainingLog:
    """Training scalars logged without a cost per step: no ``self.log`` call and no value
    read back from the device in ``training_step``.

    Both are expensive when the model is small and the GPU fast. Each ``self.log`` call runs a
    torchmetrics update of Lightning's result collection (about a millisecond of CPU time
    each, measured on the development CPU), and a value logged with ``prog_bar=True`` is
    turned into a Python number after every batch, which waits for the GPU to finish the
    step before the next one can be queued. Here the scalars are summed on the device
    instead; every ``log_every_n_steps`` steps their values go straight to the loggers as
    ``train/<name>_step`` (one read), and each epoch's batch-weighted means are logged once,
    as ``train/<name>``, averaged over DDP processes.

    Mix it into a LightningModule and call :meth:`log_training` in ``training_step``.
    """

    _training_sums: Tensor | None = None
    _training_names: tuple[str, ...] = ()
    _training_count: int = 0

    def log_training(self, values: dict[str, Tensor], batch_size: int) -> None:
        """Add this step's scalars (0-dim tensors) to the epoch's sums."""
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


def classes_predicted(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int | None, what: str
) -> int:
    """How many classes ``model`` predicts: the width of its output on one image of
    ``input_shape`` (in eval mode and without gradients, so no statistic, parameter or random
    stream changes). ``num_classes``, when given, must agree with it, and is the answer where
    the model cannot be run on such an image; else the ``out_features`` of its last
    ``nn.Linear`` is (registered last, which is not always the one run last: so it only
    answers, never contradicts). ``what`` names the model in the error line."""
    predicted = probe_classes(model, input_shape)
    if num_classes is not None and predicted is not None and predicted != num_classes:
        raise KDLightError(
            f"num_classes={num_classes} does not fit {what} ({type(model).__name__}), which "
            f"predicts {predicted} classes: leave num_classes out or make the model for "
            f"{num_classes} classes"
        )
    if predicted is None and num_classes is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        predicted = linears[-1].out_features if linears else None
    if predicted is None and num_classes is None:
        raise KDLightError(
            f"cannot tell how many classes {what} ({type(model).__name__}) predicts: its "
            f"output on one image of shape {tuple(input_shape)} is not (1, classes) and it "
            "has no nn.Linear; pass num_classes="
        )
    return num_classes if num_classes is not None else predicted


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


class ClassificationSystem(TrainingLog, L.LightningModule):
    """Base for systems that train ``self.model``, a classifier, and evaluate it.

    Subclasses implement ``training_step``: the logits of ``self.fast_model``, the loss,
    ``self.train_acc.update`` and :meth:`log_training` of the loss (and its parts);
    evaluation, metrics and the report live here. ``compile`` (torch.compile) and
    ``channels_last`` are speed options that do not change what is computed.

    ``run_record``: the run's identity (``kdlight-train`` sets it before fitting or
    testing); when set, ``metrics.json`` holds it as ``"run"``.
    """

    run_record: dict | None = None

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
    ) -> None:
        super().__init__()
        num_classes = classes_predicted(model, input_shape, num_classes, "the model")
        self.model = model
        self.fast_model = FastForward(model, compile, channels_last)
        self.optimizer_factory = optimizer or reference_sgd
        self.scheduler_factory = scheduler
        self.num_classes = num_classes
        self.class_names = default_class_names(num_classes, class_names)
        self._class_names_given = class_names is not None
        # no argument checks per training step: they read the labels back from the GPU
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints: a resumed run keeps its best
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_summary: dict | None = None

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
        """Logits, as evaluation computes them (training steps use ``self.fast_model``)."""
        return self.fast_model.eager(images)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # the epoch means of the training_step's scalars
        if self.train_acc.update_called:
            self.log("train/acc", self.train_acc.compute())  # computed over all processes
        self.train_acc.reset()

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        self.test_confusion.update(logits, labels)
        self.log("test/loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def on_test_epoch_end(self) -> None:
        summary = summarize_confusion(self.test_confusion.compute(), self.class_names)
        self.test_confusion.reset()
        for name, accuracy in summary["per_class_accuracy"].items():
            if accuracy is not None:  # a class without test images has no accuracy
                self.log(f"test/acc_{name}", accuracy / 100.0, sync_dist=True)
        self.test_summary = summary
        if self.trainer.is_global_zero:
            print(format_report(summary, self.metrics_path), flush=True)
            write_metrics(self.metrics_path, self.metrics_record(summary), self.run_record)

    @property
    def metrics_path(self) -> Path:
        """``metrics.json`` in the run directory (the Trainer's ``default_root_dir``)."""
        return Path(self.trainer.default_root_dir) / "metrics.json"

    def metrics_record(self, summary: dict) -> dict:
        """What ``metrics.json`` holds; subclasses add their own settings."""
        tested = tested_checkpoint(self.trainer)
        return student_record(self, self.model, summary, self.val_acc_best, tested)

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (a distillation teacher is never among them)."""
        return list(self.model.parameters())

    def configure_optimizers(self):
        return build_optimizers(
            self.optimizer_factory, self.scheduler_factory, self.trainable_parameters()
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the model's name and arguments so it can be rebuilt from the checkpoint alone."""
        checkpoint["kdlight"] = {
            "model_spec": getattr(self.model, "spec", None),
            "class_names": list(self.class_names),
        }
