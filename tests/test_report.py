"""``kdlight.cli.report`` on fake run directories: records, CSV, Markdown, plots and the CLI,
odd run files, and a report that cannot be written."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from kdlight.analysis.records import MAX_DEPTH, MAX_FILE_BYTES
from kdlight.cli.report import build_report, collect_runs, main

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
GRID = {(1.0, 0.5): 81.0, (1.0, 0.9): 82.5, (4.0, 0.5): 83.25, (4.0, 0.9): 85.5}
TEACHER, BASELINE = 90.0, 84.0


def make_run(
    run_dir: Path,
    root: Path,
    name: str,
    model: str,
    accuracy: float | None = None,
    temperature: float | None = None,
    alpha: float | None = None,
    error: str | None = None,
    config_root: str | None = None,
) -> Path:
    """A run directory as ``kdlight-train`` leaves it: finished, failed (``error``) or unfinished."""
    teacher_ckpt = str(root / "teacher" / "resnet18_half" / "checkpoints" / "last.ckpt")
    distill = temperature is not None
    system = "DistillationModule" if distill else "ClassifierModule"
    cfg = {
        "name": name,
        "model": {"name": model},
        "module": {"_target_": f"kdlight.lit.{system}"},
        "paths": {"root": config_root or str(root), "output_dir": str(run_dir)},
    }
    if distill:
        cfg["distill"] = {
            "temperature": temperature,
            "alpha": alpha,
            "teacher_checkpoint": teacher_ckpt,
        }
    (run_dir / ".hydra").mkdir(parents=True)
    if error:  # a run stopped on bad input never writes the resolved config.yaml
        cfg["paths"]["output_dir"] = "${hydra:runtime.output_dir}"
        OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")
        (run_dir / "error.txt").write_text(f"{error}\n")
        return run_dir
    OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")
    if accuracy is not None:
        metrics = {
            "system": system,
            "model": model,
            "epochs": 2,
            "test_images": 10000,
            "accuracy": accuracy,
            "per_class_accuracy": {c: accuracy + i - 4.5 for i, c in enumerate(CLASSES)},
            "val_acc_best": accuracy + 0.5,
        }
        if distill:
            metrics |= {
                "temperature": temperature,
                "alpha": alpha,
                "teacher_model": "resnet18_half",
            }
            metrics |= {"teacher_checkpoint": teacher_ckpt, "teacher_accuracy": TEACHER}
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return run_dir


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A 2x2 grid, its teacher and baseline, a failed cell and an unfinished one."""
    root = tmp_path / "outputs"
    make_run(root / "teacher" / "resnet18_half", root, "teacher", "resnet18_half", TEACHER)
    make_run(
        root / "student_baseline" / "small_cnn", root, "student_baseline", "small_cnn", BASELINE
    )
    grid = root / "distill" / "small_cnn"
    for (t, a), acc in GRID.items():
        make_run(grid / f"T{t:g}_alpha{a}", root, "distill", "small_cnn", acc, t, a)
    error = "distill.alpha must be in [0, 1], got 1.5"
    make_run(grid / "T16_alpha1.5", root, "distill", "small_cnn", None, 16.0, 1.5, error=error)
    make_run(grid / "T16_alpha0.5", root, "distill", "small_cnn", None, 16.0, 0.5)
    (grid / "multirun.yaml").write_text("hydra: {}\n")
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_collect_runs_reads_every_status_and_the_delta(outputs: Path):
    runs = collect_runs([outputs, outputs / "distill"])  # overlapping dirs: no duplicates
    assert len(runs) == 8
    by_cell = {
        (r["temperature"], r["alpha"]): r for r in runs if r["system"] == "DistillationModule"
    }
    for cell, accuracy in GRID.items():
        assert by_cell[cell]["status"] == "finished"
        assert by_cell[cell]["delta_vs_baseline"] == pytest.approx(accuracy - BASELINE)
        assert by_cell[cell]["per_class"]["truck"] == pytest.approx(accuracy + 4.5)
    failed, unfinished = by_cell[(16.0, 1.5)], by_cell[(16.0, 0.5)]
    assert failed["status"] == "failed" and "alpha must be in [0, 1]" in failed["error"]
    assert unfinished["status"] == "unfinished" and unfinished["delta_vs_baseline"] is None
    assert [r["model"] for r in runs][:2] == ["resnet18_half", "small_cnn"]


def test_build_report_writes_csv_markdown_and_plots(outputs: Path, tmp_path: Path):
    written = build_report([outputs], tmp_path / "report")
    assert set(written) == {"csv", "groups", "markdown", "heatmap", "per_class"}

    rows = read_csv(written["csv"])
    assert len(rows) == 8
    assert {
        "test_acc",
        "delta_vs_baseline",
        "teacher_acc",
        "acc_airplane",
        "acc_truck",
        "error",
        "path",
    } <= set(rows[0])
    cells = {(r["temperature"], r["alpha"]): r for r in rows if r["temperature"]}
    assert set(cells) == {
        ("1", "0.5"),
        ("1", "0.9"),
        ("4", "0.5"),
        ("4", "0.9"),
        ("16", "1.5"),
        ("16", "0.5"),
    }
    assert float(cells[("4", "0.9")]["delta_vs_baseline"]) == pytest.approx(1.5)
    assert float(cells[("1", "0.5")]["delta_vs_baseline"]) == pytest.approx(-3.0)
    assert float(cells[("4", "0.9")]["teacher_acc"]) == pytest.approx(TEACHER)
    assert cells[("16", "1.5")]["status"] == "failed" and "got 1.5" in cells[("16", "1.5")]["error"]
    assert cells[("16", "0.5")]["status"] == "unfinished" and cells[("16", "0.5")]["test_acc"] == ""
    plain = [r for r in rows if not r["temperature"]]
    assert sorted(float(r["test_acc"]) for r in plain) == [BASELINE, TEACHER]

    markdown = written["markdown"].read_text()
    assert (
        "Teacher (resnet18_half): 90.00%" in markdown and "baseline (small_cnn): 84.00%" in markdown
    )
    assert "T=4, alpha=0.9" in markdown and "+1.50" in markdown
    assert "T16_alpha1.5" in markdown and "distill.alpha must be in [0, 1], got 1.5" in markdown
    assert "T16_alpha0.5` (unfinished)" in markdown
    assert "Teacher cache" not in markdown  # no run asked for it

    for key in ("heatmap", "per_class"):
        with Image.open(written[key]) as image:
            image.verify()
        with Image.open(written[key]) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_baseline_and_teacher_are_found_under_paths_root(outputs: Path, tmp_path: Path):
    runs = collect_runs([outputs / "distill" / "small_cnn"])
    assert len(runs) == 6  # the grid only; baseline and teacher are read from paths.root
    finished = [r for r in runs if r["status"] == "finished"]
    assert all(r["delta_vs_baseline"] is not None for r in finished)
    written = build_report([outputs / "distill" / "small_cnn"], tmp_path / "report")
    assert "Teacher (resnet18_half): 90.00%" in written["markdown"].read_text()
    assert "per_class" in written


def test_no_baseline_leaves_delta_empty_and_bad_metrics_is_a_failure(tmp_path: Path):
    root = tmp_path / "outputs"
    make_run(root / "distill" / "a", root, "distill", "small_cnn", 70.0, 2.0, 0.5)
    broken = make_run(root / "distill" / "b", root, "distill", "small_cnn", 71.0, 2.0, 0.9)
    (broken / "metrics.json").write_text("{not json")
    written = build_report([root], tmp_path / "report")
    rows = {r["alpha"]: r for r in read_csv(written["csv"])}
    assert rows["0.5"]["status"] == "finished" and rows["0.5"]["delta_vs_baseline"] == ""
    assert rows["0.9"]["status"] == "failed" and "unreadable metrics.json" in rows["0.9"]["error"]
    assert "not found" in written["markdown"].read_text()
    assert written["heatmap"].exists() and "per_class" in written  # the best student alone


def test_relative_root_and_a_second_student_model(tmp_path: Path):
    root, rel = tmp_path / "outputs", {"config_root": "outputs"}  # kdlight-train's default root
    make_run(root / "student_baseline" / "small_cnn", root, "student_baseline", "small_cnn", 80.0)
    grid = root / "distill"
    make_run(grid / "small_cnn" / "a", root, "distill", "small_cnn", 82.0, 4.0, 0.0, **rel)
    make_run(grid / "small_cnn" / "b", root, "distill", "small_cnn", 79.0, 4.0, 0.5, **rel)
    make_run(grid / "resnet8" / "a", root, "distill", "resnet8", 70.0, 2.0, 0.5, **rel)

    runs = collect_runs([grid])
    small = [r for r in runs if r["model"] == "small_cnn"]
    assert [(r["alpha"], r["delta_vs_baseline"]) for r in small] == [(0.0, 2.0), (0.5, -1.0)]
    written = build_report([grid], tmp_path / "report")
    assert {"heatmap", "heatmap_resnet8", "per_class"} <= set(written)  # small_cnn has more runs
    assert written["heatmap_resnet8"].exists()


def test_a_fused_grid_parent_is_not_a_run(tmp_path: Path):
    root = tmp_path / "outputs"
    parent = make_run(root / "fused", root, "distill", "small_cnn", None, 4.0, 0.9)
    for t in (2.0, 4.0):
        make_run(parent / f"T{t:g}_alpha0.9", root, "distill", "small_cnn", 80.0 + t, t, 0.9)
    runs = collect_runs([root])
    assert [(r["temperature"], r["status"]) for r in runs] == [(2.0, "finished"), (4.0, "finished")]


def test_cli_prints_the_table_and_writes_the_report(outputs: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert main([str(outputs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| T | alpha | test acc (%): mean ± std (n) | 95% CI |" in printed
    assert "| 4 | 0.9 | 85.50 (n=1) | — | +1.50 | — |" in printed
    assert f"wrote {out / 'heatmap.png'}" in printed
    assert (out / "report.csv").exists() and (out / "per_class.png").exists()


def test_cli_default_out_is_the_first_dir(outputs: Path, capsys):
    assert main([str(outputs / "distill")]) == 0
    assert (outputs / "distill" / "report.md").exists()


def test_cli_errors_on_missing_or_empty_dirs(tmp_path: Path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and len(err.strip().splitlines()) == 1

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run directories") and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------- odd files, bad --out
#: (field, wrong value, the reason the report gives)
ODD_FIELDS = [
    ("model", 5, "model is 5, expected a string"),
    ("teacher_checkpoint", 7, "teacher_checkpoint is 7, expected a string"),
    ("accuracy", "85.5", 'accuracy is "85.5", expected a percentage in [0, 100]'),
    ("accuracy", 1.7e308, "accuracy is 1.7e+308, expected a percentage in [0, 100]"),
    ("accuracy", 250, "accuracy is 250, expected a percentage in [0, 100]"),
    (
        "per_class_accuracy",
        {"cat": 85.0, "dog": -40},
        "per_class_accuracy.dog is -40, expected a percentage in [0, 100]",
    ),
    (
        "teacher_accuracy",
        float("inf"),
        "teacher_accuracy is Infinity, expected a percentage in [0, 100]",
    ),
    ("temperature", -4, "temperature is -4, expected a finite number > 0"),
    ("epochs", 2.5, "epochs is 2.5, expected a whole number >= 0"),
    ("per_class_accuracy", [1, 2], "per_class_accuracy is [1, 2], expected an object"),
    ("val_acc_best", True, "val_acc_best is true, expected a percentage in [0, 100]"),
    ("validation", "maybe", "validation is 'maybe', expected one of ('held_out', 'test_set')"),
    ("run", {"settings": {}, "seed": "zero"}, 'run.seed is "zero", expected a whole number'),
    ("run", {"seed": 0}, "run.settings is missing, expected an object"),
    (
        "teacher_cache",
        {"used": True, "hit_rate": "x", "path": "/data/teacher_cache"},
        'teacher_cache.hit_rate is "x", expected a number in [0, 1]',
    ),
    (
        "teacher_cache",
        {"used": True, "hit_rate": 1.5, "path": "/data/teacher_cache"},
        "teacher_cache.hit_rate is 1.5, expected a number in [0, 1]",
    ),
    ("teacher_cache", {"hit_rate": None}, "teacher_cache.used is missing, expected true or false"),
    ("teacher_cache", {"used": True, "path": 3}, "teacher_cache.path is 3, expected a string"),
]


def test_wrong_typed_fields_fail_their_runs_only(outputs: Path, tmp_path: Path):
    grid = outputs / "distill" / "small_cnn"
    for k, (field, value, _) in enumerate(ODD_FIELDS):
        run = make_run(grid / f"odd{k}", outputs, "distill", "small_cnn", 95.0, 32.0, k / 10)
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps(metrics | {field: value}))
    written = build_report([outputs], tmp_path / "report")
    rows = {Path(r["path"]).name: r for r in read_csv(written["csv"])}
    markdown = written["markdown"].read_text()
    for k, (_, _, reason) in enumerate(ODD_FIELDS):
        assert rows[f"odd{k}"]["status"] == "failed"
        assert rows[f"odd{k}"]["error"] == f"unreadable metrics.json: {reason}"
        assert f"`distill/small_cnn/odd{k}` (failed): unreadable metrics.json: {reason}" in markdown
    assert sum(r["status"] == "finished" for r in rows.values()) == 6  # the rest is reported
    assert "Best distilled small_cnn: T=4, alpha=0.9" in markdown  # no 95% from an odd run


def add_teacher_cache(run_dir: Path, used: bool, hit_rate: float | None = None) -> None:
    """The ``teacher_cache`` block a run of ``distill.teacher_cache=true`` writes."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    path = str(run_dir.parent / "teacher_cache") if used else None
    block = {"used": used, "hit_rate": hit_rate, "path": path}
    (run_dir / "metrics.json").write_text(json.dumps(metrics | {"teacher_cache": block}))


def test_teacher_cache_use_and_hit_rate_are_reported(outputs: Path, tmp_path: Path):
    grid = outputs / "distill" / "small_cnn"
    add_teacher_cache(grid / "T1_alpha0.5", True, 0.00621)
    add_teacher_cache(grid / "T4_alpha0.9", True, 0.46123)
    add_teacher_cache(grid / "T1_alpha0.9", False)  # asked, but its method read features
    runs = {Path(r["path"]).name: r for r in collect_runs([outputs])}
    assert [runs[n]["teacher_cache"] for n in ("T1_alpha0.5", "T1_alpha0.9", "T4_alpha0.5")] == [
        True,
        False,
        None,
    ]
    assert runs["T4_alpha0.9"]["teacher_cache_hit_rate"] == 0.46123
    assert runs["T1_alpha0.9"]["teacher_cache_hit_rate"] is None

    written = build_report([outputs], tmp_path / "report")
    with open(written["csv"], newline="") as f:
        head = next(csv.reader(f))
    at = head.index("group")
    assert head[at : at + 4] == ["group", "teacher_cache", "teacher_cache_hit_rate", "acc_airplane"]
    rows = {Path(r["path"]).name: r for r in read_csv(written["csv"])}
    cache = {name: (r["teacher_cache"], r["teacher_cache_hit_rate"]) for name, r in rows.items()}
    assert cache["T1_alpha0.5"] == ("true", "0.0062")  # 4 decimals
    assert cache["T4_alpha0.9"] == ("true", "0.4612")
    assert cache["T1_alpha0.9"] == ("false", "")
    assert cache["T4_alpha0.5"] == cache["small_cnn"] == cache["T16_alpha1.5"] == ("", "")

    lines = written["markdown"].read_text().splitlines()
    line = (
        "- Teacher cache: used by 2 of 4 runs, hit rate 0.0062 to 0.4612 (a hit is the "
        "teacher's exact logits, so accuracies are unaffected)"
    )
    assert lines[lines.index(line) - 1].startswith("- Teacher (resnet18_half): 90.00%")
    assert lines.count(line) == 1


def test_a_teacher_cache_asked_for_but_not_used_says_so(outputs: Path, tmp_path: Path):
    cells = sorted((outputs / "distill" / "small_cnn").glob("T[14]_*"))
    for cell in cells[:2]:
        add_teacher_cache(cell, False)
    markdown = build_report([outputs], tmp_path / "report")["markdown"].read_text()
    assert (
        "- Teacher cache: asked for by 2 runs, not used (their method reads the teacher's "
        "features)\n- Student baseline (small_cnn)" in markdown
    )
    for cell in cells:
        add_teacher_cache(cell, True, 0.25)  # one hit rate for all: shown once
    markdown = build_report([outputs], tmp_path / "report")["markdown"].read_text()
    assert "- Teacher cache: used by 4 of 4 runs, hit rate 0.2500 (a hit" in markdown


def test_a_class_without_test_images_reads_as_empty(outputs: Path, tmp_path: Path):
    for value in (None, float("nan")):  # null (strict JSON) and NaN (older runs)
        odd = outputs / "distill" / "small_cnn" / "T4_alpha0.9" / "metrics.json"
        metrics = json.loads(odd.read_text())
        metrics["per_class_accuracy"]["truck"] = value
        odd.write_text(json.dumps(metrics))
        written = build_report([outputs], tmp_path / "report")
        row = next(r for r in read_csv(written["csv"]) if r["path"].endswith("T4_alpha0.9"))
        assert row["status"] == "finished" and row["acc_truck"] == "" and row["acc_cat"] != ""


def billion_laughs(levels: int = 9) -> str:
    """A "billion laughs" YAML: each of ``levels`` lists holds nine aliases of the one before,
    9**levels strings from 400 bytes."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * 9)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.fault
def test_a_fifo_and_a_billion_laughs_are_unreadable_runs_not_a_hang(outputs: Path, tmp_path: Path):
    """A FIFO never gets a writer and the laughs expand for hours: the report ran in a
    process of its own, with a time limit, so that a hang fails this test, not the suite."""
    grid = outputs / "distill" / "small_cnn"
    fifo = make_run(grid / "fifo", outputs, "distill", "small_cnn", 95.0, 32.0, 0.1)
    (fifo / "metrics.json").unlink()
    os.mkfifo(fifo / "metrics.json")
    laughs = make_run(grid / "laughs", outputs, "distill", "small_cnn", 95.0, 32.0, 0.2)
    (laughs / "config.yaml").write_text(billion_laughs())
    failed = make_run(grid / "failed", outputs, "distill", "small_cnn", None, 32.0, 0.3, "x")
    (failed / "error.txt").unlink()
    os.mkfifo(failed / "error.txt")
    out = tmp_path / "report"
    command = [sys.executable, "-m", "kdlight.cli.report", str(outputs), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in read_csv(out / "report.csv")}
    assert (rows["fifo"]["status"], rows["laughs"]["status"]) == ("failed", "failed")
    assert rows["fifo"]["error"] == "unreadable metrics.json: it is a FIFO, not a regular file"
    assert rows["failed"]["error"] == "unreadable error.txt: it is a FIFO, not a regular file"
    assert rows["laughs"]["error"] == (
        "unreadable config.yaml: it holds YAML anchors or aliases (& and *), which kdlight "
        "never writes"
    )
    assert "Best distilled small_cnn: T=4, alpha=0.9" in (out / "report.md").read_text()


@pytest.mark.fault
def test_an_oversized_or_deeply_nested_file_is_an_unreadable_run(outputs: Path):
    grid = outputs / "distill" / "small_cnn"
    big = make_run(grid / "big", outputs, "distill", "small_cnn", 95.0, 32.0, 0.1)
    metrics = (big / "metrics.json").read_text()
    (big / "metrics.json").write_text(metrics + " " * MAX_FILE_BYTES)  # valid JSON still
    deep = make_run(grid / "deep", outputs, "distill", "small_cnn", 95.0, 32.0, 0.2)
    (deep / "config.yaml").write_text("{a: " * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1))
    nested = make_run(grid / "nested", outputs, "distill", "small_cnn", 95.0, 32.0, 0.3)
    (nested / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)  # past Python's stack
    runs = {Path(r["path"]).name: r for r in collect_runs([outputs])}
    assert [runs[name]["status"] for name in ("big", "deep", "nested")] == ["failed"] * 3
    assert runs["big"]["error"] == (
        "unreadable metrics.json: it holds more than 4 MiB, more than a run's record"
    )
    assert runs["deep"]["error"] == (
        f"unreadable config.yaml: it nests deeper than {MAX_DEPTH} levels"
    )
    assert runs["nested"]["error"] == "unreadable metrics.json: it nests too deeply to parse"


def test_an_unwritable_out_is_one_line_and_exit_2(outputs: Path, tmp_path: Path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    for out, reason in ((afile, "it is a file, not a folder"), (afile / "sub", "Not a directory")):
        assert main([str(outputs), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"error: cannot write report to {out}: {reason}\n"
        assert captured.out == ""
    assert afile.read_text() == "not a folder\n"


@pytest.mark.fault
def test_a_full_disk_leaves_whole_files_and_says_so(
    outputs: Path, tmp_path: Path, mount_tmpfs, capsys
):
    # a real 64 KiB tmpfs: room for the CSVs and the Markdown, not for the plots
    out = mount_tmpfs(tmp_path / "small", "64k") / "report"
    assert main([str(outputs), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: cannot write report to {out}: No space left on device\n"
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if name.endswith(".tmp")]  # no temporary left behind
    assert "report.md" in left and "heatmap.png" not in left
    assert len(read_csv(out / "report.csv")) == 8  # what was written is whole
    markdown = (out / "report.md").read_text()
    assert markdown.endswith("distill.alpha must be in [0, 1], got 1.5\n")
