"""``kdlight-train`` end to end in a subprocess: outputs, the real archive, clear errors."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli


@pytest.mark.slow
def test_quick_experiment_on_synthetic_data(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = [
        "experiment=quick",
        "data.source=synthetic",
        "data.train_subset=2000",
        "data.val_size=500",
        "trainer.max_epochs=3",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Accuracy of the network on the 2000 test images" in result.stdout

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "small_cnn" and metrics["test_images"] == 2000
    assert len(metrics["per_class_accuracy"]) == 10 and metrics["accuracy"] > 20.0
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (
        run_dir / "checkpoints" / "best.ckpt"
    ).exists()
    assert "source: synthetic" in (run_dir / "config.yaml").read_text()  # resolved config

    again = run_cli(args, tmp_path)  # a finished run is not trained or overwritten again
    assert again.returncode == 0 and "finished already" in again.stderr + again.stdout
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_real_archive_reports_all_10000_test_images(
    tmp_path: Path, archive: Path, archive_cache: Path
):
    run_dir = tmp_path / "run"
    args = [
        "experiment=quick", f"data.archive_path={archive}", f"data.data_dir={archive_cache}",
        "data.train_subset=256", "data.val_size=1000", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 10000
    assert list(metrics["per_class_accuracy"]) == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]  # fmt: skip
    assert "Accuracy of the network on the 10000 test images" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["data.archive_path=/nonexistent/cifar.tar.gz"],
            "CIFAR-10 archive not found: /nonexistent/cifar.tar.gz",
        ),
        (["data.batch_size=0"], "data.batch_size must be > 0"),
        (["model.name=resnet1000"], "unknown model 'resnet1000'; choose one of:"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str):
    result = run_cli(["experiment=quick", *args], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


def test_help_lists_the_groups(tmp_path: Path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0
    for group in ("experiment:", "model:", "optimizer:", "scheduler:", "debug:"):
        assert group in result.stdout


@pytest.mark.slow
def test_teacher_then_sweep_then_report(tmp_path: Path):
    """The reference workflow on synthetic data: teacher -> 2x2 T x alpha multirun -> report."""
    tiny = [
        "trainer=cpu", "data=synthetic", "data.synthetic_train_size=600", "data.synthetic_test_size=300",
        "data.val_size=100", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
    ]  # fmt: skip
    teacher = run_cli(["experiment=teacher", "model=resnet8", *tiny], tmp_path)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    assert (tmp_path / "outputs/teacher/resnet8/checkpoints/last.ckpt").exists()

    sweep = [
        "-m",
        "experiment=distill",
        "distill.teacher_model=resnet8",
        "distill.temperature=2,8",
        "distill.alpha=0.5,0.9",
    ]
    result = run_cli([*sweep, *tiny], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    grid = tmp_path / "outputs/distill/small_cnn"
    report = run_cli(
        [str(grid), "--out", str(tmp_path / "report")], tmp_path, entry="kdlight.report"
    )
    assert report.returncode == 0, report.stderr[-3000:]
    with open(tmp_path / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((float(r["temperature"]), float(r["alpha"])) for r in rows) == [
        (2, 0.5),
        (2, 0.9),
        (8, 0.5),
        (8, 0.9),
    ]
    assert all(r["status"] == "finished" for r in rows)
    for name in ("heatmap.png", "per_class.png"):
        with Image.open(tmp_path / "report" / name) as image:
            assert image.width > 300 and image.height > 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["distill.temperature=0"], "distill.temperature must be > 0, got 0"),
        (["distill.alpha=2"], "distill.alpha must be in [0, 1]"),
        ([], "teacher checkpoint not found"),
    ],
)
def test_bad_distillation_settings(tmp_path: Path, args: list[str], message: str):
    result = run_cli(["experiment=distill", "data=synthetic", "trainer=cpu", *args], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    if "not found" in message:
        assert "kdlight-train experiment=teacher" in errors[0]
