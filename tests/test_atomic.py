"""Checkpoints are whole or absent, and never poisoned: a real full filesystem and a real
SIGKILL during a save leave the previous checkpoint whole and no temporary file behind, a
checkpoint with NaN weights is never written, and bad checkpoint settings are one line.

The full-disk tests mount a small tmpfs (``mount_tmpfs``: here where this process may
mount, else in a user and mount namespace), so the checkpoints live on another filesystem
than ``$TMPDIR``, as on a cluster's shared storage."""

import errno
import functools
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kdlight.errors import KDLightError
from kdlight.lit import ClassifierModule
from kdlight.models import create_model
from kdlight.train import build_trainer
from kdlight.trainer.callbacks import NonFiniteLossError, SaveLastCheckpoint, StopOnNonFiniteLoss
from kdlight.trainer.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    non_finite_tensors,
)
from tests.conftest import (  # noqa: F401  (mount_tmpfs: a fixture, for tests.test_io too)
    REPO,
    TINY,
    compose_config,
    mount_tmpfs,
    run_cli,
    synthetic_datamodule,
)


def temporaries(folder: Path) -> list[str]:
    """What kdlight.runs.files's writers leave when they are stopped half-way: ``.<name>.*.tmp``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.suffix == ".tmp")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def non_finite_entries(path: Path, module: L.LightningModule) -> list[str]:
    """The weights (parameters and buffers) and optimizer-state tensors of the checkpoint
    file that hold a NaN or an infinity."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    assert names <= set(state["state_dict"])  # every weight is there to be checked
    return non_finite_tensors(state, names)[0]


def small_module(lr: float = 0.05) -> ClassifierModule:
    return ClassifierModule(
        create_model("small_cnn", width=0.25),
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9),
    )


def quiet_trainer(root: Path, epochs: int, callbacks: list, **kwargs) -> L.Trainer:
    """A CPU Trainer writing its checkpoints with kdlight's writer, as kdlight-train's does."""
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()], callbacks=callbacks, **kwargs,
    )  # fmt: skip


# ------------------------------------------------------------------------ the configuration
@pytest.mark.parametrize(
    "trainer",
    [["trainer=default"], ["trainer=cpu"], ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]],
)  # fmt: skip
def test_every_trainer_config_writes_checkpoints_atomically(tmp_path: Path, trainer: list[str]):
    tiny = [override for override in TINY if not override.startswith("trainer=")]
    cfg = compose_config([*tiny, *trainer], tmp_path)
    built = build_trainer(cfg)  # as kdlight-train builds it
    assert type(built.strategy.checkpoint_io) is AtomicCheckpointIO


# --------------------------------------------------------------------------- a full disk
class FillTheDisk(Callback):
    """At the start of epoch ``epoch``, note the checkpoints in ``folder`` (name -> sha256)
    and fill the rest of its filesystem with a file of zeros. From then on each checkpoint
    is 512 KB larger, as one is when the model or its optimizer state grows, so that not
    even writing over the old file in place (as a move across filesystems does) fits."""

    def __init__(self, folder: Path, epoch: int) -> None:
        self.folder, self.epoch, self.before = Path(folder), epoch, {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch or not trainer.is_global_zero:
            return  # under DDP the first process fills it, the one that writes
        self.before = {p.name: digest(p) for p in self.folder.glob("*.ckpt")}
        with open(self.folder / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(bytes(1 << 16))
            except OSError as err:
                assert err.errno == errno.ENOSPC

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.before:
            checkpoint["grown"] = torch.zeros(1 << 17)


@pytest.mark.fault
def test_full_disk_keeps_the_previous_checkpoint(
    tmp_path: Path,
    mount_tmpfs,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    """The checkpoints' folder is a 2 MB filesystem of its own. Epoch 0 saves best.ckpt and
    last.ckpt; then the filesystem is filled up, and epoch 1's first save fails: the run
    stops with one line naming the file, every checkpoint is byte for byte what it was and
    loads, and no temporary is left, neither beside it nor in $TMPDIR."""
    folder = mount_tmpfs(tmp_path / "checkpoints", 2)
    system_temp = tmp_path / "systemp"  # on another filesystem than the checkpoints
    system_temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(system_temp))
    fill = FillTheDisk(folder, epoch=1)
    callbacks = [
        StopOnNonFiniteLoss(),
        ModelCheckpoint(folder, filename="best", monitor="val/acc", mode="max"),
        SaveLastCheckpoint(folder, every_n_train_steps=0),
        fill,
    ]
    with pytest.raises(CheckpointWriteError) as caught:
        quiet_trainer(tmp_path, 2, callbacks).fit(
            small_module(), datamodule=synthetic_datamodule(600, 300, 100, 50)
        )
    assert set(fill.before) == {"best.ckpt", "last.ckpt"}
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, KDLightError)
    written = message.removeprefix("cannot write ").split(":")[0]
    assert written in {str(folder / name) for name in fill.before}
    assert message == (
        f"cannot write {written}: No space left on device; the previous checkpoint is kept"
    )
    assert {p.name: digest(p) for p in folder.glob("*.ckpt")} == fill.before
    for name in fill.before:
        assert torch.load(folder / name, weights_only=False)["epoch"] == 0
    assert temporaries(folder) == [] and list(system_temp.iterdir()) == []


#: Two DDP processes on the CPU; the disk fills up at epoch 1, and its validation's best.ckpt
#: (monitor "step": every validation is a new best) cannot be written.
DDP_FULL_DISK = """
import sys
from pathlib import Path
from lightning.pytorch.callbacks import ModelCheckpoint
from kdlight.trainer.callbacks import SaveLastCheckpoint
from kdlight.trainer.checkpointing import CheckpointWriteError
from tests.conftest import synthetic_datamodule
from tests.test_atomic import FillTheDisk, quiet_trainer, small_module

folder = Path(sys.argv[1])
callbacks = [
    ModelCheckpoint(folder, filename="best", monitor="step", mode="max"),
    SaveLastCheckpoint(folder, every_n_train_steps=0),
    FillTheDisk(folder, epoch=1),
]
trainer = quiet_trainer(folder.parent, 3, callbacks, devices=2, strategy="ddp")
try:
    trainer.fit(small_module(), datamodule=synthetic_datamodule(600, 300, 100, 50))
except CheckpointWriteError as error:  # each process says how it stopped
    (folder.parent / f"rank{trainer.global_rank}.txt").write_text(str(error))
"""


@pytest.mark.slow
@pytest.mark.fault
def test_full_disk_under_ddp_stops_every_process(tmp_path: Path, mount_tmpfs):  # noqa: F811
    """Only the first process writes; when it cannot, all the processes stop together with
    its one line, rather than the others waiting for it forever."""
    folder = mount_tmpfs(tmp_path / "checkpoints", 2)
    script = tmp_path / "ddp_full_disk.py"  # Lightning starts the second process by path
    script.write_text(DDP_FULL_DISK)
    result = subprocess.run(
        [sys.executable, str(script), str(folder)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    line = (
        f"cannot write {folder / 'best.ckpt'}: No space left on device; the previous "
        "checkpoint is kept"
    )
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == [line, line]
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.load(folder / name, weights_only=False)["epoch"] == 0
    assert temporaries(folder) == []


# ------------------------------------------------------------------- a kill during a save
#: Saves checkpoints of 8 MB in a loop, each holding its number n in every weight.
SAVE_FOREVER = """
import itertools, sys, torch
from kdlight.trainer.checkpointing import AtomicCheckpointIO
writer = AtomicCheckpointIO()
for n in itertools.count():
    writer.save_checkpoint({"n": n, "weights": torch.full((2_000_000,), float(n))}, sys.argv[1])
"""


@pytest.mark.fault
def test_sigkill_during_a_save_leaves_a_whole_checkpoint(tmp_path: Path):
    """A process saving checkpoints one after another is killed with SIGKILL while a
    temporary file of a save is there. The checkpoint is a whole one (it loads and every
    weight holds its number), $TMPDIR holds nothing, and the next run's writer removes the
    temporary the killed one left before it writes. A kill can land between two saves, so
    it is tried until one lands in the middle of a save (the first almost always does:
    writing is nearly all the loop does). It needs no filesystem of its own: a kill leaves
    the same on any."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    system_temp = tmp_path / "systemp"
    system_temp.mkdir()
    path = folder / "last.ckpt"
    environ = {**os.environ, "TMPDIR": str(system_temp)}
    for _attempt in range(5):
        saver = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], env=environ)
        try:
            deadline = time.monotonic() + 120
            while not path.exists():  # the first save, after Python and torch have started
                assert saver.poll() is None, "the saving process ended by itself"
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.01)
            while not temporaries(folder):  # a later save, under way
                assert saver.poll() is None, "the saving process ended by itself"
                assert time.monotonic() < deadline, "no temporary file appeared beside it"
            saver.send_signal(signal.SIGKILL)
        finally:
            saver.kill()
            saver.wait()
        state = torch.load(path, weights_only=True)
        assert state["weights"].shape == (2_000_000,)
        assert bool((state["weights"] == state["n"]).all())
        assert list(system_temp.iterdir()) == []
        left = temporaries(folder)
        if left:
            break
    assert left, "no kill landed in the middle of a save in 5 tries"
    AtomicCheckpointIO().save_checkpoint({"n": -1}, path)  # the next run's first save
    assert temporaries(folder) == []
    assert torch.load(path, weights_only=True) == {"n": -1}


# ------------------------------------------------------------------- non-finite weights
class FirstLoss(Callback):
    """Keeps the first training loss of a fit."""

    first: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first is None:
            self.first = float(outputs["loss"])


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path: Path):
    """With lr=1e6 the gradients overflow and the weights turn NaN while the losses that
    drove them are still finite. last.ckpt is saved after every step; the save that would
    hold non-finite weights is refused and training stops, naming the last good checkpoint.
    Every checkpoint on disk holds finite weights and optimizer state, and the run resumes
    from it: its first step trains on finite weights (the issue's resume failed at once on
    NaN weights), and when it diverges again it names the checkpoint it resumed from."""
    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"

    def fit(ckpt_path: Path | None = None) -> tuple[str, FirstLoss]:
        first = FirstLoss()
        callbacks = [StopOnNonFiniteLoss(), SaveLastCheckpoint(folder, 1), first]
        with pytest.raises(NonFiniteLossError) as caught:
            quiet_trainer(tmp_path, 2, callbacks).fit(
                small_module(lr=1e6),
                datamodule=synthetic_datamodule(600, 300, 100, 50),
                ckpt_path=ckpt_path,
            )
        return str(caught.value), first

    for ckpt_path in (None, last):
        message, first = fit(ckpt_path)
        assert message.startswith("non-finite weights after step ")
        step = int(message.removeprefix("non-finite weights after step ").split()[0])
        assert message.endswith(
            "so the checkpoint was not written; training stopped, the last good checkpoint is "
            f"{last} (lower optimizer.lr, or look for bad inputs)"
        )
        assert torch.load(last, weights_only=False)["global_step"] == step - 1
        assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
        assert non_finite_entries(last, small_module()) == []
        assert first.first is not None and torch.isfinite(torch.tensor(first.first))


# -------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(("steps", "shown"), [(-1, "-1"), (2.5, "2.5"), (True, "true")])
def test_every_n_train_steps_must_be_a_whole_number_from_zero(tmp_path: Path, steps, shown):
    with pytest.raises(KDLightError) as caught:
        SaveLastCheckpoint(tmp_path, every_n_train_steps=steps)
    assert str(caught.value) == (  # the command line's words (the next test)
        f"callbacks.last_checkpoint.every_n_train_steps={shown} is not allowed: an integer >= 0"
    )


def test_negative_every_n_train_steps_is_one_line_from_the_cli(tmp_path: Path):
    result = run_cli([*TINY, "callbacks.last_checkpoint.every_n_train_steps=-1"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: callbacks.last_checkpoint.every_n_train_steps=-1 is not allowed: an integer >= 0"
    ]
