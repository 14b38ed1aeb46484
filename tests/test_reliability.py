"""Scale and reliability: DDP on CPU (gloo), resuming after SIGKILL, skipping finished runs,
clear errors before work, non-finite losses, same seed same metrics, a failing run in a
multirun, and the SLURM launcher's configuration and dry run."""

import json
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from torch import nn

from kdlight import config_dir
from kdlight.cli.report import collect_runs
from kdlight.data import CIFAR10DataModule
from kdlight.lit import DistillationGridModule, DistillationModule
from kdlight.models import create_model
from kdlight.train import train
from kdlight.trainer.callbacks import NonFiniteLossError, SaveLastCheckpoint, StopOnNonFiniteLoss
from tests.conftest import REPO, compose_config, finish, run_cli, start_cli

#: A tiny CPU run (the trainer choice left out): 500 training images in batches of 50 (10
#: steps an epoch), 100 for validation, an odd-sized test set of 301, one epoch.
SMALL = [
    "data=synthetic", "data.synthetic_train_size=600", "data.synthetic_test_size=301",
    "data.val_size=100", "data.batch_size=50", "data.eval_batch_size=100",
    "model=small_cnn", "model.width=0.25", "scheduler=cosine", "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
]  # fmt: skip
#: tests/ importable in the subprocess, for the callbacks below.
TESTS_ON_PATH = {"PYTHONPATH": str(REPO)}


class SigkillOnce(Callback):
    """Kill this process with SIGKILL (no cleanup at all, like a crash or a lost node) when
    the run in ``run_dir`` reaches training step ``step``; the marker file makes it a one-off,
    so that the relaunch, with the same command, runs on."""

    def __init__(self, step: int, marker: str, run_dir: str) -> None:
        self.step, self.marker, self.run_dir = step, Path(marker), Path(run_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        here = Path(trainer.default_root_dir).resolve() == self.run_dir.resolve()
        if here and trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class NaNImagesAt(Callback):
    """Turn the images of the batch after training step ``step`` into NaN; only in process
    ``rank`` and in the run in ``run_dir`` when they are given."""

    def __init__(self, step: int, rank: int | None = None, run_dir: str | None = None) -> None:
        self.step, self.rank, self.run_dir = step, rank, run_dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        here = self.run_dir is None or Path(trainer.default_root_dir) == Path(self.run_dir)
        if here and self.rank in (None, trainer.global_rank) and trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def checkpoint_position(path: Path) -> tuple[int, int]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["epoch"], state["global_step"]


# ------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_on_two_processes_in_a_multirun(tmp_path: Path):
    """A multirun of two DDP jobs (2 processes each, gloo, data held "on the device"). The
    first one's second process meets a NaN: both processes stop, and the multirun goes on.
    The second trains each process on its own half (as many steps as one process with the
    whole global batch), tests all 301 images once, writes one set of outputs, and lands
    within 3 points of accuracy of the same run in one process (measured: 0.7 and 1.0 points
    apart for seeds 0 and 1)."""
    recipe = [*SMALL, "trainer.max_epochs=4", "data.augment=false"]
    sweep = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "seed=7,0"]
    ddp += ["data.on_device=true"]
    nan = ["+callbacks.nan._target_=tests.test_reliability.NaNImagesAt", "+callbacks.nan.step=4"]
    nan += ["+callbacks.nan.rank=1", f"+callbacks.nan.run_dir={sweep / '0'}"]
    numbered = [f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]  # 0/ and 1/
    result = run_cli(["-m", *recipe, *ddp, *nan, *numbered], tmp_path, **TESTS_ON_PATH)
    assert result.returncode == 1, result.stderr[-3000:]  # one run failed, after all ran
    assert (
        (sweep / "0" / "error.txt")
        .read_text()
        .startswith("non-finite loss in another DDP process at step 5 (epoch 0, batch 4)")
    )
    assert result.stdout.count("Accuracy of the network on the 301 test images") == 1

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # no stray output folders
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    files = {p.relative_to(sweep / "1").as_posix() for p in (sweep / "1").rglob("*")}
    assert files == {
        ".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", ".lock",
        "checkpoints", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml",
        "csv", "csv/hparams.yaml", "csv/metrics.csv", "metrics.json", "train.log",
    }  # fmt: skip
    ddp_metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert ddp_metrics["test_images"] == 301

    single = train(compose_config(["trainer=cpu", *recipe, "seed=0"], tmp_path / "single"))
    assert single["test_images"] == 301
    assert abs(ddp_metrics["accuracy"] - single["accuracy"]) <= 3.0, (ddp_metrics, single)
    steps = checkpoint_position(sweep / "1" / "checkpoints" / "last.ckpt")
    assert steps == checkpoint_position(tmp_path / "single" / "checkpoints" / "last.ckpt")


def test_ddp_global_batch_must_split_evenly(tmp_path: Path):
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *SMALL]
    result = run_cli([*args, "data.batch_size=51"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result) == [
        "error: data.batch_size=51 is the global batch: it must split evenly over the 2 "
        "processes (trainer.devices x trainer.num_nodes)"
    ]


# --------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_killed_multirun_resumes_and_skips_finished_runs(tmp_path: Path):
    """A 2 x 2 multirun is SIGKILLed in the middle of its second run's second epoch. The same
    command again skips the finished run (its metrics.json untouched), resumes the killed run
    from its last step checkpoint to the same 2 epochs and 20 steps, and runs the other two."""
    sweep = tmp_path / "grid"
    killed = sweep / "seed0_lr0.1"
    args = [
        "-m", "trainer=cpu", *SMALL, "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=3",
        "seed=0,1", "optimizer.lr=0.05,0.1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=seed${seed}_lr${optimizer.lr}",
        "+callbacks.kill._target_=tests.test_reliability.SigkillOnce", "+callbacks.kill.step=13",
        f"+callbacks.kill.marker={tmp_path / 'killed'}", f"+callbacks.kill.run_dir={killed}",
    ]  # fmt: skip
    first = run_cli(args, tmp_path, **TESTS_ON_PATH)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    finished = sweep / "seed0_lr0.05" / "metrics.json"
    assert finished.exists() and not (killed / "metrics.json").exists()
    assert checkpoint_position(killed / "checkpoints" / "last.ckpt") == (1, 12)  # mid-epoch
    assert not (sweep / "seed1_lr0.05").exists()
    before = finished.read_bytes(), finished.stat().st_mtime_ns

    again = run_cli(args, tmp_path, **TESTS_ON_PATH)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert f"{finished} exists: this run has finished already" in log
    assert f"resuming from {killed}/checkpoints/last.ckpt: saved at epoch 1, step 12" in log
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == before
    for run in ("seed0_lr0.05", "seed0_lr0.1", "seed1_lr0.05", "seed1_lr0.1"):
        metrics = json.loads((sweep / run / "metrics.json").read_text())
        assert metrics["epochs"] == 2 and metrics["test_images"] == 301
        assert checkpoint_position(sweep / run / "checkpoints" / "last.ckpt") == (1, 20), run
    # the killed attempt's training log is kept beside the resumed one
    assert (killed / "csv.attempt1" / "metrics.csv").exists()
    assert (killed / "csv" / "metrics.csv").exists()
    assert not list(sweep.rglob("*-v1.ckpt"))


# ------------------------------------------------------------------------ clear errors
def fake_teacher(path: Path, name: str, num_classes: int) -> Path:
    """A checkpoint that names a model as ClassifierModule checkpoints do (no weights needed:
    the check fails before they are read)."""
    torch.save({"kdlight": {"model_spec": {"name": name, "num_classes": num_classes}}}, path)
    return path


#: What a teacher checkpoint is (``bad_teacher``) and the error line's text.
BAD_TEACHERS = {
    "corrupt": "cannot read teacher checkpoint",
    "other_model": "holds a resnet20, not a resnet8",
    "other_classes": "predicts 100 classes, the student 10",
}
#: What is wrong with the data or the run's last.ckpt (``bad_data``) and the error line's text.
BAD_DATA = {
    "corrupt_archive": "cannot read CIFAR-10 archive",
    "negative_batch": "data.batch_size=-5 is not allowed: an integer >= 1",
    "unreadable_last_ckpt": "cannot read checkpoint",
}


def bad_teacher(setup: str, folder: Path) -> list[str]:
    """A distillation command whose teacher checkpoint, ``folder/teacher.ckpt``, is ``setup``."""
    path = folder / "teacher.ckpt"
    if setup == "corrupt":
        path.write_bytes(b"\x00 not a checkpoint")
    else:
        fake_teacher(
            path, *{"other_model": ("resnet20", 10), "other_classes": ("resnet8", 100)}[setup]
        )
    args = ["experiment=distill", "trainer=cpu", *SMALL, "distill.teacher_model=resnet8"]
    return [*args, f"distill.teacher_checkpoint={path}"]


def bad_data(setup: str, folder: Path) -> list[str]:
    """A command, its run in ``folder/run``, whose data or ``last.ckpt`` is ``setup``."""
    run_dir = folder / "run"
    args = ["trainer=cpu", *SMALL, f"hydra.run.dir={run_dir}"]
    if setup == "corrupt_archive":
        archive = folder / "cifar10.tar.gz"
        archive.write_bytes(b"\x1f\x8b this is not gzip")
        args += [
            "data.source=archive",
            f"data.archive_path={archive}",
            f"data.data_dir={folder / 'c'}",
        ]
    elif setup == "negative_batch":
        args.append("data.batch_size=-5")
    else:
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"truncated")
    return args


@pytest.fixture(scope="module")
def bad_launches(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Each command of :func:`bad_teacher` and :func:`bad_data`, by setup: the folder it ran
    in and what it did. They are started together, each in its own folder: each spends
    seconds of one core importing torch, and the cores run them side by side."""
    folders = {setup: tmp_path_factory.mktemp(setup) for setup in [*BAD_TEACHERS, *BAD_DATA]}
    commands = {setup: bad_teacher(setup, folders[setup]) for setup in BAD_TEACHERS}
    commands |= {setup: bad_data(setup, folders[setup]) for setup in BAD_DATA}
    runs = {setup: start_cli(args, folders[setup]) for setup, args in commands.items()}
    return {setup: (folders[setup], finish(run)) for setup, run in runs.items()}


@pytest.mark.parametrize(("setup", "message"), BAD_TEACHERS.items())
def test_bad_teacher_checkpoint_is_one_clear_line(bad_launches, setup: str, message: str):
    folder, result = bad_launches[setup]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = error_lines(result)
    path = folder / "teacher.ckpt"
    assert len(errors) == 1 and message in errors[0] and str(path) in errors[0], result.stderr[
        -2000:
    ]


@pytest.mark.parametrize(("setup", "message"), BAD_DATA.items())
def test_bad_data_or_checkpoint_is_one_clear_line(bad_launches, setup: str, message: str):
    _, result = bad_launches[setup]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_trainer_without_a_gpu_is_one_clear_line(tmp_path: Path):
    result = run_cli(["trainer=ddp", *SMALL], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith(
        "error: trainer settings (accelerator=gpu, devices=auto, strategy=ddp):"
    ), result.stderr


def test_milestones_after_the_last_epoch_are_a_warning(tmp_path: Path):
    quick = [
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    ]
    args = ["trainer=cpu", *SMALL, *quick, "scheduler=multistep", "scheduler.milestones=[1,2,5]", "trainer.max_epochs=2"]  # fmt: skip
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "scheduler.milestones [2, 5] are not before trainer.max_epochs=2: the learning rate "
        "never drops there" in result.stdout + result.stderr
    )


# ------------------------------------------------------------------------- non-finite loss
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = [
        "trainer=cpu", *SMALL, "callbacks.last_checkpoint.every_n_train_steps=2", f"hydra.run.dir={run_dir}",
        "+callbacks.nan._target_=tests.test_reliability.NaNImagesAt", "+callbacks.nan.step=4",
    ]  # fmt: skip
    result = run_cli(args, tmp_path, **TESTS_ON_PATH)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    assert error_lines(result) == [
        "error: non-finite loss at step 5 (epoch 0, batch 4): train/loss=nan; training "
        f"stopped, the last good checkpoint is {last} (lower optimizer.lr, or look for bad inputs)"
    ]
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    weights = {k: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    assert weights and all(
        torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()
    )
    assert not (run_dir / "metrics.json").exists()


class NaNTeacher(nn.Module):
    """A teacher whose logits turn NaN from its ``nan_from``-th batch on."""

    def __init__(self, nan_from: int) -> None:
        super().__init__()
        self.calls, self.nan_from = 0, nan_from
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # batches only: the module's one-image probe of the class count at setup is no step
        self.calls += images.shape[0] > 1
        logits = images.mean(dim=(2, 3)).repeat(1, 4)[:, :10] * self.scale
        return logits * float("nan") if self.calls >= self.nan_from else logits


def test_nan_message_names_the_distillation_loss_parts(tmp_path: Path):
    module = DistillationModule(
        create_model("small_cnn", width=0.25), teacher=NaNTeacher(4), alpha=0.5
    )
    checkpoints = SaveLastCheckpoint(tmp_path, every_n_train_steps=1)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[StopOnNonFiniteLoss(), checkpoints],
    )  # fmt: skip
    data = CIFAR10DataModule(
        source="synthetic", synthetic_train_size=400, val_size=100, batch_size=50
    )
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit(module, datamodule=data)
    message = str(caught.value)
    assert message.startswith(
        "non-finite loss at step 4 (epoch 0, batch 3): train/loss=nan, train/kd=nan, train/ce="
    )
    assert "train/ce=nan" not in message and "\n" not in message
    assert checkpoint_position(tmp_path / "last.ckpt") == (0, 3)


def test_nan_message_names_the_grid_cell(tmp_path: Path):
    """A temperature so small that 1/T overflows makes one cell's loss NaN; the other
    cell's stays finite, and the message tells them apart."""
    grid = DistillationGridModule(
        create_model("small_cnn", width=0.25), teacher=create_model("resnet8"),
        temperature=[1e-45, 4.0], alpha=[0.5],
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[StopOnNonFiniteLoss()],
    )  # fmt: skip
    data = CIFAR10DataModule(
        source="synthetic", synthetic_train_size=400, val_size=100, batch_size=50
    )
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit(grid, datamodule=data)
    message = str(caught.value)
    assert message.startswith(
        "non-finite loss at step 1 (epoch 0, batch 0): train/loss=nan, train/T1e-45_alpha0.5=nan, "
        "train/T4_alpha0.5="
    )
    assert "train/T4_alpha0.5=nan" not in message


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path: Path):
    def metrics(seed: int, name: str) -> str:
        train(compose_config(["trainer=cpu", *SMALL, f"seed={seed}"], tmp_path / name))
        return (tmp_path / name / "metrics.json").read_text()

    first = metrics(0, "a")
    assert metrics(0, "b") == first
    assert metrics(1, "c") != first


# ------------------------------------------------------------------------ failing runs
def test_a_failing_run_does_not_stop_the_multirun(tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "trainer=cpu",
        *SMALL,
        "trainer.limit_train_batches=2",
        "model.name=resnet1000,small_cnn",
    ]
    result = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (failed,) = (p.parent for p in sweep.rglob("error.txt"))
    (finished,) = (p.parent for p in sweep.rglob("metrics.json"))  # the run after the failed one
    assert failed.parent.name == "resnet1000" and finished.parent.name == "small_cnn"
    unknown = "model.name=resnet1000 is not allowed: one of "
    assert (failed / "error.txt").read_text().startswith(unknown)
    errors = error_lines(result)
    assert errors[0].startswith(f"error: {unknown}")
    assert errors[-1].startswith(f"error: {failed} failed: {unknown}")
    runs = {Path(run["path"]): run for run in collect_runs([sweep])}
    assert runs[failed]["status"] == "failed" and runs[failed]["error"].startswith(unknown)
    assert runs[finished]["status"] == "finished"


# ---------------------------------------------------------------------------------- SLURM
def test_slurm_launcher_composes_from_the_trainer():
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.sync_batchnorm is False


def test_slurm_dry_run_prints_the_job_it_would_submit(tmp_path: Path):
    args = [
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "seed=0,1",
    ]
    result = run_cli(args, tmp_path, entry="kdlight.cli.slurm")
    assert result.returncode == 0, result.stderr[-2000:]
    script = result.stdout
    assert script.startswith("#!/bin/bash")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--array=0-1%2",
    ):
        assert f"#SBATCH {line}" in script
    assert "srun " in script and "submitit.core._submit" in script
    assert "# run 0: trainer=ddp trainer.devices=4 trainer.num_nodes=2 seed=0" in script
    assert "# dry run: 2 run(s), nothing submitted" in script
    assert not (tmp_path / "outputs").exists()
