"""Lightning callbacks for runs that survive crashes: an always-current ``last.ckpt`` to
resume from, the random state in every checkpoint so that a resumed run continues as if
never stopped, a stop at the first non-finite loss or weight, before it reaches a
checkpoint, and the run's identity in every checkpoint."""

import logging
import random
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint

from kdlight.config.settings import check
from kdlight.errors import KDLightError
from kdlight.runs.identity import RunIdentity
from kdlight.trainer.checkpointing import distributed, non_finite_tensors, raise_failed_writes

log = logging.getLogger("kdlight")


class SaveLastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` current: at the end of every epoch and every
    ``every_n_train_steps`` training steps (0: only at epoch ends; not after an epoch's last
    batch, whose epoch-end save follows its validation).

    It is what ``kdlight-train`` resumes from, so a crash or a pre-empted job in the middle
    of an epoch loses at most ``every_n_train_steps`` steps, and what a finished teacher
    leaves for distillation: its final weights. (Lightning's ``save_last`` only follows the
    saves of the top-k checkpoints, so it can lag behind.) Under DDP, after each of its saves
    and after validation (where ``ModelCheckpoint`` saves ``best.ckpt``), the processes learn
    together whether the first failed to write (:func:`.checkpointing.raise_failed_writes`).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 1000) -> None:
        check("callbacks.last_checkpoint", every_n_train_steps=every_n_train_steps)
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.last_model_path = ""  # the name Lightning's ckpt_path="last" looks up

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resumed = trainer.ckpt_path
        if resumed and Path(resumed).resolve() == self.path.resolve():
            self.last_model_path = str(self.path)  # what a stop now names as the last good one

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = self.every_n_train_steps
        if steps and trainer.global_step % steps == 0 and not ends_epoch(trainer):
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            raise_failed_writes(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (all processes call it, one writes); not while Lightning
        checks the validation loop first, nor in a ``fast_dev_run``."""
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        raise_failed_writes(trainer)
        self.last_model_path = str(self.path)


def ends_epoch(trainer: L.Trainer) -> bool:
    """Whether the training batch that just ran is its epoch's last: its validation and the
    epoch's end (``on_train_epoch_end``, the scheduler's step) follow. Lightning resumes a
    checkpoint saved after that batch as one saved at the epoch's end, without them."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches


class ResumeRandomState(Callback):
    """Keep the random state in every checkpoint and restore it when a run resumes from one,
    so that a run stopped after an epoch and launched again draws the same shuffles, crops,
    flips (and a distillation method's samples) as a run never stopped, and ends with the
    same weights and results.

    Kept: torch's CPU generator, each CUDA device's (once CUDA is in use), numpy's and
    Python's ``random``, in types ``torch.load(weights_only=True)`` reads. The crop-and-flip
    generators of DDP processes other than the first are the data module's
    (:meth:`kdlight.data.CIFAR10DataModule.state_dict`).

    Restored as Lightning restores the callbacks at the start of ``fit``: after the ``setup``
    hooks, before ``on_fit_start``. The first draw after the restore is the training
    loader's (its iterator takes a seed before ``on_train_start``, then its sampler the
    epoch's shuffle), as after the save; the sanity check runs with the random state put
    back after it. So a hook in between (``on_fit_start``, ``on_train_start``) must draw no
    random number; a module's own draws belong in ``__init__`` or ``setup``.

    From a checkpoint saved in the middle of an epoch (``every_n_train_steps``, a SIGTERM,
    Ctrl-C) it is exact too with kdlight's data modules (their training loader is a
    :class:`kdlight.data.resumable.ResumableLoader`).

    Under DDP every process takes part in writing a checkpoint, so they exchange their
    states then and the first writes them all; on resuming each restores its own, by global
    rank, and a process the checkpoint holds no state for (more processes) keeps its seeded
    state.
    """

    def state_dict(self) -> dict:
        mine = _random_state()
        if not distributed():
            return {"processes": [mine]}
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
        return {"processes": every}

    def load_state_dict(self, state_dict: dict) -> None:
        processes = state_dict.get("processes", [])
        rank = torch.distributed.get_rank() if distributed() else 0
        if rank < len(processes):
            _set_random_state(processes[rank])
        else:
            log.warning(
                "the checkpoint holds the random state of %d processes: process %d goes on "
                "with its seeded state",
                len(processes),
                rank,
            )


def _random_state() -> dict:
    """This process's global random state, in types ``torch.load(weights_only=True)`` reads."""
    _, keys, *rest = np.random.get_state(legacy=True)  # position, has_gauss, cached_gaussian
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": (torch.from_numpy(keys.astype(np.int64)), *rest),
        "python": random.getstate(),
    }


def _set_random_state(state: dict) -> None:
    """Restore what :func:`_random_state` returned (CUDA's on the devices there are)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    keys, *rest = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class NonFiniteLossError(KDLightError):
    """Training produced a NaN or infinite loss or weight; nothing was saved after it."""


class StopOnNonFiniteLoss(Callback):
    """Stop training at the first NaN or infinite loss, with its step and its parts.

    Checking costs no step a wait for the device: each batch's loss parts (whatever
    ``training_step`` returned: ``loss``, and ``kd`` and ``ce`` for a ``DistillationModule``,
    each cell's loss for a fused grid) are kept as tensors, and read back together every
    ``check_every_n_steps`` steps, at each epoch's end and before any checkpoint is saved.
    So training stops at most that many steps after the first non-finite loss, the message
    names that loss's step, and no checkpoint holds weights from after it.

    A loss can be finite while the step it drives is not (with a huge learning rate the
    gradient overflows, and the weights become NaN one step before the loss does), so every
    checkpoint is also checked before it is written (:meth:`check_weights`): ``last.ckpt``
    stays the last good state, and the message names it. Under DDP the processes decide
    together, so that they all stop rather than some waiting for the others forever.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        check("callbacks.stop_on_nonfinite_loss", check_every_n_steps=check_every_n_steps)
        self.check_every_n_steps = check_every_n_steps
        # (step, epoch, batch index, loss parts) of each step since the last check
        self._pending: list[tuple[int, int, int, dict[str, torch.Tensor]]] = []

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
        # raising here keeps the checkpoint from being written
        self.check(trainer)
        self.check_weights(trainer, checkpoint)

    def check_weights(self, trainer: L.Trainer, checkpoint: dict) -> None:
        """Raise :class:`NonFiniteLossError` if a floating-point tensor of ``checkpoint``'s
        weights (the module's parameters and buffers) or optimizer state is not finite, in
        this process or, under DDP, in any other."""
        module = trainer.lightning_module
        weights = {*dict(module.named_parameters()), *dict(module.named_buffers())}
        bad, total = non_finite_tensors(checkpoint, weights)
        if not _reduce(trainer, int(bool(bad)), "max"):
            return
        where = f"after step {trainer.global_step} (epoch {trainer.current_epoch})"
        if bad:
            names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            found = f"{where}: {len(bad)} of {total} tensors hold NaN or infinity ({names})"
        else:
            found = f"in another DDP process {where}"
        _stop(trainer, f"non-finite weights {found}, so the checkpoint was not written")

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
        first = _reduce(trainer, _NONE if mine is None else mine, "min")  # of any process
        if first == _NONE:
            return
        _, epoch, batch_idx, parts = next(entry for entry in pending if entry[0] == first)
        where = f"step {first} (epoch {epoch}, batch {batch_idx})"
        if first == mine:
            found = f"non-finite loss at {where}: {_describe(parts)}"
        else:
            found = f"non-finite loss in another DDP process at {where} (this one's: {_describe(parts)})"
        _stop(trainer, found)


_NONE = 2**62  # "no non-finite loss" in the DDP reduction of first steps


def _reduce(trainer: L.Trainer, value: int, op: str) -> int:
    """``value`` reduced (``op``: ``"min"``, ``"max"``) over the DDP processes."""
    if trainer.world_size == 1:
        return value
    tensor = torch.tensor(value, device=trainer.strategy.root_device)
    return int(trainer.strategy.reduce(tensor, reduce_op=op))


def _stop(trainer: L.Trainer, found: str) -> None:
    """Raise :class:`NonFiniteLossError`: what was found, and the checkpoint that is kept."""
    saved = [getattr(cb, "last_model_path", "") for cb in trainer.checkpoint_callbacks]
    kept = next((path for path in saved if path), None)
    kept = f"the last good checkpoint is {kept}" if kept else "no checkpoint had been saved yet"
    raise NonFiniteLossError(
        f"{found}; training stopped, {kept} (lower optimizer.lr, or look for bad inputs)"
    )


def _describe(parts: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"train/{name}={value.float().mean():.4g}" for name, value in parts.items())


class RecordRunIdentity(Callback):
    """Write the run's identity into every checkpoint, so that a checkpoint is only ever
    resumed by the run it belongs to (:func:`kdlight.runs.identity.check_checkpoint_owner`)."""

    def __init__(self, identity: RunIdentity) -> None:
        self.identity = identity

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["kdlight_run"] = self.identity.record()
