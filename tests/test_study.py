"""``kdlight-study``: teacher -> student alone and methods x seeds -> report as one command,
locally (in this process, tiny) and on SLURM (a dry run, and submissions to a fake
``sbatch`` on PATH: the cluster's interface, which records what it was given)."""

import contextlib
import csv
import io
import os
import re
import signal
import stat
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kdlight.cli import study
from kdlight.cli.slurm import dry_run

# The pair's recipe at toy size: resnet8 for teacher and student, 48 synthetic CIFAR-100
# training images, one epoch. Not limit_*_batches: a debug run never counts as finished, so its
# students would never find their teacher.
TINY = [
    "model=resnet8", "distill.teacher_model=resnet8", "trainer=cpu", "data.source=synthetic",
    "data.synthetic_train_size=48", "data.synthetic_test_size=100", "data.val_size=16",
    "data.batch_size=16", "data.eval_batch_size=100", "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
]  # fmt: skip
STUDY = ["pair=resnet32x4_resnet8x4", "distiller=kd,dkd", "seed=0,1", *TINY]
# Steps of batch 16 gain nothing from a second thread, which spins where the 2 cores are
# shared (tests/conftest.py, one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def launch(args: list[str]) -> tuple[int, str, str]:
    """``kdlight-study ARGS`` in this process: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            study.main(args)
            status = 0
        except SystemExit as exit:
            status = exit.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny study run once, then launched again: both outputs, the report's folder."""
    root = tmp_path_factory.mktemp("study") / "outputs"
    args = [*STUDY, f"paths.root={root}"]
    threads = torch.get_num_threads()  # one_thread's setting, for this module-wide fixture
    torch.set_num_threads(1)
    try:
        first = launch(args)
        stamps = {p: p.stat().st_mtime_ns for p in root.rglob("metrics.json")}
        again = launch(args)
    finally:
        torch.set_num_threads(threads)
    return {
        "root": root,
        "first": first,
        "again": again,
        "stamps": stamps,
        "report": root / "study" / "resnet32x4_resnet8x4",
    }


def test_the_study_trains_teacher_then_students_and_reports(finished_study: dict):
    status, out, err = finished_study["first"]
    assert status == 0, out[-3000:] + err[-3000:]
    ran = re.findall(r"^running (.+?):", out, re.M)
    assert ran == [
        "teacher resnet8", "student alone seed 0", "student alone seed 1",
        "kd seed 0", "kd seed 1", "dkd seed 0", "dkd seed 1",
    ]  # fmt: skip
    report = finished_study["report"]
    assert f"report: {report}" in out
    rows = list(csv.DictReader((report / "report.csv").open()))
    assert [row["status"] for row in rows] == ["finished"] * 7
    roles = sorted(Path(row["path"]).relative_to(finished_study["root"]).parts[0] for row in rows)
    assert roles == ["teacher", *["zoo_distill"] * 4, *["zoo_student"] * 2]
    assert {row["seed"] for row in rows if "teacher" not in row["path"]} == {"0", "1"}
    # the question's answer: DKD against KD, paired by seed, and each against the baseline
    groups = {row["method"]: row for row in csv.DictReader((report / "groups.csv").open())}
    dkd, kd = groups["dkd"], groups["kd"]
    assert dkd["n"] == kd["n"] == "2" and dkd["reference"] == "kd"
    assert dkd["reference_group"] == kd["group"] and dkd["reference_delta_method"] == "paired"
    low, delta, high = (float(dkd[f"reference_delta_{k}"]) for k in ("ci_low", "mean", "ci_high"))
    assert low <= delta <= high
    means = float(dkd["test_acc_mean"]) - float(kd["test_acc_mean"])
    assert delta == pytest.approx(means, abs=1e-3)
    assert dkd["delta_method"] == kd["delta_method"] == "paired"  # against the student alone


def test_a_relaunched_study_skips_every_finished_run(finished_study: dict):
    status, out, err = finished_study["again"]
    assert status == 0, out[-3000:] + err[-3000:]
    assert not re.search(r"^running ", out, re.M)
    assert len(re.findall(r"^skipped \(finished\): ", out, re.M)) == 7
    root = finished_study["root"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("metrics.json")} == finished_study["stamps"]


def test_the_slurm_dry_run_shows_the_teacher_the_dependent_array_and_the_report(
    tmp_path: Path,
):
    status, out, err = launch([*STUDY, f"paths.root={tmp_path}", "--slurm", "--dry-run"])
    assert status == 0, err
    jobs = re.findall(r"^# job (\S+): .*?; (.+)$", out, re.M)
    assert jobs == [
        ("kdlight-teacher", "no dependency"),
        ("kdlight-students", "after kdlight-teacher (afterok:<kdlight-teacher job id>)"),
        ("kdlight-report", "after kdlight-students (afterany:<kdlight-students job id>)"),
    ]
    assert (
        "#SBATCH --array=0-5" in out
        and "experiment=zoo_teacher pair=resnet32x4_resnet8x4 model=resnet8" in out
    )
    tasks = re.findall(r"^  (\d)\) srun .* -m kdlight\.train (.*) ;;$", out, re.M)
    assert [n for n, _ in tasks] == list("012345")
    assert "experiment=zoo_student" in tasks[0][1] and "distiller=dkd" in tasks[5][1]
    assert "# dry run: 3 job(s), nothing submitted" in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # wrote nothing


def fake_sbatch(folder: Path) -> tuple[dict, Path]:
    """An ``sbatch`` that records its arguments, one call a line, and prints job ids 1001,
    1002, ... as ``sbatch --parsable`` does; the environment that puts it first on PATH."""
    calls = folder / "calls.txt"
    script = folder / "bin" / "sbatch"
    script.parent.mkdir(parents=True)
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\necho $((1000 + $(wc -l < "{calls}")))\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}"}, calls


def test_a_submission_makes_the_array_wait_for_the_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    env, calls = fake_sbatch(tmp_path / "cluster")
    monkeypatch.setenv("PATH", env["PATH"])
    out_dir = tmp_path / "study"
    args = [*STUDY, f"paths.root={tmp_path / 'outputs'}", "--out", str(out_dir)]
    status, out, err = launch([*args, "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    assert status == 0, err
    submitted = calls.read_text().splitlines()
    scripts = out_dir / "slurm"
    assert submitted == [
        f"--parsable {scripts / 'kdlight-teacher.sbatch'}",
        f"--parsable --dependency=afterok:1001 {scripts / 'kdlight-students.sbatch'}",
        f"--parsable --dependency=afterany:1002 {scripts / 'kdlight-report.sbatch'}",
    ]
    students = (scripts / "kdlight-students.sbatch").read_text()
    assert "#SBATCH --partition=gpu" in students and "#SBATCH --array=0-5" in students
    assert (
        "kdlight.cli.study pair=resnet32x4_resnet8x4 distiller=kd,dkd seed=0,1"
        in (scripts / "kdlight-report.sbatch").read_text()
    )
    assert "submitted kdlight-students (job 1002)" in out


def test_finished_runs_are_not_submitted(
    finished_study: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    env, calls = fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    args = [*STUDY, f"paths.root={finished_study['root']}", "--out", str(tmp_path / "study")]
    status, out, err = launch([*args, "--slurm"])
    assert status == 0, err
    (report,) = calls.read_text().splitlines()  # the report only, waiting for nothing
    assert report == f"--parsable {tmp_path / 'study' / 'slurm' / 'kdlight-report.sbatch'}"
    assert len(re.findall(r"^skipped \(finished\): ", out, re.M)) == 7


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["distiller=kd", "seed=0"], "a study needs pair=PAIR, one of "),
        (["pair=resnet32x4_nosuch"], "a study is one pair, one of "),
        (["pair=resnet32x4_resnet8x4", "distiller=kd,distil"], "distiller=distil is not a method"),
        (["pair=resnet32x4_resnet8x4", "seed=0,a"], "seeds are whole numbers"),
        (["pair=resnet32x4_resnet8x4", "seed=1.5"], "seeds are whole numbers"),
        (["pair=resnet32x4_resnet8x4", "optimizer.lr=0.1,0.05"], "sweeps distiller= and seed="),
        (["pair=resnet32x4_resnet8x4", "--dry-run"], "add --slurm"),
        (["pair=resnet32x4_resnet8x4", "optimizer.lrr=0.1"], "unknown setting 'optimizer.lrr'"),
        (
            ["pair=resnet32x4_resnet8x4", "--slurm", "hydra.launcher.partitoin=gpu"],
            "not a setting of the SLURM jobs",
        ),  # fmt: skip
        (
            ["pair=resnet32x4_resnet8x4", "--slurm", "--dry-run", "trainer=ddp"],
            "trainer.devices=auto is not allowed for hydra/launcher=slurm: set trainer.devices=N",
        ),  # fmt: skip
        (
            ["pair=resnet32x4_resnet8x4", "--slurm", "--dry-run", "hydra.launcher.nodes=two"],
            "hydra.launcher.nodes=two is not allowed: an integer",
        ),  # fmt: skip
    ],
)
def test_bad_input_is_one_line_before_any_work(args: list[str], says: str, tmp_path: Path):
    status, out, err = launch([*args, f"paths.root={tmp_path / 'outputs'}"])
    assert status == 2 and out == ""
    assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_the_slurm_dry_run_says_the_teacher_does_not_exist_yet(tmp_path: Path):
    args = ["experiment=zoo_distill", "pair=resnet32x4_resnet8x4", "distiller=kd,dkd"]
    text = dry_run([*args, "seed=0,1,2", "trainer.devices=1", f"paths.root={tmp_path}"])
    (line,) = [line for line in text.splitlines() if "teacher" in line]
    assert f"no finished resnet32x4 teacher under {tmp_path}/teacher/resnet32x4" in line
    assert "kdlight-study pair=resnet32x4_resnet8x4" in line


def test_a_teacher_stopped_by_its_time_limit_is_not_finished_and_no_student_starts(
    tmp_path: Path,
):
    # a first step of over 1.5 s against a 1 s limit: the teacher stops after the first of
    # its 2 steps, however fast or loaded the machine
    slow = "+callbacks.slow_steps={_target_:tests.slow_steps.SlowSteps,seconds:1.5}"
    args = [*STUDY, "trainer.max_time=00:00:00:01", slow, f"paths.root={tmp_path}"]
    status, out, err = launch(args)
    assert status == 1, out[-2000:] + err[-2000:]
    assert re.findall(r"^running (.+?):", out, re.M) == ["teacher resnet8"]
    assert re.search(r"^error: teacher resnet8: .*trainer\.max_time", err, re.M), err
    assert "no student can start without its teacher" in err
    assert not (tmp_path / "zoo_distill").exists() and not (tmp_path / "study").exists()
    assert (tmp_path / "teacher").exists() and not list(tmp_path.rglob("metrics.json"))


class SigtermAtFirstStep(Callback):
    """SIGTERM to this very process after the first training step: a job cancelled."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_the_study_with_one_line_and_the_run_kept(tmp_path: Path):
    stop = "+callbacks.stop={_target_:tests.test_study.SigtermAtFirstStep}"
    status, out, err = launch([*STUDY, stop, f"paths.root={tmp_path}"])
    assert status == 143, out[-2000:] + err[-2000:]
    assert re.findall(r"^running (.+?):", out, re.M) == ["teacher resnet8"]
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: teacher resnet8: ") and "SIGTERM" in line
    (run,) = (tmp_path / "teacher" / "resnet8").iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file()  # the same command continues it
    assert (run / "error.txt").read_text().strip() == line.removeprefix("error: teacher resnet8: ")
    assert not (tmp_path / "zoo_distill").exists()
