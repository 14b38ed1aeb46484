"""Every distillation method from the command line: a multirun over the methods, the
method grid in one process, and the report's comparison table (synthetic data, CPU)."""

import json
from pathlib import Path

import pytest

from kdlight.cli.report import main as report
from tests.conftest import run_cli

TINY = [
    "trainer=cpu", "data=synthetic", "data.synthetic_train_size=300",
    "data.synthetic_test_size=100", "data.val_size=50", "data.batch_size=50",
    "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
]  # fmt: skip
METHODS = [
    "kd",
    "dkd",
    "fitnet",
    "at",
    "sp",
    "vid",
    "nst",
    "kdsvd",
    "pkt",
    "rkd",
    "cc",
    "crd",
    "dist",
    "ctkd",
    "ttm",
    "wttm",
    "ofd",
    "mlkd",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A finished resnet8 teacher under <root>/outputs (found by distill.teacher_model)."""
    root = tmp_path_factory.mktemp("methods")
    result = run_cli(["experiment=teacher", "model=resnet8", *TINY], root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def metrics_of(folder: Path) -> dict[str, dict]:
    return {
        json.loads(path.read_text())["distiller"]: json.loads(path.read_text())
        for path in folder.rglob("metrics.json")
    }


@pytest.mark.slow
def test_every_method_trains_from_the_cli_and_the_report_compares_them(teacher: Path):
    methods = ["-m", "experiment=distill", "distill.teacher_model=resnet8"]
    result = run_cli([*methods, f"distiller={','.join(METHODS)}", *TINY], teacher)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = metrics_of(teacher / "outputs" / "distill")
    assert sorted(runs) == sorted(METHODS)
    assert runs["fitnet"]["distiller_settings"]["weight"] == 100.0
    assert runs["dkd"]["distiller_settings"]["beta"] == 8.0
    assert runs["crd"]["distiller_settings"]["num_negatives"] == 16384
    assert runs["at"]["taps"] == {
        "student": ["features.6", "features.13", "features.20"],
        "teacher": ["stages.0", "stages.1", "stages.2"],
    }
    folders = {p.parent.parent.name for p in (teacher / "outputs/distill").rglob("metrics.json")}
    assert {"T4_alpha0.9", "dkd_T4_alpha1_beta8", "fitnet_w100", "crd_w0.8"} <= folders

    # in this process: test_report runs kdlight-report's own process
    assert report([str(teacher / "outputs" / "distill"), "--out", str(teacher / "report")]) == 0
    text = (teacher / "report" / "report.md").read_text()
    for method in METHODS[1:]:
        assert f"| {method}:" in text, text
    assert (
        "| dkd: temperature=4.0, alpha=1.0, beta=8.0" in text and "| kd: T=4, alpha=0.9 |" in text
    )


@pytest.mark.slow
def test_the_method_grid_trains_every_method_in_one_process(teacher: Path):
    grid = ["experiment=method_grid", "distill.teacher_model=resnet8", "~methods.vid", *TINY]
    result = run_cli(grid, teacher)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = metrics_of(teacher / "outputs" / "method_grid")
    assert sorted(runs) == sorted(set(METHODS) - {"vid"})
    assert all(run["system"] == "DistillationGridModule" for run in runs.values())
    again = run_cli(grid, teacher)  # finished: nothing is trained again
    assert again.returncode == 0 and "this run has finished already" in again.stdout + again.stderr


def test_crd_on_several_processes_is_one_line_before_any_work(tmp_path: Path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    result = run_cli(["experiment=distill", "distiller=crd", *TINY, *ddp], tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: trainer.devices=2 is not allowed: 1 with distiller=crd (its memory banks are "
        "one process's, not shared)"
    ], result.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.ckpt"))
