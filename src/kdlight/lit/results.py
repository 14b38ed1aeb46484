"""The test report: the reference study's printed format and ``metrics.json``."""

import json
from pathlib import Path

from torch import Tensor


def summarize_confusion(confusion: Tensor, classes: tuple[str, ...]) -> dict:
    """Overall and per-class accuracy (percent) from a ``(true, predicted)`` confusion matrix."""
    confusion = confusion.double().cpu()
    per_class_total = confusion.sum(dim=1)
    correct = confusion.diagonal()
    return {
        "test_images": int(per_class_total.sum()),
        "accuracy": 100.0 * float(correct.sum() / per_class_total.sum()),
        "per_class_accuracy": {
            name: 100.0 * float(correct[i] / per_class_total[i])
            if per_class_total[i]
            else float("nan")
            for i, name in enumerate(classes)
        },
    }


def format_report(summary: dict) -> str:
    """The reference study's report: overall accuracy, then one line per class."""
    lines = [
        f"Accuracy of the network on the {summary['test_images']} test images: {summary['accuracy']:f} %"
    ]
    lines += [
        f"Accuracy of {name:>5s} : {acc:.0f} %"
        for name, acc in summary["per_class_accuracy"].items()
    ]
    return "\n".join(lines)


def write_metrics(path: str | Path, metrics: dict) -> Path:
    """Write ``metrics.json`` (indented, keys in insertion order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path
