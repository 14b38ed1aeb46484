"""``FastForward``: a model run through ``torch.compile`` and in channels-last memory format
when asked, for the training steps of a student or a teacher; evaluation runs it eagerly."""

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from kdlight.errors import first_line


class FastForward:
    """``model`` for training steps, through ``torch.compile`` when asked and in
    channels-last memory format when asked; if compiling fails (no compiler on this
    platform, say) warn once and run eagerly. The model itself is untouched, so state-dict
    keys stay the same.

    Evaluation goes through :meth:`eager` instead: compiled, validation (``no_grad``) and
    testing (``inference_mode``) would each cost a compilation of their own, and at their
    large batches on a GPU the compiled forward gains little on about a tenth of the work.
    """

    def __init__(
        self, model: nn.Module, compile: bool = False, channels_last: bool = False
    ) -> None:
        self.model = model
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.run = torch.compile(model) if compile else model

    def __call__(self, images: Tensor) -> Tensor:
        if self.run is not self.model:
            try:
                return self.run(self._format(images))
            except Exception as err:  # torch.compile compiles lazily, on the first call
                rank_zero_warn(
                    f"torch.compile failed ({type(err).__name__}: {first_line(err)[:200]}); "
                    "running eagerly"
                )
                self.run = self.model
        return self.eager(images)

    def eager(self, images: Tensor) -> Tensor:
        """The model run eagerly (in channels-last format when asked), for evaluation."""
        return self.model(self._format(images))

    def _format(self, images: Tensor) -> Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images
