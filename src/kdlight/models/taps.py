"""Feature taps: a network's intermediate outputs, read by module name with forward hooks.

Any ``nn.Module`` works unchanged (a kdlight model, a torchvision or timm one): a tap is the
name ``model.named_modules()`` gives a submodule, and what it reads is that submodule's
output in the forward pass. kdlight's models name their default taps in
``model.feature_taps``::

    {"stages": ["stages.1", "stages.3", ...],  # each stage's output, shallow to deep
     "preact_stages": ["stages.1.preact", ...],  # the same before its last ReLU
     "embedding": ["pool"]}                    # the pooled feature the classifier reads

which the feature methods of :mod:`kdlight.distillers` use unless told other names. A
model with ``preact_stages`` taps may also name, in ``model.bn_before_relu``, the BN whose
output each of them sums or is (OFD's margins come from a teacher's).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from kdlight.errors import KDLightError


def module_names(model: nn.Module) -> list[str]:
    """The names a tap can take: every submodule's, in ``named_modules`` order."""
    return [name for name, _ in model.named_modules() if name]


def default_taps(model: nn.Module, kind: str, role: str = "model") -> list[str]:
    """The taps of ``kind`` (``"stages"``, ``"preact_stages"``, ``"embedding"``) that
    ``model`` names in ``model.feature_taps``; a one-line error when it names none, saying
    how to name them."""
    named = getattr(model, "feature_taps", None) or {}
    if named.get(kind):
        return list(named[kind])
    setting = f"distiller.{role}_taps" if role in ("student", "teacher") else "the taps"
    raise KDLightError(
        f"the {role} ({type(model).__name__}) names no default {kind} taps: set {setting}"
        f"=[...] to module names, e.g. {', '.join(module_names(model)[-4:])}"
    )


def check_tap_names(model: nn.Module, names: Sequence[str], role: str = "model") -> None:
    """Every one of ``names`` is a submodule of ``model``; otherwise a one-line
    :class:`KDLightError` naming the first that is not, and every name that is."""
    modules = dict(model.named_modules())
    for name in names:
        if not name or name not in modules:
            raise KDLightError(
                f"the {role} ({type(model).__name__}) has no module {name!r} to tap; "
                f"valid names: {', '.join(module_names(model))}"
            )


class FeatureTaps:
    """Forward hooks on ``model``'s submodules ``names``; their outputs are captured only
    inside :meth:`capture` (evaluation and the teacher's test pass keep nothing)::

        taps = FeatureTaps(student, ["stages.1", "pool"])
        with taps.capture() as features:
            logits = student(images)
        features["pool"]  # that forward's output of student.pool

    A name that is not a submodule of ``model`` is refused (:func:`check_tap_names`).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str = "model") -> None:
        check_tap_names(model, names, role)
        modules = dict(model.named_modules())
        self.names = list(names)
        self.role = role
        self._captured: dict[str, Tensor] | None = None
        self._handles = [modules[name].register_forward_hook(_Keep(self, name)) for name in names]

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """The outputs of the tapped modules during the forward passes inside the block,
        by name in tap order (a module run twice keeps its last output)."""
        self._captured = captured = {}
        try:
            yield captured
        finally:
            self._captured = None
        missing = [name for name in self.names if name not in captured]
        if missing:
            raise KDLightError(
                f"the {self.role}'s module {missing[0]!r} did not run in its forward pass, so "
                "it cannot be tapped: name a module that computes the output"
            )
        ordered = {name: captured[name] for name in self.names}
        captured.clear()
        captured.update(ordered)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Keep:
    """The forward hook of one tap: keeps the module's output while its taps capture (a
    class, not a closure, so that a model with taps can still be pickled)."""

    def __init__(self, taps: FeatureTaps, name: str) -> None:
        self.taps, self.name = taps, name

    def __call__(self, module: nn.Module, args, output: Tensor) -> None:
        if self.taps._captured is not None:
            self.taps._captured[self.name] = output


@torch.no_grad()
def probe_shapes(
    model: nn.Module, taps: FeatureTaps, input_shape: Sequence[int] = (3, 32, 32)
) -> dict[str, torch.Size]:
    """Each tap's output shape for one sample (without the batch dimension), from a forward
    pass of two blank images in eval mode (no BatchNorm statistics change)."""
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else None
    model.eval()
    try:
        with taps.capture() as features:
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
    return {name: output.shape[1:] for name, output in features.items()}
