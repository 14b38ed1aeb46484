"""Statistics over seeds in ``kdlight-report``: groups, confidence intervals, differences
from the baseline, comparability, the validation split and debug runs.

Runs are written as ``kdlight-train`` leaves them (``metrics.json`` with its ``run`` block,
``config.yaml``); every expected number is computed here from its formula.
"""

import csv
import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdlight.analysis.stats import Group, paired_difference, summarize, welch_difference
from kdlight.cli.report import build_report, collect_runs

#: Student's t, 0.975 quantile, by degrees of freedom (as printed in t tables).
T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sample_std(xs: list[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def make_run(
    root: Path,
    name: str,
    seed: int,
    accuracy: float,
    cell: tuple[float, float] | None = None,
    model: str = "small_cnn",
    val_acc: float | None = None,
    validation: str = "held_out",
    epochs: int = 2,
    test_set: str = "synthetic:train=600,test=300",
    debug: bool = False,
    grid: tuple[list, list] | None = None,
    **changed,
) -> Path:
    """A finished run in kdlight-train's layout, ``<root>/<name>/<model>/[<cell>/]seed<seed>-<id>``
    (a fused grid's cell: ``<root>/distill_grid/<model>/seed<seed>-<id>/<cell>``). ``changed``
    overrides settings (``data__train_subset=500`` sets ``data.train_subset``)."""
    system = "ClassifierModule" if cell is None else "DistillationModule"
    system = "DistillationGridModule" if grid else system
    settings = {"model.name": model, "module._target_": f"kdlight.lit.{system}"}
    settings |= {"optimizer.lr": 0.1, "trainer.max_epochs": epochs, "data.source": "synthetic"}
    settings |= {"data.val_size": 0 if validation == "test_set" else 100}
    settings |= {"data.train_subset": None, "data.eval_subset": None}
    if cell:
        settings |= {
            "distill.teacher": "resnet8/seed0-0a1b2c3d",
            "distill.teacher_model": "resnet8",
        }
        settings |= {"distill.temperature": cell[0], "distill.alpha": cell[1]}
    if grid:
        settings |= {"distill.temperature": grid[0], "distill.alpha": grid[1]}
    settings |= {key.replace("__", "."): value for key, value in changed.items()}
    run_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    folder = root / name / model
    if cell and not grid:
        folder /= f"T{cell[0]:g}_alpha{cell[1]:g}"
    folder /= f"seed{seed}-{run_id}" + ("-debug" if debug else "")
    if grid:
        config_dir, folder = folder, folder / f"T{cell[0]:g}_alpha{cell[1]:g}"
    else:
        config_dir = folder
    config = {"name": name, "seed": seed, "model": {"name": model}, "paths": {"root": str(root)}}
    config["module"] = {"_target_": settings["module._target_"]}
    config_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), config_dir / "config.yaml")
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        "system": system,
        "model": model,
        "epochs": epochs,
        "test_images": 300,
        "accuracy": accuracy,
        "per_class_accuracy": {c: accuracy + i - 4.5 for i, c in enumerate(CLASSES)},
        "val_acc_best": accuracy + 1.0 if val_acc is None else val_acc,
        "validation": validation,
        "test_set": test_set,
        "run": {"id": run_id, "seed": seed, "debug": debug, "settings": settings},
    }
    if cell:
        metrics |= {"temperature": cell[0], "alpha": cell[1], "teacher_model": "resnet8"}
        metrics |= {"teacher_checkpoint": None, "teacher_accuracy": 90.0}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def group_rows(written: dict) -> list[dict]:
    return read_csv(written["groups"])


# --------------------------------------------------------------------------- the formulas
def test_summarize_is_the_mean_sample_std_and_t_interval():
    values = [84.1, 84.9, 83.7]
    estimate = summarize(values)
    m, s = mean(values), sample_std(values)
    half = T_975[2] * s / math.sqrt(3)
    assert (estimate.n, estimate.mean, estimate.std) == (3, pytest.approx(m), pytest.approx(s))
    assert (estimate.low, estimate.high) == (pytest.approx(m - half), pytest.approx(m + half))
    one = summarize([80.0])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 80.0, None, None, None)


def test_paired_and_welch_differences_follow_their_formulas():
    distilled = {0: 81.0, 1: 84.2, 2: 86.9}
    baseline = {0: 80.0, 1: 83.0, 2: 86.0}
    diffs = [distilled[s] - baseline[s] for s in (0, 1, 2)]
    paired = paired_difference(distilled, baseline)
    half = T_975[2] * sample_std(diffs) / math.sqrt(3)
    assert paired.method == "paired" and paired.mean == pytest.approx(mean(diffs))
    assert paired.low == pytest.approx(mean(diffs) - half)
    assert paired.high == pytest.approx(mean(diffs) + half)

    a, b = [81.0, 84.2, 86.9], [80.0, 86.0]
    share_a, share_b = sample_std(a) ** 2 / 3, sample_std(b) ** 2 / 2
    se = math.sqrt(share_a + share_b)
    df = se**4 / (share_a**2 / 2 + share_b**2 / 1)
    from scipy.stats import t

    welch = welch_difference(a, b)
    d = mean(a) - mean(b)
    assert welch.method == "welch" and welch.mean == pytest.approx(d)
    assert welch.low == pytest.approx(d - t.ppf(0.975, df) * se)
    assert welch.high == pytest.approx(d + t.ppf(0.975, df) * se)
    assert not welch_difference([81.0], [80.0, 86.0]).has_interval  # one value: no variance


def test_equal_values_give_a_point_interval_without_a_warning():
    """No spread: the interval is the mean itself; values an ulp apart: as good as a point.
    Neither lets scipy's precision-loss warning out onto the report's console."""
    nearly = math.nextafter(84.2, 100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = summarize([84.2, 84.2])
        paired = paired_difference({0: 81.0, 1: 82.0}, {0: 80.0, 1: 81.0})
        welch = welch_difference([81.0, 81.0], [80.0, 80.0])
        close = summarize([84.2, nearly])
    assert (same.std, same.low, same.high) == (0.0, 84.2, 84.2)
    assert (paired.method, paired.low, paired.high) == ("paired", 1.0, 1.0)
    assert (welch.method, welch.std, welch.low, welch.high) == ("welch", 0.0, 1.0, 1.0)
    assert close.low <= close.mean <= close.high and close.high - close.low < 1e-9


# ------------------------------------------------------------------ groups in the report
def test_seeds_form_one_group_with_n_mean_std_and_interval(tmp_path: Path):
    root = tmp_path / "outputs"
    accuracies = {0: 81.0, 1: 84.2, 2: 86.9}
    baseline = {0: 80.0, 1: 83.0, 2: 86.0}
    for seed, acc in accuracies.items():
        make_run(root, "distill", seed, acc, cell=(4.0, 0.9))
        make_run(root, "student_baseline", seed, baseline[seed])
    make_run(root, "distill", 0, 79.0, cell=(2.0, 0.9))

    written = build_report([root / "distill"], tmp_path / "report")
    rows = {(r["role"], r["temperature"]): r for r in group_rows(written)}
    cell = rows[("distill", "4")]
    values = list(accuracies.values())
    m, s = mean(values), sample_std(values)
    half = T_975[2] * s / math.sqrt(3)
    assert (cell["n"], cell["seeds"]) == ("3", "0 1 2")
    assert float(cell["test_acc_mean"]) == pytest.approx(m, abs=1e-4)
    assert float(cell["test_acc_std"]) == pytest.approx(s, abs=1e-4)
    assert float(cell["test_acc_ci_low"]) == pytest.approx(m - half, abs=1e-4)
    assert float(cell["test_acc_ci_high"]) == pytest.approx(m + half, abs=1e-4)
    assert rows[("distill", "2")]["n"] == "1" and rows[("distill", "2")]["test_acc_std"] == ""

    # paired by seed: the mean of the per-seed differences and its t interval
    diffs = [accuracies[k] - baseline[k] for k in (0, 1, 2)]
    half = T_975[2] * sample_std(diffs) / math.sqrt(3)
    assert cell["delta_method"] == "paired"
    assert float(cell["delta_mean"]) == pytest.approx(mean(diffs), abs=1e-4)
    assert float(cell["delta_ci_low"]) == pytest.approx(mean(diffs) - half, abs=1e-4)
    assert float(cell["delta_ci_high"]) == pytest.approx(mean(diffs) + half, abs=1e-4)
    assert cell["baseline_group"] == rows[("student_baseline", "")]["group"]

    markdown = written["markdown"].read_text()
    assert f"| 4 | 0.9 | {m:.2f} ± {s:.2f} (n=3) | [{m - T_975[2] * s / 3**0.5:.2f}, " in markdown
    assert f"[{mean(diffs) - half:+.2f}, {mean(diffs) + half:+.2f}] paired" in markdown
    assert f"Student baseline (small_cnn): {mean(list(baseline.values())):.2f} ± " in markdown
    assert "is larger than the seed-to-seed noise" in markdown  # the paired interval excludes 0

    # every run stays in report.csv, its delta taken from the baseline's mean
    runs = read_csv(written["csv"])
    assert len(runs) == 4 and {r["seed"] for r in runs} == {"0", "1", "2"}
    seed1 = next(r for r in runs if r["seed"] == "1" and r["temperature"] == "4")
    assert float(seed1["delta_vs_baseline"]) == pytest.approx(84.2 - mean([80.0, 83.0, 86.0]))


def test_other_seeds_give_a_welch_difference_within_the_noise(tmp_path: Path):
    root = tmp_path / "outputs"
    for seed, acc in {0: 81.0, 1: 84.2, 2: 86.9}.items():
        make_run(root, "distill", seed, acc, cell=(4.0, 0.9))
    for seed, acc in {3: 80.0, 4: 86.0}.items():
        make_run(root, "student_baseline", seed, acc)
    written = build_report([root], tmp_path / "report")
    cell = next(r for r in group_rows(written) if r["role"] == "distill")
    assert cell["delta_method"] == "welch"
    assert float(cell["delta_mean"]) == pytest.approx(mean([81.0, 84.2, 86.9]) - 83.0, abs=1e-4)
    assert float(cell["delta_ci_low"]) < 0 < float(cell["delta_ci_high"])
    markdown = written["markdown"].read_text()
    assert "Welch" in markdown and "is within the seed-to-seed noise" in markdown


def test_one_seed_each_cannot_be_judged_against_the_noise(tmp_path: Path):
    root = tmp_path / "outputs"
    make_run(root, "distill", 0, 85.0, cell=(4.0, 0.9))
    make_run(root, "student_baseline", 0, 84.0)
    markdown = build_report([root], tmp_path / "report")["markdown"].read_text()
    assert "+1.00 pp, cannot be told apart from seed-to-seed noise" in markdown


def test_a_grid_cell_and_a_separate_run_share_a_group(tmp_path: Path):
    root = tmp_path / "outputs"
    grid = ([2, 4], [0.5, 0.9])
    for cell, acc in {(2.0, 0.5): 80.0, (4.0, 0.9): 83.0}.items():
        make_run(root, "distill_grid", 0, acc, cell=cell, grid=grid)
    make_run(root, "distill", 1, 85.0, cell=(4.0, 0.9))  # 4.0: the grid's 4
    written = build_report([root], tmp_path / "report")
    rows = {r["temperature"]: r for r in group_rows(written)}
    assert rows["4"]["n"] == "2" and rows["4"]["seeds"] == "0 1"
    assert float(rows["4"]["test_acc_mean"]) == pytest.approx(84.0)
    assert rows["2"]["n"] == "1"
    assert written["markdown"].read_text().count("## Distilled small_cnn") == 1


# ---------------------------------------------------------------------- comparability
def test_incomparable_runs_are_never_averaged_or_tabled_together(tmp_path: Path):
    root = tmp_path / "outputs"
    make_run(root, "distill", 0, 80.0, cell=(4.0, 0.9), epochs=2)
    make_run(root, "distill", 1, 90.0, cell=(4.0, 0.9), epochs=4)  # another number of epochs
    make_run(root, "distill", 2, 70.0, cell=(4.0, 0.9), data__train_subset=500)
    make_run(root, "distill", 3, 60.0, cell=(4.0, 0.9), test_set="archive:eval_subset=100")
    make_run(root, "student_baseline", 0, 78.0, epochs=2)
    make_run(root, "student_baseline", 1, 75.0, epochs=3)  # comparable with none of them

    runs = collect_runs([root])
    distilled = [r for r in runs if r["role"] == "distill"]
    assert len({r["group"] for r in distilled}) == 4  # none averaged with another
    written = build_report([root], tmp_path / "report")
    rows = [r for r in group_rows(written) if r["role"] == "distill"]
    assert sorted(float(r["test_acc_mean"]) for r in rows) == [60.0, 70.0, 80.0, 90.0]
    assert all(r["n"] == "1" for r in rows)

    markdown = written["markdown"].read_text()
    sections = markdown.split("## ")[1:]
    tables = [s for s in sections if s.startswith("Distilled small_cnn")]
    assert len(tables) == 4  # one table per comparison, each saying what sets it apart
    assert any("trainer.max_epochs=4" in s.splitlines()[0] for s in tables)
    assert any("data.train_subset=500" in s.splitlines()[0] for s in tables)
    assert any("test_set=archive:eval_subset=100" in s.splitlines()[0] for s in tables)
    # only the 2-epoch, full-data comparison has a baseline: 80.0 - 78.0
    with_delta = [r for r in rows if r["delta_mean"]]
    assert [(r["test_acc_mean"], r["delta_mean"]) for r in with_delta] == [("80.0000", "2.0000")]
    assert markdown.count("none comparable (the baseline runs have ") == 3
    assert "epochs=2 (here 4)" in markdown or "epochs=3 (here 4)" in markdown
    # the two baselines are two rows of the runs trained alone, each saying how it differs
    assert (
        "| student_baseline (epochs=2, trainer.max_epochs=2) | small_cnn | 78.00 (n=1) |"
        in markdown
    )
    assert (
        "| student_baseline (epochs=3, trainer.max_epochs=3) | small_cnn | 75.00 (n=1) |"
        in markdown
    )
    for table in tables:  # each row shows its test images, epochs and seeds
        header = next(line for line in table.splitlines() if line.startswith("| T |"))
        assert header.endswith("| seeds | epochs | test images | group |")
    assert {"heatmap", "per_class"} <= set(written) and len(
        [k for k in written if k.startswith("heatmap")]
    ) == 4


# ------------------------------------------------------------------- validation split
def test_val_size_0_is_labelled_and_never_picks_the_best_cell(tmp_path: Path):
    root = tmp_path / "outputs"
    # T=2 has the higher "val" accuracy, T=4 the higher test accuracy
    make_run(root, "distill", 0, 80.0, cell=(2.0, 0.9), val_acc=95.0, validation="test_set")
    make_run(root, "distill", 0, 82.0, cell=(4.0, 0.9), val_acc=83.0, validation="test_set")
    markdown = build_report([root], tmp_path / "report")["markdown"].read_text()
    assert "best test acc over epochs (%)" in markdown and "best val acc (%)" not in markdown
    assert "Best distilled small_cnn: T=4, alpha=0.9" in markdown
    assert (
        "chosen on the highest mean test accuracy (these runs validate on the test set" in markdown
    )


def test_a_held_out_split_picks_the_best_cell_on_validation_accuracy(tmp_path: Path):
    root = tmp_path / "outputs"
    for seed in (0, 1):
        make_run(root, "distill", seed, 80.0 + seed, cell=(2.0, 0.9), val_acc=95.0 - seed)
        make_run(root, "distill", seed, 82.0 + seed, cell=(4.0, 0.9), val_acc=83.0)
    written = build_report([root], tmp_path / "report")
    markdown = written["markdown"].read_text()
    assert "| best val acc (%) |" in markdown
    assert "Best distilled small_cnn: T=2, alpha=0.9" in markdown
    assert "chosen on the highest mean validation accuracy (held-out split)" in markdown
    rows = {r["temperature"]: r for r in group_rows(written)}
    assert float(rows["2"]["val_acc_best_mean"]) == pytest.approx(94.5)


# -------------------------------------------------------------------------- debug runs
def test_debug_runs_are_left_out_of_tables_and_statistics(tmp_path: Path):
    root = tmp_path / "outputs"
    make_run(root, "distill", 0, 80.0, cell=(4.0, 0.9))
    make_run(root, "distill", 1, 82.0, cell=(4.0, 0.9))
    make_run(root, "distill", 0, 10.0, cell=(4.0, 0.9), debug=True)
    make_run(root, "distill", 0, 12.0, cell=(8.0, 0.9), debug=True)
    written = build_report([root], tmp_path / "report")
    rows = group_rows(written)
    assert [(r["temperature"], r["n"], r["test_acc_mean"]) for r in rows] == [("4", "2", "81.0000")]
    markdown = written["markdown"].read_text()
    assert "Left out of the tables and statistics: 2 debug run(s) (`run.debug: true`" in markdown
    assert "| 8 |" not in markdown
    debug = [r for r in read_csv(written["csv"]) if r["debug"] == "true"]
    assert sorted(r["test_acc"] for r in debug) == ["10.0000", "12.0000"]


# ------------------------------------------------------------------------ older runs
def test_runs_without_a_run_block_take_their_seed_from_config_yaml(tmp_path: Path):
    root = tmp_path / "outputs"
    for seed, acc in ((0, 80.0), (1, 84.0)):
        run = make_run(root, "distill", seed, acc, cell=(4.0, 0.9))
        metrics = json.loads((run / "metrics.json").read_text())
        del metrics["run"], metrics["validation"], metrics["test_set"]
        (run / "metrics.json").write_text(json.dumps(metrics))
    runs = collect_runs([root])
    assert sorted(r["seed"] for r in runs) == [0, 1] and len({r["group"] for r in runs}) == 1
    rows = group_rows(build_report([root], tmp_path / "report"))
    assert [(r["n"], r["seeds"], r["test_acc_mean"]) for r in rows] == [("2", "0 1", "82.0000")]


def test_a_repeated_seed_counts_once_and_class_means_skip_missing_classes():
    def run(seed, accuracy, cat, dog):
        return {"seed": seed, "accuracy": accuracy, "per_class": {"cat": cat, "dog": dog}}

    group = Group(
        "g", [run(0, 80.0, 70.0, None), run(0, 82.0, 72.0, None), run(1, 90.0, 80.0, 60.0)]
    )
    group.runs.append(run(None, 70.0, 50.0, None))  # an unknown seed counts on its own
    assert group.values() == [81.0, 90.0, 70.0] and group.summary().n == 3
    assert group.seeds == [0, 1, None]
    assert group.per_class() == {"cat": pytest.approx(mean([71.0, 80.0, 50.0])), "dog": 60.0}
    assert Group("h", [run(0, 80.0, 70.0, None)]).per_class()["dog"] is None
