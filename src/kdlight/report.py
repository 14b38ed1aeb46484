"""``kdlight-report``: tables and plots over finished, failed and unfinished run directories.

    kdlight-report outputs/distill/small_cnn [--out report/]

:func:`collect_runs` finds every run directory below the given ones (a directory holding
``config.yaml``, ``metrics.json``, ``error.txt`` or ``.hydra/config.yaml``) and reads one
record per run. :func:`build_report` writes ``report.csv`` (every run), ``report.md`` (the key
columns, teacher and baseline accuracy, failed and unfinished runs), ``heatmap.png`` (test
accuracy over temperature x alpha; with several student models the one with the most
distillation runs, the others in ``heatmap_<model>.png``) and ``per_class.png`` (teacher,
student baseline and best distilled student, per class).
"""

import argparse
import csv
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RUN_MARKERS = ("config.yaml", "metrics.json", "error.txt", ".hydra/config.yaml")
DISTILLATION = ("DistillationModule", "DistillationGridModule")  # one row per (T, alpha) cell
FIELDS = ("error", "name", "system", "model", "temperature", "alpha", "accuracy", "val_acc_best")
FIELDS += ("teacher_accuracy", "teacher_checkpoint", "root", "delta_vs_baseline")
CSV_NUMBERS = {"test_acc": "accuracy", "val_acc_best": "val_acc_best"}
CSV_NUMBERS |= {"delta_vs_baseline": "delta_vs_baseline", "teacher_acc": "teacher_accuracy"}
MD_HEAD = "| status | model | T | alpha | test acc (%) | Δ baseline (pp) | best val acc (%) | run |"


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # missing, or not a number: shown as empty
        return None


def _read_config(path: Path) -> DictConfig:
    """``config.yaml`` (resolved), else Hydra's unresolved ``.hydra/config.yaml``, else empty."""
    for file in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if file.exists():
            return OmegaConf.load(file)
    return OmegaConf.create()


def _outputs_root(run_dir: Path, root: str | None) -> Path | None:
    """``paths.root``; a relative one (to the launch directory) is looked for above the run."""
    if not root or Path(root).is_absolute():
        return Path(root) if root else None
    parts = Path(root).parts
    return next((a for a in run_dir.parents if a.parts[-len(parts) :] == parts), Path.cwd() / root)


def load_run(path: Path) -> dict:
    """One run directory as a record; a config or metrics file that cannot be read is a failure."""
    path = Path(path).resolve()
    run = {"path": path, "status": "unfinished", **dict.fromkeys(FIELDS), "per_class": {}}
    try:
        cfg = _read_config(path)
    except Exception as err:  # whatever the reason, the report shows it
        cfg = OmegaConf.create()
        run |= {"status": "failed", "error": f"unreadable config.yaml: {err}"}

    def get(key: str):  # an interpolation left in .hydra/config.yaml reads as None
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)

    run["system"] = (get("module._target_") or "").rsplit(".", 1)[-1] or None
    run |= {"name": get("name"), "model": get("model.name")}
    run["teacher_checkpoint"] = get("distill.teacher_checkpoint")
    if run["system"] in DISTILLATION:
        run["temperature"] = _float(get("distill.temperature"))
        run["alpha"] = _float(get("distill.alpha"))

    metrics_file, error_file = path / "metrics.json", path / "error.txt"
    if metrics_file.exists():
        try:
            metrics = json.loads(metrics_file.read_text())
            run |= {
                "status": "finished",
                "error": None,
                "system": metrics.get("system", run["system"]),
                "model": metrics.get("model", run["model"]),
                "accuracy": float(metrics["accuracy"]),
                "val_acc_best": _float(metrics.get("val_acc_best")),
                "teacher_accuracy": _float(metrics.get("teacher_accuracy")),
                "per_class": {k: float(v) for k, v in metrics["per_class_accuracy"].items()},
            }
            for key in ("temperature", "alpha", "teacher_checkpoint"):
                run[key] = run[key] if metrics.get(key) is None else metrics[key]
            run |= {"temperature": _float(run["temperature"]), "alpha": _float(run["alpha"])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            run |= {"status": "failed", "error": f"unreadable metrics.json: {err!r}"}
    elif error_file.exists():
        lines = error_file.read_text(errors="replace").strip().splitlines()
        run |= {"status": "failed", "error": lines[0] if lines else "error.txt is empty"}

    run["root"] = _outputs_root(path, get("paths.root"))
    checkpoint = Path(run["teacher_checkpoint"] or "")  # <root>/teacher/<model>/checkpoints/x
    if run["root"] is None and len(checkpoint.parents) > 3:
        run["root"] = checkpoint.parents[3]
    return run


def _run_dirs(top: Path) -> list[Path]:
    """Run directories at or below ``top``. A directory with neither ``metrics.json`` nor
    ``error.txt`` above other runs groups them (a fused grid) and is not a run itself."""
    found = []
    for here, subdirs, _ in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if any((Path(here) / marker).exists() for marker in RUN_MARKERS):
            found.append(Path(here))
    ended = [d for d in found if (d / "metrics.json").exists() or (d / "error.txt").exists()]
    return [d for d in found if d in ended or not any(d in other.parents for other in found)]


def _finished_run(runs: list[dict], run_dir: Path) -> dict | None:
    """The finished run in ``run_dir``: a collected one, else read from disk."""
    run = next((r for r in runs if r["path"] == run_dir.resolve()), None)
    if run is None and (run_dir / "metrics.json").exists():
        run = load_run(run_dir)
    return run if run and run["status"] == "finished" else None


def find_baseline(runs: list[dict], model: str, root: Path | None) -> dict | None:
    """The ``student_baseline`` run of ``model``: among ``runs``, else under ``root``."""
    wanted = ("ClassifierModule", model, "student_baseline", "finished")
    for run in runs:
        if (run["system"], run["model"], run["name"], run["status"]) == wanted:
            return run
    return _finished_run(runs, root / "student_baseline" / model) if root else None


def find_teacher(runs: list[dict], run: dict) -> dict | None:
    """The teacher run of distillation ``run`` (the checkpoint's grandparent), if finished."""
    checkpoint = run["teacher_checkpoint"]
    return _finished_run(runs, Path(checkpoint).resolve().parents[1]) if checkpoint else None


def collect_runs(dirs: list[Path]) -> list[dict]:
    """Every run below ``dirs``, sorted by (model, temperature, alpha, path), with each
    finished distillation run's ``delta_vs_baseline`` (percentage points) when a baseline exists."""
    paths = {p.resolve() for top in dirs for p in _run_dirs(Path(top))}
    runs = [load_run(p) for p in paths]

    def order(run: dict) -> tuple:
        number = [-math.inf if run[k] is None else run[k] for k in ("temperature", "alpha")]
        return (run["model"] or "", *number, str(run["path"]))

    runs.sort(key=order)
    for run in runs:
        if run["system"] in DISTILLATION and run["status"] == "finished":
            baseline = find_baseline(runs, run["model"], run["root"])
            if baseline:
                run["delta_vs_baseline"] = run["accuracy"] - baseline["accuracy"]
    return runs


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def write_csv(runs: list[dict], path: Path) -> Path:
    classes = list(dict.fromkeys(c for run in runs for c in run["per_class"]))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        head = ["status", "model", "temperature", "alpha", *CSV_NUMBERS]
        writer.writerow([*head, *(f"acc_{c}" for c in classes), "error", "path"])
        for r in runs:
            writer.writerow(
                [r["status"], r["model"] or "", _fmt(r["temperature"], "g"), _fmt(r["alpha"], "g")]
                + [_fmt(r[key], ".4f") for key in CSV_NUMBERS.values()]
                + [_fmt(r["per_class"].get(c), ".4f") for c in classes]
                + [r["error"] or "", str(r["path"])]
            )
    return path


def _cell(run: dict) -> str:
    return f"T={_fmt(run['temperature'], 'g')}, alpha={_fmt(run['alpha'], 'g')}"


def _students(runs: list[dict], model: str) -> list[dict]:
    return [r for r in runs if r["system"] in DISTILLATION and r["model"] == model]


def _summary(runs: list[dict], model: str) -> tuple[dict | None, dict | None, dict | None]:
    """(teacher, baseline, best finished distillation run) for student ``model``."""
    students = _students(runs, model)
    done = [r for r in students if r["status"] == "finished"]
    best = max(done, key=lambda r: r["accuracy"], default=None)
    reference = best or students[0]
    return find_teacher(runs, reference), find_baseline(runs, model, reference["root"]), best


def write_markdown(runs: list[dict], models: list[str], path: Path, base: Path) -> Path:
    lines = ["# Distillation report", ""]
    for model in models:
        teacher, baseline, best = _summary(runs, model)
        teacher_acc = teacher["accuracy"] if teacher else (best or {}).get("teacher_accuracy")
        if teacher_acc is not None:
            name = teacher["model"] if teacher else "as measured by the distillation runs"
            lines.append(f"- Teacher ({name}): {teacher_acc:.2f}% test accuracy")
        if baseline:
            lines.append(f"- Student baseline ({model}): {baseline['accuracy']:.2f}% test accuracy")
        else:
            lines.append(f"- Student baseline ({model}): not found, no delta computed")
        if best:
            delta = _fmt(best["delta_vs_baseline"], "+.2f")
            lines.append(
                f"- Best distilled {model}: {best['accuracy']:.2f}% at {_cell(best)}"
                + (f", {delta} pp vs baseline" if delta else "")
            )
    lines += ["", MD_HEAD, "|---" * MD_HEAD.count(" | ") + "|---|"]

    def shown(p: Path) -> str:
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    for r in runs:
        cells = [r["status"], r["model"] or "?", _fmt(r["temperature"], "g"), _fmt(r["alpha"], "g")]
        cells += [_fmt(r["accuracy"]), _fmt(r["delta_vs_baseline"], "+.2f")]
        cells += [_fmt(r["val_acc_best"]), f"`{shown(r['path'])}`"]
        lines.append("| " + " | ".join(cells) + " |")
    problems = [r for r in runs if r["status"] != "finished"]
    if problems:
        lines += ["", "## Failed or unfinished runs", ""]
        for r in problems:
            reason = r["error"] or "no metrics.json or error.txt yet: still running, or crashed"
            lines.append(f"- `{shown(r['path'])}` ({r['status']}): {reason}")
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_heatmap(runs: list[dict], model: str, path: Path) -> Path | None:
    """Test accuracy of ``model``'s distillation runs over temperature (x) and alpha (y)."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the backend alone
    from matplotlib.patches import Rectangle

    teacher, baseline, best = _summary(runs, model)
    cells: dict[tuple, dict] = {}  # a finished run wins a cell that several runs share
    for r in sorted(_students(runs, model), key=lambda r: r["status"] != "finished"):
        if r["temperature"] is not None and r["alpha"] is not None:
            cells.setdefault((r["temperature"], r["alpha"]), r)
    if not cells:
        return None
    temps, alphas = sorted({t for t, _ in cells}), sorted({a for _, a in cells})
    grid = [[cells.get((t, a)) for t in temps] for a in alphas]
    values = [[c["accuracy"] if c else None for c in row] for row in grid]  # None unless finished
    accs = [v for row in values for v in row if v is not None]
    low, high = (min(accs), max(accs)) if accs else (0.0, 100.0)
    low, high = (low - 1, high + 1) if high - low < 1e-9 else (low, high)

    fig = Figure(figsize=(max(6.5, 1.5 * len(temps) + 3), max(4.5, 1.0 * len(alphas) + 2.5)))
    ax = fig.add_subplot()
    masked = [[math.nan if v is None else v for v in row] for row in values]
    image = ax.imshow(masked, cmap="viridis", vmin=low, vmax=high, origin="lower", aspect="auto")
    for i, row in enumerate(grid):
        for j, cell in enumerate(row):
            if cell is None or cell["status"] != "finished":
                shade = "0.85" if cell else "white"  # grey: a run that has no result yet
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fc=shade, ec="0.5", hatch="//"))
                box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8}
                label = cell["status"] if cell else "no run"
                ax.text(j, i, label, ha="center", va="center", color="0.2", bbox=box)
                continue
            text = f"{cell['accuracy']:.2f}%"
            if cell["delta_vs_baseline"] is not None:
                text += f"\n{cell['delta_vs_baseline']:+.2f} pp"
            color = "white" if (cell["accuracy"] - low) / (high - low) < 0.6 else "black"
            weight = "bold" if cell is best else "normal"
            ax.text(j, i, text, ha="center", va="center", color=color, fontweight=weight)
    ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set(xlabel="temperature T", ylabel="alpha (weight of the teacher's soft targets)")
    notes = [f"teacher {teacher['accuracy']:.2f}%"] if teacher else []
    notes += [f"baseline {baseline['accuracy']:.2f}% (Δ in pp)" if baseline else "no baseline"]
    ax.set_title(f"Distilled {model}: test accuracy (bold: best)\n" + ", ".join(notes))
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_per_class(runs: list[dict], model: str, path: Path) -> Path | None:
    """Per-class accuracy of the teacher, the student baseline and the best distilled student."""
    from matplotlib.figure import Figure

    teacher, baseline, best = _summary(runs, model)
    series = []
    if teacher:
        series.append((f"teacher {teacher['model']} ({teacher['accuracy']:.2f}%)", teacher))
    if baseline:
        series.append((f"student baseline {model} ({baseline['accuracy']:.2f}%)", baseline))
    if best:
        series.append((f"best distilled {model}, {_cell(best)} ({best['accuracy']:.2f}%)", best))
    if not series:
        return None
    classes = list(dict.fromkeys(c for _, run in series for c in run["per_class"]))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(9, 0.9 * len(classes) + 2), 5.5))
    ax = fig.add_subplot()
    for k, (label, run) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(classes))]
        ax.bar(xs, [run["per_class"].get(c, math.nan) for c in classes], width, label=label)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set(ylim=(0, 105), ylabel="test accuracy (%)", title="Per-class test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(3, len(series)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def build_report(dirs: list[Path], out_dir: Path) -> dict[str, Path]:
    """Write the CSV, the Markdown table and the plots for the runs below ``dirs``."""
    runs = collect_runs(dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = Counter(r["model"] for r in runs if r["system"] in DISTILLATION and r["model"])
    models = sorted(counts, key=lambda m: (-counts[m], m))  # the main student model first
    written = {
        "csv": write_csv(runs, out_dir / "report.csv"),
        "markdown": write_markdown(runs, models, out_dir / "report.md", Path(dirs[0]).resolve()),
    }
    for k, model in enumerate(models):
        name = "heatmap" if k == 0 else f"heatmap_{model}"
        written[name] = plot_heatmap(runs, model, out_dir / f"{name}.png")
    if models:
        written["per_class"] = plot_per_class(runs, models[0], out_dir / "per_class.png")
    return {name: path for name, path in written.items() if path is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdlight-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="runs or their parents")
    parser.add_argument("--out", type=Path, help="where the report goes (default: the first DIR)")
    args = parser.parse_args(argv)
    for d in args.dirs:
        if not d.is_dir():
            print(f"error: {d} is not a directory", file=sys.stderr)
            return 2
    if not any(_run_dirs(d) for d in args.dirs):
        names = ", ".join(map(str, args.dirs))
        message = f"no run directories (config.yaml or metrics.json) under {names}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    written = build_report(args.dirs, args.out or args.dirs[0])
    print(written["markdown"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
