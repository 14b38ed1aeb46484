"""A run killed and launched again ends exactly as the same run never stopped, for real
through the CLI: the random state is kept in every checkpoint and restored on a resume
(:class:`kdlight.callbacks.ResumeRandomState`, and the data module's own generators)."""

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlight.callbacks import ResumeRandomState
from kdlight.models import create_model
from tests.conftest import TINY, run_cli
from tests.test_signals_locks import launch, run_dirs, stderr_of

#: 3 epochs of 10 steps on the CPU (500 training images in batches of 50), about 15 s a run.
RECIPE = [*TINY, "model=small_cnn", "model.width=0.25", "trainer.max_epochs=3"]
EPOCHS = 3


def wait_for_epoch_end(run, cwd: Path, epoch: int) -> Path:
    """Wait until ``run``'s ``last.ckpt`` was saved at the end of epoch ``epoch`` or later."""
    deadline = time.monotonic() + 5 * 60
    while time.monotonic() < deadline:
        for last in (cwd / "outputs").rglob("checkpoints/last.ckpt"):
            if checkpoint_epoch(last) >= epoch:
                run.send_signal(signal.SIGSTOP)  # no later epoch's save while it is killed
                return last
        if run.poll() is not None:
            pytest.fail(f"the run ended ({run.returncode}) before epoch {epoch}: {stderr_of(cwd)}")
        time.sleep(0.05)
    run.kill()
    pytest.fail(f"the run did not reach epoch {epoch} in 5 minutes: {stderr_of(cwd)[-3000:]}")


def checkpoint_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


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


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> str:
    """A resnet8 teacher's weights (untrained: the runs' equality does not depend on what
    it knows), named by path so that two directories share it."""
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    torch.manual_seed(0)
    torch.save(create_model("resnet8").state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_a_killed_run_resumed_ends_exactly_as_one_never_stopped(
    tmp_path: Path, teacher_checkpoint: str
):
    """The same command in two directories: run once through, and SIGKILLed after its
    second epoch's ``last.ckpt``, then launched again to finish. Test accuracy, each class's
    and the best validation accuracy are equal to the last bit, and so are the final weights
    (and, distilling, the methods' connectors, CRD's memory banks and its negatives' stream:
    the run is a method grid of KD, FitNet and CRD, each cell a method's run).

    SIGKILL saves nothing, so the run resumes from the ``last.ckpt`` of the last epoch's end
    (``every_n_train_steps`` is 1000, an epoch here 10 steps). From a checkpoint saved in the
    middle of an epoch (a SIGTERM) Lightning would start that epoch's loader afresh, so the
    rest of that epoch would see other images: exact equality holds from epoch ends only.
    """
    recipe = [*RECIPE, "experiment=method_grid", "distill.teacher_model=resnet8"]
    recipe += [f"distill.teacher_checkpoint={teacher_checkpoint}"]
    recipe += [f"~methods.{m}" for m in ("dkd", "at", "sp", "vid", "pkt", "rkd")]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for folder in (whole, killed):
        folder.mkdir()
    through = launch(recipe, whole)  # alongside: the results do not depend on the timing
    run = launch(recipe, killed)
    last = wait_for_epoch_end(run, killed, 1)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    epoch = checkpoint_epoch(last)
    # stopped at the first last.ckpt of epoch 1 or later: a later one leaves nothing to resume
    assert epoch == 1, f"killed after epoch {epoch} of {EPOCHS}: too late to resume an epoch"

    again = run_cli(recipe, killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last}: saved at epoch {epoch}" in again.stdout + again.stderr
    assert through.wait(timeout=5 * 60) == 0, stderr_of(whole)[-3000:]

    (whole_dir,), (killed_dir,) = run_dirs(whole), run_dirs(killed)
    cells = sorted(p.relative_to(whole_dir) for p in whole_dir.rglob("metrics.json"))
    assert len(cells) == 3
    for cell in cells:
        expected = json.loads((whole_dir / cell).read_text())
        resumed = json.loads((killed_dir / cell).read_text())
        assert resumed["epochs"] == expected["epochs"] == EPOCHS
        assert resumed["accuracy"] == expected["accuracy"]
        assert resumed["per_class_accuracy"] == expected["per_class_accuracy"]
        assert resumed["val_acc_best"] == expected["val_acc_best"]

    weights = [
        torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for folder in (whole_dir, killed_dir)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(same(weights[0][name], weights[1][name]) for name in weights[0])


def same(a, b) -> bool:
    """Equal tensors, or equal dicts of them (a method's extra state: CRD's negatives' stream)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
