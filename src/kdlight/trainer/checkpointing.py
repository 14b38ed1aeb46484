"""Checkpoint files that are whole or absent (:class:`AtomicCheckpointIO`), the check that
keeps NaN out of them (:func:`non_finite_tensors`, for
:class:`kdlight.trainer.callbacks.StopOnNonFiniteLoss`), and :func:`read_checkpoint`, which
reads every checkpoint (a resumed or evaluated run's, :func:`kdlight.load_model`'s,
:func:`kdlight.load_teacher`'s): a pickle planted in a run folder's ``last.ckpt`` or named by
``ckpt_path=`` is refused in one line, and nothing in it runs. kdlight's own checkpoints hold
only what that reader accepts (tensors, numbers, text, dicts, lists, tuples, and the
``collections.Counter`` of a ``MultiStepLR``'s milestones): the systems' hyperparameters are
plain containers, the random states tensors and tuples
(:class:`kdlight.trainer.callbacks.ResumeRandomState`), so no global has to be allowed beyond
PyTorch's own list.
"""

import functools
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kdlight.errors import KDLightError, first_line
from kdlight.runs.files import atomic_write, remove_stale_temporaries


class CheckpointWriteError(KDLightError):
    """A checkpoint could not be written (a full disk, a read-only folder); the file that was
    there before is kept whole."""


class UnreadableCheckpoint(KDLightError):
    """A checkpoint that cannot be read: absent, cut short, not a ``torch.save`` file, or one
    that holds more than tensors and plain values (a pickle that would run code as it loads)."""


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", what: str = "checkpoint", remedy: str = ""
) -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``torch.load(weights_only=True)``: only tensors
    and plain values are built, and no function the file names is called.

    Raises:
        UnreadableCheckpoint: one line, ``cannot read {what} {path} ({why})``, then
            ``; {remedy}`` where one is given. Why: no such file, the global a pickle
            names, a truncated zip, or a file that holds no dict.
    """
    why = "no such file"
    if Path(path).is_file():
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # truncated zip, a refused global, not a torch.save file...
            why = load_failure(err)
        else:
            if isinstance(checkpoint, dict):
                return checkpoint
            why = f"it holds a {type(checkpoint).__name__}, not a checkpoint's dict"
    message = f"cannot read {what} {path} ({why})"
    raise UnreadableCheckpoint(f"{message}; {remedy}" if remedy else message)


def load_failure(error: BaseException) -> str:
    """Why ``torch.load`` could not read a file, in one line: for a weights-only refusal, the
    global it met (the message's first line is advice to load the file unsafely)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Weights only load failed"):
        return first_line(error)
    # "WeightsUnpickler error: Unsupported global: GLOBAL x.y was not an allowed global...",
    # or "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
    found = next((line for line in lines[1:] if "GLOBAL" in line or "Unpickler" in line), None)
    reason = (found or lines[0]).split("WeightsUnpickler error:", 1)[-1].strip()
    reason = reason.split(". ")[0].rstrip(".")
    return f"{reason}: it holds more than tensors and plain values, and is not loaded"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with every local checkpoint written by
    :func:`kdlight.runs.files.atomic_write` (beside the destination, synced, then renamed into
    place): a reader or a relaunched run finds the old whole file or the new whole file, never
    a part of one. Lightning's own writes into ``$TMPDIR`` and moves the file into place, which
    on another filesystem (a cluster's shared storage, a tmpfs) is a copy over the old file: a
    kill or a full disk during it leaves a truncated ``last.ckpt`` and an orphan in ``$TMPDIR``.
    :func:`kdlight.train.build_trainer` adds it to the Trainer's plugins.

    A write that fails raises :class:`CheckpointWriteError`, one line that names the file
    (``cannot write .../last.ckpt: No space left on device; the previous checkpoint is
    kept``). The first write into a folder first removes the temporaries that a writer killed
    there (in an earlier attempt at the run) left behind.

    Under DDP only the first process writes, as with Lightning's own writer. It does not
    raise there, which would leave the other processes waiting for it forever: it keeps the
    failure for :func:`raise_failed_writes`, which all processes call together after a save.
    Remote paths (``s3://...``) go to Lightning's writer, whose uploads are whole already.

    It reads checkpoints (a resumed ``fit``, ``test`` with ``ckpt_path``) with
    :func:`read_checkpoint`, weights only whatever the caller asks: an unreadable or unsafe
    file is one :class:`UnreadableCheckpoint` line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failure: str | None = None  # under DDP, until raise_failed_writes reads it
        self._cleaned: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (it writes files)")
        path = Path(path)
        if path.parent not in self._cleaned:
            remove_stale_temporaries(path.parent)
            self._cleaned.add(path.parent)
        kept = "the previous checkpoint is kept" if path.exists() else "nothing was written there"
        try:
            atomic_write(path, functools.partial(torch.save, checkpoint))
        except Exception as err:
            reason = _os_error(err)
            if reason is None:
                raise
            message = f"cannot write {path}: {reason.strerror or reason}; {kept}"
            if distributed():
                self.failure = self.failure or message
                return
            raise CheckpointWriteError(message) from err

    def load_checkpoint(
        self, path: str | Path, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(path, map_location)


def raise_failed_writes(trainer: L.Trainer) -> None:
    """Under DDP, raise in every process the :class:`CheckpointWriteError` of a checkpoint
    that the first process failed to write, so that they all stop together. Call it in all
    processes at once (it is a broadcast); with one process it does nothing."""
    if trainer.world_size == 1:
        return
    writer = trainer.strategy.checkpoint_io
    failure = None
    if isinstance(writer, AtomicCheckpointIO):
        failure, writer.failure = writer.failure, None
    failure = trainer.strategy.broadcast(failure, src=0)
    if failure:
        raise CheckpointWriteError(failure)


def non_finite_tensors(
    checkpoint: dict[str, Any], weights: Collection[str] | None = None
) -> tuple[list[str], int]:
    """The names of the floating-point tensors of a checkpoint's weights (``state_dict``) and
    optimizer state (``optimizer_states``) that hold a NaN or an infinity, and the number of
    such tensors checked. ``weights`` names the entries of ``state_dict`` to check (all when
    it is None): a module's parameters and buffers, say, and not its torchmetrics states,
    where ``-inf`` is the start of a running maximum. Each device's tensors are checked
    there and read back at once."""
    state = checkpoint.get("state_dict", {})
    if weights is not None:
        state = {name: value for name, value in state.items() if name in weights}
    tensors = [
        *_floating_tensors(state, ""),
        *_floating_tensors(checkpoint.get("optimizer_states", []), "optimizer_states."),
    ]
    by_device = defaultdict(list)
    for index, (_, tensor) in enumerate(tensors):
        by_device[tensor.device].append(index)
    bad = []
    for indices in by_device.values():
        finite = torch.stack([torch.isfinite(tensors[i][1]).all() for i in indices]).tolist()
        bad += [i for i, ok in zip(indices, finite, strict=True) if not ok]
    return [tensors[i][0] for i in sorted(bad)], len(tensors)


def _floating_tensors(tree: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` for every floating-point tensor in nested dicts and lists."""
    if isinstance(tree, torch.Tensor):
        return [(prefix.rstrip("."), tree)] if tree.is_floating_point() else []
    if not isinstance(tree, dict | list | tuple):
        return []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    return [found for key, value in items for found in _floating_tensors(value, f"{prefix}{key}.")]


def _os_error(error: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``error``: ``torch.save`` reports a failed write into a file
    object as a ``RuntimeError`` of its zip writer, raised while handling the ``OSError``."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def distributed() -> bool:
    """Whether this process is one of several of an initialized process group."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )
