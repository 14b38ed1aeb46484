"""A run that did not train what it was asked never counts as finished: a time limit, a
training split that gives no batch, or any other stop the user did not ask for ends in one
line with last.ckpt kept; an early stop the user asked for is a result, recorded as one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlight.errors import KDLightError
from kdlight.runs.completion import NotFinished
from kdlight.train import train
from tests.conftest import REPO, compose_config

BASE = [
    "experiment=student_baseline", "trainer=cpu", "data=synthetic", "model=resnet8",
    "model.width=0.5", "data.synthetic_train_size=200", "data.synthetic_test_size=100",
    "data.val_size=40", "data.batch_size=40", "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
]  # fmt: skip


def test_a_training_split_without_a_batch_is_refused_before_any_work(tmp_path: Path):
    cfg = compose_config([*BASE, "data.drop_last=true", "data.batch_size=400"], tmp_path / "run")
    with pytest.raises(KDLightError) as refused:
        train(cfg)
    line = str(refused.value)
    assert "no training step" in line and "data.batch_size=400" in line and "160" in line
    assert "\n" not in line
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_launch_that_runs_out_of_time_is_not_finished_and_the_same_command_continues(
    tmp_path: Path,
):
    """``trainer.max_time`` is each launch's limit: a run that reaches it saves last.ckpt at
    the step reached and stops, not finished (no metrics.json, one line);
    launched again, the same command goes on from there, and the run that finishes in
    several launches ends with exactly the weights of one never stopped."""
    from kdlight.lit.loading import load_model

    once = tmp_path / "once"
    train(compose_config([*BASE, "trainer.max_epochs=4"], once))
    run_dir = tmp_path / "chunked"
    cfg = compose_config([*BASE, "trainer.max_epochs=4", "trainer.max_time=00:00:00:00.2"], run_dir)
    lines = []
    for _ in range(20):  # a launch trains at least one step, so this ends
        try:
            finished = train(cfg)
            break
        except NotFinished as stopped:
            lines.append(str(stopped))
            assert not (run_dir / "metrics.json").exists()
    assert lines, "the 0.2 s limit never stopped a launch: nothing was tested"
    assert lines[0].startswith(
        "not finished: trainer.max_time (0.2 s for each launch) ran out at step"
    )
    assert lines[0].endswith("last.ckpt is current: launch the same command again to continue")
    assert finished["accuracy"] == json.loads((once / "metrics.json").read_text())["accuracy"]
    ours = load_model(run_dir / "checkpoints" / "last.ckpt").state_dict()
    reference = load_model(once / "checkpoints" / "last.ckpt").state_dict()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_a_time_limit_of_zero_is_refused_before_any_work(tmp_path: Path):
    cfg = compose_config([*BASE, "trainer.max_time=00:00:00:00"], tmp_path / "run")
    with pytest.raises(KDLightError, match=r"trainer.max_time=00:00:00:00 is not allowed"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_fit_that_ends_short_for_no_asked_reason_is_not_finished(tmp_path: Path):
    """Whatever else ends a fit early (here a callback that sets trainer.should_stop, as
    Lightning's own Timer does) is not a result."""
    from lightning.pytorch.callbacks import Callback

    from kdlight.runs.completion import check_finished
    from tests.conftest import cpu_trainer, synthetic_datamodule

    class StopAfterTwoSteps(Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 2

    from kdlight.lit import ClassifierModule
    from kdlight.models import create_model

    trainer = cpu_trainer(tmp_path, epochs=2, callbacks=[StopAfterTwoSteps()])
    trainer.fit(
        ClassifierModule(create_model("resnet8", width=0.5)), synthetic_datamodule(200, 50, 40, 40)
    )
    with pytest.raises(NotFinished, match=r"not finished: trained 2 of 8 steps \(0 of 2 epochs\)"):
        check_finished(trainer)


def test_an_early_stop_the_user_asked_for_is_a_result_that_says_so(tmp_path: Path):
    """EarlyStopping (no epoch improves val/acc by 2, so it stops after the second epoch) is
    the user's own stop: the run is finished, its metrics.json records where and why."""
    early = (
        "+callbacks.early_stopping={_target_: lightning.pytorch.callbacks.EarlyStopping, "
        "monitor: val/acc, mode: max, patience: 1, min_delta: 2.0}"
    )
    run_dir = tmp_path / "run"
    cfg = compose_config([*BASE, "trainer.max_epochs=6", early], run_dir)
    train(cfg)
    record = json.loads((run_dir / "metrics.json").read_text())["run"]["stopped_early"]
    assert record["epoch"] == 1 and record["monitor"] == "val/acc" and record["patience"] == 1
    assert train(cfg) is not None  # finished already: the same command does nothing


#: Run inside a user and mount namespace (no root needed) on a small tmpfs at ``run``: a
#: run whose disk fills up as testing starts, so that only metrics.json cannot be written.
FULL_AT_TEST = """
import sys
from pathlib import Path
from lightning.pytorch.callbacks import Callback
from tests.conftest import compose_config
from kdlight.errors import find_user_error
from kdlight.train import train

run = Path(sys.argv[1])

class FillTheDisk(Callback):
    def on_test_start(self, trainer, pl_module):
        with open(run / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(bytes(1 << 16))
            except OSError:
                pass

cfg = compose_config(sys.argv[2:], run)
import kdlight.train as entry
build = entry.build_trainer
entry.build_trainer = lambda cfg, callbacks: build(cfg, [*callbacks, FillTheDisk()])
try:
    train(cfg)
except Exception as error:
    print("LINE:", find_user_error(error))
entry.build_trainer = build
(run / "filler").unlink()
print("AGAIN:", train(cfg)["accuracy"])
"""


@pytest.mark.fault
def test_a_disk_that_fills_while_testing_is_one_line_and_the_relaunch_finishes(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    mount = f"mount -t tmpfs -o size=8m tmpfs {run}"
    command = [sys.executable, "-c", FULL_AT_TEST, str(run), *BASE, "trainer.max_epochs=1"]
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'{mount} && exec "$@"', "sh", *command],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("LINE:"))
    assert f"cannot write {run}/metrics.json: No space left on device" in line, line
    assert "launch the same command again" in line
    assert any(x.startswith("AGAIN: ") for x in result.stdout.splitlines()), result.stdout[-2000:]


def _in_a_small_full_tmpfs(folder: Path, command: list[str]) -> subprocess.CompletedProcess:
    """``command`` in a user and mount namespace (no root needed) where ``folder`` is a
    64 KiB tmpfs filled up to the last byte."""
    fill = f"mount -t tmpfs -o size=64k tmpfs {folder} && (cat /dev/zero > {folder}/fill || true)"
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'{fill} 2>/dev/null; exec "$@"', "sh", *command],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.fault
def test_a_full_disk_before_the_launch_is_one_line(tmp_path: Path):
    root = tmp_path / "full"
    root.mkdir()
    command = [sys.executable, "-m", "kdlight.train", *BASE, f"paths.root={root}/outputs"]
    result = _in_a_small_full_tmpfs(root, command)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: paths.root="), lines
    assert "is full" in lines[0]


def test_a_metrics_json_that_is_a_fifo_is_not_read_and_not_finished(tmp_path: Path):
    """A FIFO would block the reader until something writes into it."""
    from kdlight.runs.identity import identify
    from kdlight.train import finished

    cfg = compose_config(BASE, tmp_path / "run")
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "metrics.json")
    assert not finished([tmp_path / "run" / "metrics.json"], identify(cfg))


def test_kdlight_train_out_of_time_exits_with_status_3_and_one_line(tmp_path: Path):
    from tests.conftest import run_cli

    limited = [*BASE, "trainer.max_epochs=50", "trainer.max_time=00:00:00:00.05"]
    result = run_cli(limited, tmp_path)
    assert result.returncode == 3, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: not finished: trainer.max_time")
    (run,) = (tmp_path / "outputs").rglob("last.ckpt")
    assert "not finished" in (run.parent.parent / "error.txt").read_text()
