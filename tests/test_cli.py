"""``kdlight-train`` end to end in a subprocess: outputs, the real archive, clear errors."""

import csv
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from kdlight.cli.report import collect_runs
from kdlight.cli.report import main as report
from tests.conftest import finish, run_cli, start_cli


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


#: Commands of ``experiment=quick`` that stop before any work: the error line's text.
BAD_INPUT = {
    "no_archive": (
        ["data.archive_path=/nonexistent/cifar.tar.gz"],
        "CIFAR-10 archive not found: /nonexistent/cifar.tar.gz",
    ),
    "batch_size_0": (["data.batch_size=0"], "data.batch_size=0 is not allowed: an integer >= 1"),
    "no_such_model": (
        ["model.name=resnet1000"],
        "model.name=resnet1000 is not allowed: one of mobilenetv2, ",
    ),
}
#: The same for ``experiment=distill`` on synthetic data.
BAD_DISTILLATION = {
    "temperature_0": (
        ["distill.temperature=0"],
        "distill.temperature=0 is not allowed: a finite number > 0",
    ),
    "alpha_2": (["distill.alpha=2"], "distill.alpha=2 is not allowed: a number in [0, 1]"),
    "no_teacher": ([], "no teacher of model resnet18_half under"),
}


@pytest.fixture(scope="module")
def quick_launches(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """``--help`` and each command of :data:`BAD_INPUT` and :data:`BAD_DISTILLATION`, by
    name: the folder it ran in and what it did. They are started together, each in its own
    folder: each spends seconds of one core importing torch, and the cores run them side by
    side."""
    commands = {"help": ["--help"]}
    commands |= {name: ["experiment=quick", *args] for name, (args, _) in BAD_INPUT.items()}
    distill = ["experiment=distill", "data=synthetic", "trainer=cpu"]
    commands |= {name: [*distill, *args] for name, (args, _) in BAD_DISTILLATION.items()}
    folders = {name: tmp_path_factory.mktemp(name) for name in commands}
    runs = {name: start_cli(args, folders[name]) for name, args in commands.items()}
    return {name: (folders[name], finish(run)) for name, run in runs.items()}


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_one_clear_line(quick_launches, name: str):
    folder, result = quick_launches[name]
    message = BAD_INPUT[name][1]
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    # the failed run says so in its directory too, for kdlight-report
    error_files = list((folder / "outputs").rglob("error.txt"))
    assert len(error_files) == 1
    for error_file in error_files:
        assert f"error: {error_file.read_text()}" == f"{errors[0]}\n"
        (run,) = collect_runs([error_file.parent])
        assert run["status"] == "failed" and message in run["error"]


def test_help_lists_the_groups(quick_launches):
    _, result = quick_launches["help"]
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
    assert (
        len(list((tmp_path / "outputs/teacher/resnet8").glob("seed0-*/checkpoints/last.ckpt"))) == 1
    )

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
    # in this process: test_report runs kdlight-report's own process
    assert report([str(grid), "--out", str(tmp_path / "report")]) == 0
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


@pytest.mark.parametrize("name", BAD_DISTILLATION)
def test_bad_distillation_settings(quick_launches, name: str):
    _, result = quick_launches[name]
    message = BAD_DISTILLATION[name][1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    if "no teacher" in message:
        assert "kdlight-train experiment=teacher" in errors[0]


#: The issue's own check: a tiny baseline on synthetic data, two seeds.
SEEDS = [
    "experiment=student_baseline", "trainer=cpu", "data=synthetic", "model=resnet8",
    "data.synthetic_train_size=400", "data.synthetic_test_size=200", "data.batch_size=100",
    "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
]  # fmt: skip


def snapshot(root: Path, skip_hydra: bool = False) -> dict[str, tuple[int, int]]:
    """Every file below ``root``: its size and modification time. With ``skip_hydra``, what
    each launch itself writes (Hydra's ``.hydra/``, job log and multirun.yaml, and the run's
    lock file) is left out."""
    files = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        hydra_own = ".hydra/" in relative or path.suffix == ".log"
        hydra_own |= path.name in ("multirun.yaml", ".lock")
        if path.is_file() and not (skip_hydra and hydra_own):
            files[relative] = (path.stat().st_size, path.stat().st_mtime_ns)
    return files


@pytest.mark.slow
def test_seeds_are_runs_a_changed_command_is_a_new_run_and_evaluation_touches_nothing(
    tmp_path: Path,
):
    outputs = tmp_path / "outputs" / "student_baseline" / "resnet8"
    first = run_cli(["-m", *SEEDS, "trainer.max_epochs=1", "seed=0,1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(outputs.glob("seed*/metrics.json"))
    assert [p.parent.name.split("-")[0] for p in runs] == ["seed0", "seed1"]
    records = [json.loads(p.read_text()) for p in runs]
    assert [r["run"]["seed"] for r in records] == [0, 1]
    assert all(
        r["run"]["id"] == p.parent.name.split("-")[1] for r, p in zip(records, runs, strict=True)
    )

    assert report([str(outputs), "--out", str(tmp_path / "report")]) == 0
    mean = sum(r["accuracy"] for r in records) / 2
    std = (sum((r["accuracy"] - mean) ** 2 for r in records) / (2 - 1)) ** 0.5
    assert f"{mean:.2f} ± {std:.2f} (n=2)" in (tmp_path / "report" / "report.md").read_text()

    before = snapshot(tmp_path / "outputs", skip_hydra=True)
    again = run_cli(["-m", *SEEDS, "trainer.max_epochs=1", "seed=0,1"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("finished already, nothing to do") == 2
    assert snapshot(tmp_path / "outputs", skip_hydra=True) == before

    longer = run_cli([*SEEDS, "trainer.max_epochs=2", "seed=0"], tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert len(list(outputs.glob("seed*/metrics.json"))) == 3

    before = snapshot(tmp_path / "outputs")
    missing = run_cli([*SEEDS, "train=false"], tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ckpt_path=PATH" in errors[0], missing.stderr[-2000:]

    checkpoint = runs[0].parent / "checkpoints" / "last.ckpt"
    evaluation = run_cli([*SEEDS, "train=false", f"ckpt_path={checkpoint}"], tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    after = snapshot(tmp_path / "outputs")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing touched
    evaluated = list(outputs.glob("eval-*/metrics.json"))
    assert len(evaluated) == 1
    assert json.loads(evaluated[0].read_text())["accuracy"] == records[0]["accuracy"]


@pytest.mark.slow
def test_a_checkpoint_of_another_config_is_never_resumed(tmp_path: Path):
    shared = f"hydra.run.dir={tmp_path / 'shared'}"  # two configs made to share a folder
    first = run_cli([*SEEDS, "trainer.max_epochs=1", "test=false", shared], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "shared" / "checkpoints" / "last.ckpt"
    written = last.stat().st_mtime_ns

    other = run_cli(
        [*SEEDS, "trainer.max_epochs=1", "optimizer.lr=0.01", "seed=7", shared], tmp_path
    )
    assert other.returncode == 2 and "Traceback" not in other.stderr
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, other.stderr[-2000:]
    assert "belongs to another run (it differs in seed, optimizer.lr)" in errors[0]
    assert (
        last.stat().st_mtime_ns == written and not (tmp_path / "shared" / "metrics.json").exists()
    )

    same = run_cli([*SEEDS, "trainer.max_epochs=1", shared], tmp_path)  # its own run resumes
    assert same.returncode == 0, same.stderr[-3000:]
    assert "resuming from" in same.stderr + same.stdout
