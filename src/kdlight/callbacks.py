"""Lightning callbacks for runs that survive crashes: an always-current ``last.ckpt`` to
resume from, and a stop at the first non-finite loss."""

from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint

from kdlight.errors import KDLightError


class SaveLastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` current: at the end of every epoch and every
    ``every_n_train_steps`` training steps (0: only at epoch ends).

    It is what ``kdlight-train`` resumes from, so a crash or a pre-empted job in the middle
    of an epoch loses at most ``every_n_train_steps`` steps, and what a finished teacher
    leaves for distillation: its final weights. (Lightning's ``save_last`` only follows the
    saves of the top-k checkpoints, so it can lag behind.) The file is replaced atomically.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 1000) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.last_model_path = ""  # the name Lightning's ckpt_path="last" looks up

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = self.every_n_train_steps
        if steps and trainer.global_step % steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # all processes call it, one writes
        self.last_model_path = str(self.path)


class NonFiniteLossError(KDLightError):
    """Training produced a NaN or infinite loss; nothing was saved after it."""


class StopOnNonFiniteLoss(Callback):
    """Stop training at the first NaN or infinite loss, with its step and its parts.

    Checking costs no step a wait for the device: each batch's loss parts (whatever
    ``training_step`` returned: ``loss``, and ``kd`` and ``ce`` for a ``DistillationModule``,
    each cell's loss for a fused grid) are kept as tensors, and read back together every
    ``check_every_n_steps`` steps, at each epoch's end and before any checkpoint is saved.
    So training stops at most that many steps after the first non-finite loss, the message
    names that loss's step, and no checkpoint holds weights from after it: ``last.ckpt``
    stays the last good state, and resuming from it does not start from broken weights.
    Under DDP the processes decide together, so that they all stop rather than some
    waiting for the others forever.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        if check_every_n_steps < 1:
            raise KDLightError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._pending: list[
            tuple[int, int, int, dict[str, torch.Tensor]]
        ] = []  # step, epoch, batch, parts

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        parts = outputs if isinstance(outputs, Mapping) else {"loss": outputs}
        parts = {k: v.detach() for k, v in parts.items() if isinstance(v, torch.Tensor)}
        self._pending.append((trainer.global_step, trainer.current_epoch, batch_idx, parts))
        if len(self._pending) >= self.check_every_n_steps:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict
    ) -> None:
        self.check(trainer)  # raising here keeps the checkpoint from being written

    def check(self, trainer: L.Trainer) -> None:
        """Raise :class:`NonFiniteLossError` if a loss since the last check was not finite,
        in this process or, under DDP, in any other."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        finite = torch.stack([
            torch.stack([torch.isfinite(v).all() for v in parts.values()]).all()
            for *_, parts in pending
        ]).tolist()  # fmt: skip  # the one read back from the device
        mine = next((step for (step, *_), ok in zip(pending, finite, strict=True) if not ok), None)
        first = mine
        if trainer.world_size > 1:  # the earliest step at which any process went non-finite
            step = torch.tensor(
                _NONE if mine is None else mine, device=trainer.strategy.root_device
            )
            first = int(trainer.strategy.reduce(step, reduce_op="min"))
            first = None if first == _NONE else first
        if first is None:
            return
        _, epoch, batch_idx, parts = next(entry for entry in pending if entry[0] == first)
        where = f"step {first} (epoch {epoch}, batch {batch_idx})"
        if first == mine:
            found = f"non-finite loss at {where}: {_describe(parts)}"
        else:
            found = f"non-finite loss in another DDP process at {where} (this one's: {_describe(parts)})"
        saved = [getattr(cb, "last_model_path", "") for cb in trainer.checkpoint_callbacks]
        kept = next((path for path in saved if path), None)
        kept = f"the last good checkpoint is {kept}" if kept else "no checkpoint had been saved yet"
        raise NonFiniteLossError(
            f"{found}; training stopped, {kept} (lower optimizer.lr, or look for bad inputs)"
        )


_NONE = 2**62  # "no non-finite loss" in the DDP reduction of first steps


def _describe(parts: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"train/{name}={value.float().mean():.4g}" for name, value in parts.items())
