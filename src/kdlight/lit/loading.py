"""A trained model back from a kdlight checkpoint, as a plain ``nn.Module``, without the
config or the Lightning system that trained it (nor a distilled student's teacher):
``load_model``."""

import re
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from kdlight.errors import KDLightError, first_line
from kdlight.models.registry import build_recorded_model
from kdlight.runs.identity import cell_name
from kdlight.trainer.checkpointing import read_checkpoint


def _cell(cell: str | tuple[float, float]) -> str:
    """``T4_alpha0.9``, however the numbers are spelled (``T4.0_alpha0.90``, ``(4, 0.9)``)."""
    if isinstance(cell, tuple):
        return cell_name(*cell)
    match = re.fullmatch(r"T([^_]+)_alpha(.+)", cell)
    try:
        return cell_name(float(match[1]), float(match[2])) if match else cell
    except ValueError:
        return cell


def load_model(
    path: str | Path,
    cell: str | tuple[float, float] | None = None,
    best: bool = False,
    trusted_targets: Iterable[str] = (),
) -> nn.Module:
    """The trained model of a kdlight checkpoint, in eval mode, without its Lightning system.

    It rebuilds the architecture from the checkpoint's ``kdlight.model_spec`` (a registered
    model's name and arguments, or a user model's config with ``_target_``: see
    :func:`kdlight.models.build_model`) and loads its weights. A user model's ``_target_``
    s (nested ones too) must be trusted: named in ``trusted_targets``
    (``["torchvision.models.resnet18"]``) or trusted by the process
    (:func:`kdlight.models.registry.trust_targets`); reading the file runs no code, but
    building what it names would (``os.system`` as well as a model class).

    - a ``ClassifierModule`` checkpoint (a teacher or a student baseline): its model;
    - a ``DistillationModule`` checkpoint: the student, without reading the teacher;
    - a ``DistillationGridModule`` checkpoint: the student of ``cell`` (``"T4_alpha0.9"``,
      spelled either way, or ``(4, 0.9)``), with the weights saved in the checkpoint, or
      with ``best=True`` its weights at the cell's own best validation epoch.

    ::

        student = kdlight.load_model("outputs/distill/small_cnn/.../checkpoints/best.ckpt")
        cell = kdlight.load_model(grid_dir / "checkpoints/last.ckpt", cell="T4_alpha0.9")

    Raises:
        KDLightError: a missing or unreadable file, not a kdlight checkpoint, a grid
            checkpoint without ``cell`` or with one it does not hold (the message lists its
            cells), ``cell`` or ``best`` for a checkpoint of a single model, a model built
            by a ``_target_`` that is not trusted (the message names it).
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    stored = checkpoint.get("kdlight")
    spec = stored.get("model_spec") if isinstance(stored, dict) else None
    if not isinstance(spec, dict) or not spec or "state_dict" not in checkpoint:
        raise KDLightError(
            f"{path} is not a kdlight checkpoint (no kdlight.model_spec): it was not written "
            "by ClassifierModule, DistillationModule or DistillationGridModule"
        )
    cells = stored.get("cells")
    if cells is None:
        if cell is not None or best:
            raise KDLightError(
                f"{path} holds one model, not a grid: load it without cell= or best= (a run's "
                "best weights are its checkpoints/best.ckpt)"
            )
        prefix, state = "model.", checkpoint["state_dict"]
    else:
        listed = ", ".join(cells)
        if cell is None:
            raise KDLightError(
                f"{path} holds a grid of {len(cells)} students: pass cell= one of {listed}"
            )
        name = _cell(cell)
        if name not in cells:
            raise KDLightError(f"{path} has no cell {cell!r}; its cells: {listed}")
        if best:
            record = stored.get("best_students", {}).get(name)
            if record is None:
                raise KDLightError(
                    f"{path} holds no best weights for cell {name}: it was never validated"
                )
            prefix, state = "", record["state_dict"]
        else:
            prefix, state = f"students.{cells.index(name)}.", checkpoint["state_dict"]
    model = build_recorded_model(spec, str(path), trusted_targets)
    weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise KDLightError(
            f"{path} does not match its model_spec {spec}: {first_line(err)}"
        ) from None
    return model.eval()
