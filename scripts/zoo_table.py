"""The zoo reproduction's table (``STAGES=zoo scripts/gpu_study.sh``): the measured test
top-1 of its teacher, KD and DKD runs next to the accuracies the official code's READMEs
publish for resnet32x4 -> resnet8x4 on CIFAR-100.

    python scripts/zoo_table.py WORK/zoo --teacher resnet32x4 --student resnet8x4 --out table.md

It reads each run's ``metrics.json`` (JSON only: nothing in it runs, and no torch import),
so that the table is the runs' own record. Where the runs are not the published setting
(other models, data other than CIFAR-100, fewer epochs: a toy run), the table says so under
it rather than leaving the two columns to be read as comparable.
"""

import argparse
import json
import sys
from pathlib import Path

from kdlight.runs.files import atomic_write

#: The published top-1 (%) on CIFAR-100 and where each is printed. The teacher's is in
#: RepDistiller's README (mdistiller reuses its teachers, and its README prints no teacher
#: accuracy); KD's is in both; DKD's in mdistiller's.
PUBLISHED = {
    "teacher": (79.42, "HobbitLong/RepDistiller README.md, table 1 (commit b84f547)"),
    "KD": (73.33, "megvii-research/mdistiller README.md, DKD results (commit a08d46f)"),
    "DKD": (76.32, "megvii-research/mdistiller README.md, DKD results (commit a08d46f)"),
}
PUBLISHED_SETTING = {"teacher": "resnet32x4", "student": "resnet8x4", "epochs": 240}


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "accuracy" in record else None


def _method(record: dict) -> str:
    target = str(record.get("run", {}).get("settings", {}).get("distiller._target_", ""))
    return target.rsplit(".", 1)[-1].upper()  # KD, DKD


def find_runs(root: Path, teacher: str, student: str) -> dict[str, tuple[Path, dict]]:
    """The finished teacher, KD and DKD runs under ``root`` (a ``paths.root``), each the
    newest ``metrics.json`` of its kind; a kind without one is left out."""
    candidates = {
        "teacher": sorted((root / "teacher" / teacher).glob("seed*/metrics.json")),
        "distill": sorted((root / "zoo_distill" / student).glob("*/seed*/metrics.json")),
    }
    found: dict[str, tuple[Path, dict]] = {}
    for kind, paths in candidates.items():
        for path in sorted(paths, key=lambda p: p.stat().st_mtime):  # the newest wins
            record = _read(path)
            if record is None or record.get("run", {}).get("debug"):
                continue
            name = "teacher" if kind == "teacher" else _method(record)
            if name in PUBLISHED:
                found[name] = (path, record)
    return found


def table(root: Path, teacher: str, student: str) -> str:
    """The Markdown table (and its notes); raises SystemExit naming a missing run.
    ``metrics.json`` holds accuracies in percent already."""
    runs = find_runs(root, teacher, student)
    missing = [name for name in PUBLISHED if name not in runs]
    if missing:
        raise SystemExit(f"error: no finished {', '.join(missing)} run under {root}")
    lines = [
        "| run | model | epochs | test images | measured top-1 (%) | best epoch's top-1 (%) | "
        "published top-1 (%) | published in |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    notes, sources = set(), []
    for name in PUBLISHED:
        path, record = runs[name]
        sources.append(f"- {name}: `{path}`")
        # the official trainers print the best test accuracy over epochs as well; kdlight's
        # is val_acc_best where the test set is the validation set (data.val_size=0)
        on_test = record.get("validation") == "test_set" and record.get("val_acc_best") is not None
        best = f"{float(record['val_acc_best']):.2f}" if on_test else "-"
        published, source = PUBLISHED[name]
        settings = record.get("run", {}).get("settings", {})
        if settings.get("data.source") not in ("torchvision", "archive"):
            notes.add(f"data.source={settings.get('data.source')}, not CIFAR-100")
        if settings.get("num_classes") != 100:
            notes.add(f"{settings.get('num_classes')} classes, not CIFAR-100's 100")
        if record.get("epochs") != PUBLISHED_SETTING["epochs"]:
            notes.add(f"{record.get('epochs')} epochs, not 240")
        if (teacher, student) != (PUBLISHED_SETTING["teacher"], PUBLISHED_SETTING["student"]):
            notes.add(f"{teacher} -> {student}, not resnet32x4 -> resnet8x4")
        lines.append(
            f"| {name} | {record.get('model')} | {record.get('epochs')} | "
            f"{record.get('test_images')} | {float(record['accuracy']):.2f} | {best} | "
            f"{published:.2f} | {source} |"
        )
    text = "\n".join(lines) + "\n\nMeasured: each run's test accuracy in its `metrics.json`"
    text += " (which weights were tested: `tested_weights` there); the best epoch's: its"
    text += " `val_acc_best`, where the test set is the validation set. Published: printed by the"
    text += " official code's authors for resnet32x4 -> resnet8x4, CIFAR-100, 240 epochs.\n\n"
    text += "\n".join(sources) + "\n"
    if notes:
        text += "\nNot comparable with the published column: " + "; ".join(sorted(notes)) + ".\n"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the runs' paths.root ($WORK/zoo)")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    text = table(args.root, args.teacher, args.student)
    atomic_write(args.out, text)  # whole or not at all
    return 0


if __name__ == "__main__":
    sys.exit(main())
