"""A callback that makes every training step last at least ``seconds`` longer, so that a
toy run outlasts a short ``trainer.max_time`` on any CPU, however fast: a test of time
limits then stops a run in the middle whatever the machine. It changes no number."""

import time

from lightning.pytorch.callbacks import Callback


class SlowSteps(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
