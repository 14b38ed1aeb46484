"""Restoring a frozen teacher from a ``ClassifierModule`` checkpoint."""

from pathlib import Path

import torch
from torch import nn

from kdlight.errors import KDLightError
from kdlight.models import create_model

MAKE_A_TEACHER = "train one first: kdlight-train experiment=teacher"


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher only ever runs inference."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(
    path: str | Path, model_name: str | None = None, num_classes: int | None = None
) -> nn.Module:
    """Rebuild the model stored in a kdlight checkpoint, load its weights and freeze it.

    Args:
        path: a checkpoint written by ``ClassifierModule`` (e.g. ``experiment=teacher``).
        model_name: if given, the checkpoint must hold this architecture.
        num_classes: if given, the checkpoint's model must have this many outputs.

    Raises:
        KDLightError: missing, unreadable, not a kdlight classifier, or another model.
    """
    path = Path(path)
    if not path.is_file():
        raise KDLightError(f"teacher checkpoint not found: {path}; {MAKE_A_TEACHER}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors, wrong format...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KDLightError(
            f"teacher checkpoint {path} cannot be read ({first_line}); {MAKE_A_TEACHER}"
        ) from None
    spec = checkpoint.get("kdlight", {}).get("model_spec") if isinstance(checkpoint, dict) else None
    if not spec:
        raise KDLightError(f"{path} is not a kdlight ClassifierModule checkpoint; {MAKE_A_TEACHER}")
    if model_name is not None and spec["name"] != model_name:
        raise KDLightError(
            f"teacher checkpoint {path} holds a {spec['name']}, not a {model_name} "
            f"(set distill.teacher_model={spec['name']} or point distill.teacher_checkpoint at a {model_name})"
        )
    if num_classes is not None and spec["num_classes"] != num_classes:
        raise KDLightError(
            f"teacher checkpoint {path} predicts {spec['num_classes']} classes, the student {num_classes}"
        )
    model = create_model(**spec)
    weights = {
        k.removeprefix("model."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("model.")
    }
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise KDLightError(
            f"teacher checkpoint {path} does not match {spec['name']}: {str(err).splitlines()[0]}"
        ) from None
    return freeze(model)
