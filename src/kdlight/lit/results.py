"""The test report: the reference study's printed format and ``metrics.json``.

``metrics.json`` is strict JSON (a class without test images is ``null``, never ``NaN``),
written atomically through :func:`kdlight.runs.files.write_json`, the run's identity last
as ``"run"``; besides the accuracies it says what they were measured on
(:func:`student_record`).
"""

import math
from pathlib import Path

import lightning as L
from torch import Tensor, nn
from torchmetrics import MaxMetric

from kdlight.data.sources import CIFAR10_CLASSES
from kdlight.errors import KDLightError
from kdlight.models.registry import spec_name


def summarize_confusion(confusion: Tensor, classes: tuple[str, ...]) -> dict:
    """Overall and per-class accuracy (percent) from a ``(true, predicted)`` confusion matrix;
    ``None`` where there is nothing to divide by (a class without test images)."""
    confusion = confusion.double().cpu()
    per_class_total = confusion.sum(dim=1)
    correct = confusion.diagonal()
    total = float(per_class_total.sum())
    return {
        "test_images": int(total),
        "accuracy": 100.0 * float(correct.sum()) / total if total else None,
        "per_class_accuracy": {
            name: 100.0 * float(correct[i] / per_class_total[i]) if per_class_total[i] else None
            for i, name in enumerate(classes)
        },
    }


def _percent(value: float | None, spec: str) -> str:
    return "n/a (no test images)" if value is None else f"{value:{spec}} %"


#: Up to this many classes the test report prints every class, as the reference study did
#: for CIFAR-10; beyond, a summary (:func:`format_report`).
FULL_REPORT_CLASSES = 10
#: How many of the worst and of the best classes the summary of a larger report names.
SHOWN_CLASSES = 5


def format_report(summary: dict, full_list: str | Path | None = None) -> str:
    """The reference study's report: overall accuracy, then one line per class, for up to
    :data:`FULL_REPORT_CLASSES` classes. Beyond, one line each for the
    :data:`SHOWN_CLASSES` worst and best classes and one for where every class's accuracy
    is (``full_list``, the run's ``metrics.json``): 100 lines a CIFAR-100 test were read by
    nobody."""
    lines = [
        f"Accuracy of the network on the {summary['test_images']} test images: "
        + _percent(summary["accuracy"], "f")
    ]
    per_class = summary["per_class_accuracy"]
    if len(per_class) <= FULL_REPORT_CLASSES:
        lines += [
            f"Accuracy of {name:>5s} : {_percent(acc, '.0f')}" for name, acc in per_class.items()
        ]
        return "\n".join(lines)
    measured = sorted((acc, name) for name, acc in per_class.items() if acc is not None)
    shown = min(SHOWN_CLASSES, len(measured) // 2)

    def listed(part: list[tuple[float, str]]) -> str:
        return ", ".join(f"{name} {acc:.0f} %" for acc, name in part)

    if shown:
        lines.append(f"Worst {shown} of {len(per_class)} classes: {listed(measured[:shown])}")
        lines.append(f"Best {shown} of {len(per_class)} classes: {listed(measured[::-1][:shown])}")
    if len(measured) < len(per_class):
        lines.append(f"{len(per_class) - len(measured)} classes without test images")
    where = f" in {full_list}" if full_list is not None else " in the run's metrics.json"
    lines.append(f"Accuracy of each of the {len(per_class)} classes: per_class_accuracy{where}")
    return "\n".join(lines)


def best_accuracy(best: MaxMetric) -> float | None:
    """The best validation accuracy so far, in percent; ``None`` before the first epoch.

    It reads the metric's state, which checkpoints keep (so a resumed run reports the best
    of the whole run), rather than ``compute()``, which warns about a restored metric that
    has not been updated since. The state is the same on every DDP process: each update is
    an accuracy already computed over all of them.
    """
    value = float(best.max_value)
    return 100.0 * value if math.isfinite(value) else None


def validation_split(datamodule: L.LightningDataModule | None) -> str | None:
    """What ``val/acc`` measures: ``"held_out"`` training images, or the ``"test_set"``
    (``val_size=0``, as the reference study did); ``None`` without a datamodule that says."""
    val_set = getattr(datamodule, "val_set", None)
    if val_set is None:
        return None
    return "test_set" if val_set is getattr(datamodule, "test_set", None) else "held_out"


def tested_checkpoint(trainer: L.Trainer) -> str | None:
    """Which weights ``trainer.test`` saw: ``"last"`` for the weights in memory (those that
    fit left) or a ``last.ckpt``, ``"best"`` for a checkpoint callback's best or a
    ``best.ckpt`` (as kdlight's callbacks name it); ``None`` for any other checkpoint."""
    path = trainer.ckpt_path
    if path is None:
        return "last"
    best = {str(getattr(cb, "best_model_path", "")) for cb in trainer.checkpoint_callbacks}
    if str(path) in best - {""} or Path(path).name == "best.ckpt":
        return "best"
    return "last" if Path(path).name == "last.ckpt" else None


def default_class_names(num_classes: int, class_names=None) -> tuple[str, ...]:
    """The per-class report's names: ``class_names`` (which must be ``num_classes`` long),
    else CIFAR-10's for 10 classes and ``class0``, ``class1``... for any other number."""
    if class_names is None:
        if num_classes == len(CIFAR10_CLASSES):
            return CIFAR10_CLASSES
        return tuple(f"class{index}" for index in range(num_classes))
    names = tuple(str(name) for name in class_names)
    if len(names) != num_classes:
        raise KDLightError(f"{len(names)} class names for {num_classes} classes: {names[:3]}...")
    return names


def student_record(
    system: L.LightningModule,
    model: nn.Module,
    summary: dict,
    best: MaxMetric,
    tested_weights: str | None,
) -> dict:
    """What ``metrics.json`` says of one trained model, the same for a single run and for
    every cell of a grid: the system and model, the epochs, the test summary, the best
    validation accuracy, what it was measured on (:func:`validation_split`: with
    ``test_set``, ``val_acc_best`` is the best test accuracy over the epochs), the
    datamodule's ``test_set_id`` and which weights were tested (``last`` or ``best``)."""
    trainer = system.trainer
    epochs = trainer.current_epoch if trainer.max_epochs is None else trainer.max_epochs
    return {
        "system": type(system).__name__,
        "model": spec_name(getattr(model, "spec", None), model),
        "epochs": epochs,
        **summary,
        "val_acc_best": best_accuracy(best),
        "validation": validation_split(trainer.datamodule),
        "test_set": getattr(trainer.datamodule, "test_set_id", None),
        "tested_weights": tested_weights,
    }
