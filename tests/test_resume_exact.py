"""A run killed, terminated or interrupted and launched again ends exactly as the same run
never stopped, for real (real signals, through the CLI and in process): the random state is
kept in every checkpoint and restored on a resume (:class:`kdlight.trainer.callbacks.ResumeRandomState`,
and the data module's own generators), and a checkpoint saved in the middle of an epoch
resumes at the batch it reached, with the rest of that epoch's order
(:class:`kdlight.data.resumable.ResumableLoader`)."""

import json
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kdlight.cli.startup import STOP_SIGNALS
from kdlight.config.settings import choices
from kdlight.data.arrays import collate_batch
from kdlight.data.resumable import RecordedShuffle, ResumableLoader
from kdlight.lit import ClassifierModule
from kdlight.models import create_model
from kdlight.runs.guard import RELAUNCH, SaveLastOnSigterm, Terminated, stop_on_sigterm
from kdlight.trainer.callbacks import ResumeRandomState, SaveLastCheckpoint
from tests.conftest import TINY, cpu_trainer, synthetic_datamodule
from tests.test_signals_locks import (
    checkpoint_position,
    error_lines,
    launch,
    run_dirs,
    stderr_of,
)

#: 3 epochs of 10 steps on the CPU (500 training images in batches of 50), about 15 s a run.
RECIPE = [*TINY, "model=small_cnn", "model.width=0.25", "trainer.max_epochs=3"]
EPOCHS, STEPS = 3, 10


def wait_for_checkpoint(run, cwd: Path, reached: Callable[[int, int], bool]) -> Path:
    """Wait until ``run``'s ``last.ckpt`` was saved at an (epoch, step) that ``reached``
    accepts, and pause the run there (SIGSTOP): no later save while the test acts on it."""
    deadline, seen = time.monotonic() + 5 * 60, {}
    while time.monotonic() < deadline:
        for last in (cwd / "outputs").rglob("checkpoints/last.ckpt"):
            version = last.stat().st_mtime_ns
            if seen.get(last) != version and reached(*checkpoint_position(last)):
                run.send_signal(signal.SIGSTOP)
                return last
            seen[last] = version
        if run.poll() is not None:
            pytest.fail(f"the run ended ({run.returncode}) first: {stderr_of(cwd)[-3000:]}")
        time.sleep(0.05)
    run.kill()
    pytest.fail(f"no such last.ckpt in 5 minutes: {stderr_of(cwd)[-3000:]}")


def wait_for_epoch_end(run, cwd: Path, epoch: int) -> Path:
    """Wait until ``run``'s ``last.ckpt`` was saved at the end of epoch ``epoch`` or later
    (and pause the run)."""
    return wait_for_checkpoint(run, cwd, lambda saved, step: saved >= epoch)


def stop_mid_epoch(run, cwd: Path, signum: int, after_step: int) -> tuple[Path, int, int]:
    """Pause ``run`` at its first ``last.ckpt`` of step ``after_step`` or later, send it
    ``signum`` and let it go on: it stops at the end of the step it was in, in the middle of
    an epoch (checked), with status 128 + ``signum``, one line naming that step, the line in
    ``error.txt`` and ``last.ckpt`` saved there. Returns ``last.ckpt``, the epoch and the
    step."""
    last = wait_for_checkpoint(run, cwd, lambda epoch, step: step >= after_step)
    run.send_signal(signum)
    run.send_signal(signal.SIGCONT)
    assert run.wait(timeout=5 * 60) == 128 + signum, stderr_of(cwd)[-3000:]
    errors = error_lines(stderr_of(cwd))
    assert len(errors) == 1 and "Traceback" not in stderr_of(cwd), stderr_of(cwd)[-3000:]
    stopped = re.fullmatch(
        rf"error: {re.escape(STOP_SIGNALS[signum])} at step (\d+) \(epoch (\d+)\); "
        rf"last\.ckpt is current: {re.escape(RELAUNCH)}",
        errors[0],
    )
    assert stopped, errors
    step, epoch = int(stopped[1]), int(stopped[2])
    assert step % STEPS != 0, f"stopped at step {step}, an epoch's end: not the case tested"
    assert checkpoint_position(last) == (epoch, step)
    (run_dir,) = run_dirs(cwd)
    assert (run_dir / "error.txt").read_text() == errors[0].removeprefix("error: ") + "\n"
    return last, epoch, step


def output_of(cwd: Path) -> str:
    return (cwd / "launch.out").read_text() + stderr_of(cwd)


def draws() -> tuple:
    cuda = torch.rand(3, device="cuda").tolist() if torch.cuda.is_available() else None
    return (
        torch.rand(3).tolist(),
        cuda,
        np.random.rand(3).tolist(),
        np.random.randn(),
        random.random(),
    )


def test_the_random_state_is_restored_from_a_weights_only_checkpoint(tmp_path: Path):
    """torch's (and CUDA's, where there is a GPU), numpy's (with its cached Gaussian) and
    Python's generators continue where they were saved, from a file that
    ``torch.load(weights_only=True)`` reads."""
    if torch.cuda.is_available():
        torch.cuda.init()  # CUDA's state is kept once CUDA is in use
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # numpy now holds a cached Gaussian: it is part of the state
    torch.save({"random": ResumeRandomState().state_dict()}, tmp_path / "state.ckpt")
    expected = draws()
    assert draws() != expected

    state = torch.load(tmp_path / "state.ckpt", weights_only=True)["random"]
    ResumeRandomState().load_state_dict(state)
    assert draws() == expected


# ------------------------------------------------------------------------- in process
def test_the_training_loader_resumes_at_the_batch_it_reached():
    """The loader alone: its state after 2 of an epoch's 4 batches, loaded into a new loader,
    gives the same last 2 batches, and making it takes nothing from torch's global generator
    (where the crops and flips come from); at an epoch's end it resumes nothing."""
    data = synthetic_datamodule(300, 100, 100, 50)
    data.setup("fit")
    reached = [(0, 2, 4)]

    def loader() -> ResumableLoader:
        sampler = RecordedShuffle(data.train_set)
        return ResumableLoader(data.train_set, batch_size=50, sampler=sampler,
                               collate_fn=collate_batch, progress=lambda: reached[0])  # fmt: skip

    torch.manual_seed(0)
    first = loader()
    epoch = iter(first)
    trained = [next(epoch)[1], next(epoch)[1]]
    state = first.state_dict()
    rest = [labels for _, labels in epoch]
    assert len(trained + rest) == 4 and state["batches"] == 2

    resumed = loader()
    resumed.load_state_dict(state)
    random_state = torch.get_rng_state()
    again = [labels for _, labels in resumed]
    assert len(again) == 2 and all(map(torch.equal, again, rest))
    assert torch.equal(torch.get_rng_state(), random_state)

    reached[0] = (0, 4, 4)  # the epoch's end: the next epoch draws a new order
    assert first.state_dict() == {"epoch": 0, "batches": 0, "shuffle_seed": None}


#: 200 training images in batches of 50: 4 steps an epoch.
STEPS_PER_EPOCH = 4


class SignalAt(Callback):
    """Send this process a real ``signum`` as training step ``step`` begins."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class Trace(Callback):
    """What a run did, step by step: the learning rate each step trained with, and each
    epoch's validation accuracy (not the sanity check's)."""

    def __init__(self) -> None:
        self.learning_rates: list[tuple[int, float]] = []
        self.validations: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.learning_rates.append((trainer.global_step, lr))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            accuracy = float(trainer.callback_metrics["val/acc"])
            self.validations.append((trainer.current_epoch, accuracy))


def fit(root: Path, *callbacks: Callback, resume: bool = False) -> dict:
    """A classifier trained for 2 epochs in ``root`` as ``kdlight-train`` trains it (seeded,
    ``last.ckpt`` kept, the random state in it), resumed from ``root/last.ckpt`` when asked
    (read weights only); its final weights."""
    L.seed_everything(0)
    last = SaveLastCheckpoint(root, every_n_train_steps=0)
    trainer = cpu_trainer(
        root, 2, enable_checkpointing=True,
        callbacks=[last, ResumeRandomState(), SaveLastOnSigterm(), *callbacks],
    )  # fmt: skip
    scheduler = partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1], gamma=0.1)
    module = ClassifierModule(create_model("small_cnn", width=0.25), scheduler=scheduler)
    datamodule = synthetic_datamodule(300, 100, 100, 50)
    with stop_on_sigterm():
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=last.path if resume else None,
            weights_only=True,
        )  # fmt: skip
    return module.state_dict()


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory) -> tuple[dict, Trace]:
    """The run the stopped ones must equal: its final weights and what it did."""
    trace = Trace()
    return fit(tmp_path_factory.mktemp("through"), trace), trace


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Ctrl-C's default handling in this process, as a terminal's command has it, wherever
    the tests run (a shell's background job ignores SIGINT, and kdlight then leaves it so)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.fault
@pytest.mark.parametrize(
    ("signum", "during", "stops_at", "say"),
    [
        (signal.SIGTERM, 0, 1, "terminated by SIGTERM at step 1 (epoch 0)"),
        (signal.SIGINT, 5, 6, "interrupted by SIGINT (Ctrl-C) at step 6 (epoch 1)"),
        # epoch 0's last batch: it stops after that epoch's validation, at its end
        (signal.SIGTERM, 3, 4, "terminated by SIGTERM at step 4 (epoch 0)"),
    ],
    ids=["sigterm-first-step", "sigint-mid-epoch", "sigterm-last-batch"],
)
def test_a_signal_at_any_step_resumes_exactly(
    tmp_path: Path, never_stopped, default_sigint, signum: int, during: int, stops_at: int, say: str
):
    """A real SIGTERM or SIGINT during a step, in the middle of an epoch or at its last
    batch: training stops with ``last.ckpt`` saved there (status 143 or 130), and resumed
    from it ends with every tensor of the weights equal to the last bit to the run never
    stopped's, each step trained with the same learning rate (the scheduler's), and each
    epoch validated once, with the same accuracy."""
    expected_weights, expected = never_stopped
    stopped, resumed = Trace(), Trace()
    with pytest.raises(Terminated) as stop:
        fit(tmp_path, SignalAt(signum, during), stopped)
    assert stop.value.code == 128 + signum
    assert str(stop.value) == f"{say}; last.ckpt is current: {RELAUNCH}"
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == stops_at

    weights = fit(tmp_path, resumed, resume=True)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[name], expected_weights[name]) for name in weights)
    assert stopped.learning_rates + resumed.learning_rates == expected.learning_rates
    assert stopped.validations + resumed.validations == expected.validations
    assert len(expected.learning_rates) == 2 * STEPS_PER_EPOCH


# ---------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> str:
    """A resnet8 teacher's weights (untrained: the runs' equality does not depend on what
    it knows), named by path so that two directories share it."""
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    torch.manual_seed(0)
    torch.save(create_model("resnet8").state_dict(), path)
    return str(path)


@pytest.mark.slow
@pytest.mark.fault
def test_stopped_runs_resumed_end_exactly_as_one_never_stopped(
    tmp_path: Path, teacher_checkpoint: str
):
    """The same command in three directories: run once through; SIGKILLed after its second
    epoch's ``last.ckpt``, then launched again to finish; and sent SIGTERM in the middle of
    its first epoch (how SLURM pre-empts), launched again, sent Ctrl-C (SIGINT) in the middle
    of its second, and launched again to finish. Test accuracy, each class's and the best
    validation accuracy are equal to the last bit, and so are the final weights (and,
    distilling, the methods' connectors, CRD's memory banks and its negatives' stream: the
    run is a method grid of KD, FitNet, CRD and MLKD, each cell a method's run; MLKD's
    strong view draws random numbers of its own).

    SIGKILL saves nothing, so that run resumes from the ``last.ckpt`` of the last epoch's
    end (``every_n_train_steps`` is 1000, an epoch here 10 steps). The signalled ones save
    ``last.ckpt`` at the step they reached and resume there, with the rest of that epoch's
    order; they save every 3 steps too (a setting that is not part of the run's identity),
    which is where the test pauses them to send the signal.
    """
    recipe = [*RECIPE, "experiment=method_grid", "distill.teacher_model=resnet8"]
    recipe += [f"distill.teacher_checkpoint={teacher_checkpoint}"]
    kept = ("kd", "fitnet", "crd", "mlkd")  # connectors, memory banks, a second random view
    recipe += [f"~methods.{m}" for m in choices("distiller") if m not in kept]
    signalled_recipe = [*recipe, "callbacks.last_checkpoint.every_n_train_steps=3"]
    whole, killed, signalled = tmp_path / "whole", tmp_path / "killed", tmp_path / "signalled"
    for folder in (whole, killed, signalled):
        folder.mkdir()
    # alongside: the results do not depend on the timing
    through, run = launch(recipe, whole), launch(recipe, killed)
    terminated = launch(signalled_recipe, signalled)
    with ThreadPoolExecutor(1) as watch:  # pauses the one to kill the moment epoch 1 is saved
        killed_at = watch.submit(wait_for_epoch_end, run, killed, 1)
        last, epoch, step = stop_mid_epoch(terminated, signalled, signal.SIGTERM, after_step=3)
        assert epoch == 0
        interrupted = launch(signalled_recipe, signalled)
        killed_last = killed_at.result()
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    killed_epoch = checkpoint_position(killed_last)[0]
    # stopped at the first last.ckpt of epoch 1 or later: a later one leaves nothing to resume
    assert killed_epoch == 1, f"killed after epoch {killed_epoch} of {EPOCHS}: too late"
    again = launch(recipe, killed)

    resumed = stop_mid_epoch(interrupted, signalled, signal.SIGINT, after_step=STEPS + 2)
    assert f"resuming from {last}: saved at epoch {epoch}, step {step}" in output_of(signalled)
    last, epoch, step = resumed
    assert epoch == 1
    finishing = launch(signalled_recipe, signalled)

    assert again.wait(timeout=5 * 60) == 0, stderr_of(killed)[-3000:]
    assert f"resuming from {killed_last}: saved at epoch {killed_epoch}" in output_of(killed)
    assert finishing.wait(timeout=5 * 60) == 0, stderr_of(signalled)[-3000:]
    assert f"resuming from {last}: saved at epoch {epoch}, step {step}" in output_of(signalled)
    assert through.wait(timeout=5 * 60) == 0, stderr_of(whole)[-3000:]

    (whole_dir,), *stopped_dirs = (run_dirs(folder) for folder in (whole, killed, signalled))
    cells = sorted(p.relative_to(whole_dir) for p in whole_dir.rglob("metrics.json"))
    assert [cell.parent.name for cell in cells] == sorted(kept)
    expected_weights = torch.load(whole_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for (stopped_dir,) in stopped_dirs:
        assert not (stopped_dir / "error.txt").exists()  # finished: no longer a failed run
        for cell in cells:
            expected = json.loads((whole_dir / cell).read_text())
            resumed = json.loads((stopped_dir / cell).read_text())
            assert resumed["epochs"] == expected["epochs"] == EPOCHS
            assert resumed["accuracy"] == expected["accuracy"]
            assert resumed["per_class_accuracy"] == expected["per_class_accuracy"]
            assert resumed["val_acc_best"] == expected["val_acc_best"]
        weights = torch.load(stopped_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert weights["state_dict"].keys() == expected_weights["state_dict"].keys()
        assert all(
            same(weights["state_dict"][name], expected_weights["state_dict"][name])
            for name in weights["state_dict"]
        )


def same(a, b) -> bool:
    """Equal tensors, or equal dicts of them (a method's extra state: CRD's negatives' stream)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
