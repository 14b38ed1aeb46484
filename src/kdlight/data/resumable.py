"""The training loader that resumes in the middle of an epoch.

A run stopped at batch ``k`` of an epoch (a SIGTERM, Ctrl-C, a save every
``every_n_train_steps`` steps before a kill) and resumed from that checkpoint must train on
the rest of *that* epoch's order: Lightning starts the epoch's loader afresh, so without
more it would draw a new order and see other images (:class:`ResumableLoader`).
"""

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

log = logging.getLogger("kdlight")

#: What a training position is read from: (epoch, batches of it trained, batches per epoch).
Progress = Callable[[], tuple[int, int, int | float] | None]


class RecordedShuffle(RandomSampler):
    """``RandomSampler``'s order, drawn as it draws it (each pass takes a seed from torch's
    global generator, then permutes with a generator of its own), keeping the pass's seed
    in :attr:`seed` so that a resumed run can draw the same order again (:meth:`replay`).
    A run never stopped draws exactly what ``DataLoader(shuffle=True)`` draws.

    Under DDP Lightning puts its ``DistributedSampler`` in its place, as it does for a
    ``RandomSampler`` (an order from the run's seed and the epoch).
    """

    def __init__(self, data_source) -> None:
        super().__init__(data_source)
        self.seed: int | None = None
        self._replay: int | None = None

    def replay(self, seed: int) -> None:
        """Draw the next pass's order with ``seed`` instead of a new one."""
        self._replay = seed

    def __iter__(self) -> Iterator[int]:
        seed, self._replay = self._replay, None
        if seed is None:  # RandomSampler's own draw, from the global generator
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` that a checkpoint saved in the middle of an epoch resumes
    at the batch it reached, with the rest of the epoch's batches as they would have been,
    without touching the random state that the checkpoint restored
    (:class:`kdlight.trainer.callbacks.ResumeRandomState`): the run goes on exactly as the
    run never stopped.

    Lightning saves :meth:`state_dict` in every checkpoint (a stateful loader) and, resuming,
    calls :meth:`load_state_dict` before it starts the loader's first pass. The state: the
    epoch, the seed of its order (:class:`RecordedShuffle`; None under DDP, whose sampler
    orders by the run's seed and the epoch) and ``batches``, how many of its batches were
    trained, read from the trainer's own count through ``progress`` (a fetcher may hold
    batches ahead of those trained). At an epoch's end ``batches`` is 0: the next epoch
    draws a new order, as it would have.

    Args:
        progress: returns ``(epoch, batches trained in it, batches per epoch)`` while
            training, None otherwise.
        *args, **kwargs: ``DataLoader``'s.
    """

    def __init__(self, *args: Any, progress: Progress | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        """Where training is in the current epoch; only numbers (a weights-only load
        reads it)."""
        position = self.progress() if self.progress is not None else None
        if position is None:
            return {"epoch": -1, "batches": 0, "shuffle_seed": None}
        epoch, batches, per_epoch = position
        if not 0 < batches < per_epoch:  # the epoch is over (or not begun): a new order next
            batches = 0
        seed = self.sampler.seed if isinstance(self.sampler, RecordedShuffle) else None
        return {"epoch": epoch, "batches": batches, "shuffle_seed": seed if batches else None}

    def load_state_dict(self, state_dict: dict) -> None:
        """Start the next pass where :meth:`state_dict` says training was."""
        self._resume = dict(state_dict) if state_dict.get("batches", 0) > 0 else None

    def __iter__(self) -> Iterator:
        resume, self._resume = self._resume, None
        if resume is None:
            return super().__iter__()
        seed = resume.get("shuffle_seed")
        if isinstance(self.sampler, RecordedShuffle):
            if seed is None:
                log.warning(
                    "the checkpoint does not say how epoch %d's order was drawn (several DDP "
                    "processes saved it): the rest of that epoch sees a new order, so this "
                    "run will not end exactly as one never stopped",
                    resume["epoch"],
                )
            else:
                self.sampler.replay(seed)
        elif hasattr(self.sampler, "set_epoch"):  # DDP's: its order is the epoch's
            self.sampler.set_epoch(resume["epoch"])
        # Making the iterator draws from the global generator (a seed for its workers), which
        # the run never stopped did at the epoch's start, long before: put it back after.
        random_state = torch.get_rng_state()
        iterator = super().__iter__()
        for _ in range(resume["batches"]):  # the trained ones, fetched and dropped
            next(iterator)
        torch.set_rng_state(random_state)
        return iterator
