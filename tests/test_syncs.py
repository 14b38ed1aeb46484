"""Training steps never wait for the device: no value is read back to the host per step."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from kdlight.train import train
from tests.conftest import TINY, compose_config

#: Python-level reads of a tensor's value; on a GPU each one waits for the device to finish.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def count_reads(monkeypatch) -> Counter:
    """Count the reads, and ``torch.tensor`` calls (a copy to the GPU when given a device)."""
    counts: Counter = Counter()

    def counted(name: str, original):
        def call(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return call

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", counted("torch.tensor", torch.tensor))
    return counts


@pytest.mark.parametrize("experiment", ["teacher", "distill", "distill_grid"])
def test_training_steps_read_nothing_back_from_the_device(
    experiment: str, tmp_path: Path, untrained_teacher: Path, monkeypatch
):
    """Reads of tensor values (``.item()``, ``bool()``, ...) over a whole run with the
    default callbacks and on-device data are no more for 9 training steps than for 3: none
    happens per step. (On a GPU each would stall the queue of kernels once per step.)"""
    reads = {}
    for steps in (3, 9):
        overrides = [
            f"experiment={experiment}", *TINY, f"trainer.limit_train_batches={steps}",
            "trainer.log_every_n_steps=1000", "callbacks.last_checkpoint.every_n_train_steps=0",
            "data.on_device=true",
        ]  # fmt: skip
        if "distill" in experiment:
            overrides += ["model=small_cnn", "model.width=0.25"]
            overrides += [f"distill.teacher_checkpoint={untrained_teacher}"]
        else:
            overrides += ["model=resnet8"]
        cfg = compose_config(overrides, tmp_path / str(steps))
        counts = count_reads(monkeypatch)
        train(cfg)
        monkeypatch.undo()
        reads[steps] = counts
    more = reads[9] - reads[3]  # what 6 more steps read (made-once caches make it <= 0)
    assert not more, f"reads per run: 3 steps {dict(reads[3])}, 9 steps {dict(reads[9])}"
