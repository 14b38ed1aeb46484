"""What makes a run finished: it trained every step it was asked for.

A run counts as finished (its ``metrics.json`` is written, and launching it again does
nothing) only when its fit trained ``trainer.max_epochs`` whole epochs, or stopped because
the user asked it to stop early (an ``EarlyStopping`` callback), which ``metrics.json``
records. Anything else that ends a fit sooner is not a result: the run stops with one line
and a non-zero exit status, keeps its ``last.ckpt``, and the same command continues it.
"""

import math

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping

from kdlight.errors import KDLightError


class NotFinished(KDLightError):
    """The fit ended before it trained what was asked, for no reason the user asked for."""


def check_training_batches(datamodule: L.LightningDataModule, world_size: int) -> None:
    """Refuse, before any work, a training split that gives no batch: with
    ``data.drop_last=true`` a batch larger than the split would train zero steps and end
    as if it had trained."""
    hp = datamodule.hparams
    images = math.ceil(len(datamodule.train_set) / world_size)  # each process's share
    if images >= hp.batch_size or not hp.drop_last and images > 0:
        return
    raise KDLightError(
        f"no training step: data.batch_size={hp.batch_size * world_size} is more than the "
        f"{images * world_size} training images and data.drop_last=true leaves out the only, "
        "smaller batch; choose a smaller data.batch_size or data.drop_last=false"
        if images
        else "no training step: the training split holds no image"
    )


def early_stop(trainer: L.Trainer) -> dict | None:
    """What an ``EarlyStopping`` callback that stopped this fit records: the epoch it stopped
    after, what it monitored and why; None when none stopped it."""
    for callback in trainer.early_stopping_callbacks:
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch:
            return {
                "epoch": int(callback.stopped_epoch),
                "monitor": callback.monitor,
                "best": float(callback.best_score),
                "patience": int(callback.patience),
            }
    return None


def trained_steps(trainer: L.Trainer) -> tuple[int, int]:
    """The training batches this run has completed, over all its launches, and the number
    its ``max_epochs`` asks for (``max_epochs`` times the batches of an epoch)."""
    done = trainer.fit_loop.epoch_loop.batch_progress.total.completed
    per_epoch = trainer.num_training_batches
    asked = per_epoch * trainer.max_epochs if math.isfinite(per_epoch) else math.inf
    return int(done), asked


def check_finished(trainer: L.Trainer, stopped_by: str | None = None) -> dict | None:
    """After ``trainer.fit``: None when it trained every step of ``max_epochs`` (or reached
    ``trainer.max_steps``), the early stop's record when an ``EarlyStopping`` callback ended
    it; otherwise :class:`NotFinished`, whose line says how far it got and why it stopped
    (``stopped_by``, when the caller knows)."""
    done, asked = trained_steps(trainer)
    if asked == 0:
        raise NotFinished("no training step: the training data gives no batch")
    if (
        done >= asked
        or trainer.max_steps not in (None, -1)
        and (trainer.global_step >= trainer.max_steps)
    ):
        return None
    if done > 0 and (stopped := early_stop(trainer)) is not None:
        return stopped
    if stopped_by is None:
        stopped_by = "trainer.should_stop" if trainer.should_stop else "an unknown cause"
    per_epoch = trainer.num_training_batches
    raise NotFinished(
        f"not finished: trained {done} of {asked} steps ({done // per_epoch} of "
        f"{trainer.max_epochs} epochs), stopped by {stopped_by}; last.ckpt is kept: launch the "
        "same command again to continue"
    )
