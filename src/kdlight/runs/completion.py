"""What makes a run finished: it trained every step it was asked for.

A run counts as finished (its ``metrics.json`` is written, and launching it again does
nothing) only when its fit trained ``trainer.max_epochs`` whole epochs, or stopped because
the user asked it to stop early (an ``EarlyStopping`` callback), which ``metrics.json``
records. Anything else that ends a fit sooner is not a result: the run stops with one line
and a non-zero exit status, keeps its ``last.ckpt``, and the same command continues it.
"""

import math
from collections.abc import Mapping
from datetime import timedelta

import lightning as L

from kdlight.errors import KDLightError


class NotFinished(KDLightError):
    """The fit ended before it trained what was asked, for no reason the user asked for:
    ``kdlight-train`` exits with status :attr:`exit_status`, 3, so that a script can tell
    "launch it again" from a setting error (2)."""

    exit_status = 3


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


def check_finished(trainer: L.Trainer) -> dict | None:
    """After ``trainer.fit``: None when it trained every step of ``max_epochs`` (or reached
    ``trainer.max_steps``), the early stop's record when an ``EarlyStopping`` callback ended
    it (the epoch it stopped after, what it monitored and why); otherwise
    :class:`NotFinished`, whose line says how far it got. (A time limit stops a run earlier,
    in :class:`~kdlight.runs.guard.SaveLastOnSigterm`, with its own line.)"""
    done = int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)  # in all launches
    per_epoch = trainer.num_training_batches
    asked = per_epoch * trainer.max_epochs if math.isfinite(per_epoch) else math.inf
    if asked == 0:
        raise NotFinished("no training step: the training data gives no batch")
    at_max_steps = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
    if done >= asked or at_max_steps:
        return None
    stopper = next((cb for cb in trainer.early_stopping_callbacks if cb.stopped_epoch), None)
    if done > 0 and stopper is not None:
        return {
            "epoch": int(stopper.stopped_epoch),
            "monitor": stopper.monitor,
            "best": float(stopper.best_score),
            "patience": int(stopper.patience),
        }
    stopped_by = "trainer.should_stop" if trainer.should_stop else "an unknown cause"
    raise NotFinished(
        f"not finished: trained {done} of {asked} steps ({done // per_epoch} of "
        f"{trainer.max_epochs} epochs), stopped by {stopped_by}; last.ckpt is kept: launch the "
        "same command again to continue"
    )


def time_limit_seconds(max_time: object) -> float | None:
    """``trainer.max_time`` as seconds: ``DD:HH:MM:SS`` (Lightning's spelling), a
    ``timedelta`` or a mapping of its fields (``{hours: 2}``); None when unset. It is each
    launch's limit, not Lightning's on the whole fit: the same command continues a run it
    stopped for another ``max_time`` (:class:`~kdlight.runs.guard.SaveLastOnSigterm`)."""
    if max_time is None:
        return None
    try:
        if isinstance(max_time, timedelta):
            seconds = max_time.total_seconds()
        elif isinstance(max_time, Mapping):
            seconds = timedelta(**{k: float(v) for k, v in max_time.items()}).total_seconds()
        else:
            days, hours, minutes, secs = (float(part) for part in str(max_time).split(":"))
            seconds = timedelta(days, secs, 0, 0, minutes, hours).total_seconds()
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > 0 or not math.isfinite(seconds):
        raise KDLightError(
            f"trainer.max_time={max_time} is not allowed: each launch's time limit, "
            "DD:HH:MM:SS and more than 0 (e.g. 00:08:50:00), or null for none"
        )
    return seconds
