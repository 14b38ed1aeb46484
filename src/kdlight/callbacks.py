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

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 100) -> None:
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

    It checks each batch's outputs after the optimizer step and before any checkpoint is
    saved (Lightning calls checkpoint callbacks last), so ``last.ckpt`` stays the last good
    state and resuming from it does not start from broken weights. The message names every
    loss part ``training_step`` returned (``train/loss``, ``train/kd`` and ``train/ce`` for a
    ``DistillationModule``). Under DDP the processes decide together, so that they all stop
    rather than some waiting for the others forever.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        parts = outputs if isinstance(outputs, Mapping) else {"loss": outputs}
        parts = {name: value for name, value in parts.items() if isinstance(value, torch.Tensor)}
        non_finite = not all(bool(torch.isfinite(value).all()) for value in parts.values())
        if not trainer.strategy.reduce_boolean_decision(non_finite, all=False):
            return
        values = ", ".join(
            f"train/{name}={value.float().mean():.4g}" for name, value in parts.items()
        )
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"
        saved = [getattr(cb, "last_model_path", "") for cb in trainer.checkpoint_callbacks]
        kept = next((path for path in saved if path), None)
        raise NonFiniteLossError(
            (f"non-finite loss at {where}: {values}" if non_finite else
             f"non-finite loss in another DDP process at {where} (this one's: {values})")
            + "; training stopped, "
            + (f"the last good checkpoint is {kept}" if kept else "no checkpoint had been saved yet")
            + " (lower optimizer.lr, or look for bad inputs)"
        )  # fmt: skip
