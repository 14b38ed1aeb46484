"""``kdlight-train`` end to end in a subprocess: outputs, the real archive, clear errors."""

import json
from pathlib import Path

import pytest

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
