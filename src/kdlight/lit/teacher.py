"""The frozen teacher: restored from a ``ClassifierModule`` checkpoint, and the behaviour
every distillation system shares (:class:`FrozenTeacherMixin`)."""

from pathlib import Path

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdlight.errors import KDLightError
from kdlight.lit.base import FastForward
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


class FrozenTeacherMixin:
    """What a LightningModule that distils from ``self.teacher`` shares with the others.

    The teacher is frozen for good: eval mode (also after every ``train()`` call Lightning
    makes around validation), ``requires_grad=False``, and, in the systems, run under
    ``no_grad`` and kept out of the optimizer. Its weights are not written into the
    students' checkpoints: they live in ``teacher_checkpoint``, which ``__init__`` reads
    again when a student checkpoint is restored.
    """

    teacher: nn.Module

    def attach_teacher(
        self,
        teacher: nn.Module | None,
        teacher_checkpoint: str | None,
        teacher_model: str | None,
        num_classes: int,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        """Freeze ``teacher``, or the one restored from ``teacher_checkpoint``."""
        if teacher is None:
            if not teacher_checkpoint:
                raise KDLightError(
                    f"{type(self).__name__} needs a teacher or distill.teacher_checkpoint=PATH"
                )
            teacher = load_teacher(teacher_checkpoint, teacher_model, num_classes)
        self.teacher = freeze(teacher)
        self.fast_teacher = FastForward(self.teacher, compile, channels_last)
        self.teacher_test_acc = MulticlassAccuracy(num_classes, average="micro")

    def train(self, mode: bool = True):
        """Switch the students' mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_record(self) -> dict:
        """The teacher's part of ``metrics.json``: its model, checkpoint and test accuracy."""
        checkpoint = self.hparams.teacher_checkpoint
        return {
            "teacher_model": getattr(self.teacher, "spec", {}).get(
                "name", type(self.teacher).__name__
            ),
            "teacher_checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "teacher_accuracy": 100.0 * float(self.teacher_test_acc.compute()),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep student checkpoints student-sized: the teacher has its own checkpoint."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore with the teacher already read from ``teacher_checkpoint`` in ``__init__``."""
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].update(
            {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        )
