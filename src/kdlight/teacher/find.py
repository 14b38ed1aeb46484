"""Which teacher a distillation run reads: the finished teacher run of its model under
``paths.root`` (:func:`find_teacher`), or the checkpoint the user names, and the command that
trains a missing one. What identifies the teacher (its run folder, or the file's content) is
part of the student's run identity (:mod:`kdlight.runs.identity`)."""

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdlight import config_dir
from kdlight.errors import KDLightError
from kdlight.models.registry import trust_targets
from kdlight.runs.identity import file_identity, is_distillation


@dataclass(frozen=True)
class Teacher:
    """The checkpoint a distillation run reads, and what identifies it."""

    checkpoint: Path
    identity: str  # "<teacher run folder>" or "file:<content hash>"
    note: str  # said in the log: which teacher, and why


def _read_metrics(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _classes_of(metrics: dict | None) -> int | None:
    """The number of classes a finished run's ``metrics.json`` records (its per-class
    accuracies), None if it records none."""
    per_class = (metrics or {}).get("per_class_accuracy")
    return len(per_class) if isinstance(per_class, dict) and per_class else None


def find_teacher(
    root: str | Path, model: str, num_classes: int | None = None, make: str | None = None
) -> Teacher:
    """The finished teacher run of ``model`` under ``<root>/teacher/<model>/``.

    Finished means a readable ``metrics.json`` that is not a debug run's, and a
    ``checkpoints/last.ckpt`` (the final weights); with ``num_classes``, one that predicts
    that many classes (a CIFAR-100 student never gets a CIFAR-10 teacher). With several,
    the most recently finished one is used and the log names it and the others. With none,
    one line says why: no teacher run at all, or only unfinished ones (which are used only
    when named with ``distill.teacher_checkpoint``). ``make`` is the command that trains the
    teacher, said in that line (default: ``experiment=teacher model=<model>``, the reference
    study's; :func:`resolve_teacher` names a zoo pair's).
    """
    make = make or f"kdlight-train experiment=teacher model={model}"
    folder = Path(root) / "teacher" / model
    runs = sorted(
        last.parent.parent
        for last in folder.glob("seed*/checkpoints/last.ckpt")
        if not last.parent.parent.name.endswith("-debug")
    )
    metrics = {run: _read_metrics(run / "metrics.json") for run in runs}
    finished = [run for run in runs if metrics[run] is not None]
    if num_classes is not None:
        other = [r for r in finished if _classes_of(metrics[r]) not in (None, num_classes)]
        finished = [r for r in finished if r not in other]
        if other and not finished:
            raise KDLightError(
                f"no teacher of model {model} for {num_classes} classes under {folder} (the "
                f"finished ones predict {_classes_of(metrics[other[0]])}): "
                f"train it first ({make} with this data)"
            )
    if not finished:
        if runs:
            listed = ", ".join(str(r) for r in runs)
            raise KDLightError(
                f"no finished teacher of model {model} under {folder} (unfinished: {listed}); "
                f"relaunch its command to finish it, or name a checkpoint with "
                f"distill.teacher_checkpoint=PATH to use it as it is"
            )
        raise KDLightError(
            f"no teacher of model {model} under {folder}: train it first ({make}, same paths.root)"
        )
    finished.sort(key=lambda run: (run / "metrics.json").stat().st_mtime)
    chosen = finished[-1]
    others = ", ".join(map(str, finished[:-1]))
    also = f"; the newest of {len(finished)}: also {others}" if others else ""
    note = f"teacher: {chosen} (the finished {model} teacher under {Path(root)}{also})"
    return Teacher(chosen / "checkpoints" / "last.ckpt", f"{model}/{chosen.name}", note)


def resolve_teacher(cfg: DictConfig) -> Teacher | None:
    """The teacher of a distillation ``cfg`` (None for other runs): ``distill.teacher_checkpoint``
    when the user names one, else :func:`find_teacher` under ``paths.root``.

    The targets in ``cfg``'s ``trusted_targets`` become the ones this process trusts
    in a model spec read from a file (:func:`kdlight.models.registry.trust_targets`), for
    the teacher that the run then loads (and for every run: a multirun's next job sets its
    own)."""
    trusted = cfg.get("trusted_targets")
    trust_targets(OmegaConf.to_container(trusted) if OmegaConf.is_config(trusted) else trusted)
    if not is_distillation(cfg):
        return None
    named = OmegaConf.select(cfg, "distill.teacher_checkpoint", default=None)
    if named:
        path = Path(str(named))
        if not path.is_file():
            raise KDLightError(f"distill.teacher_checkpoint={named}: no such file")
        return Teacher(path, file_identity(path), f"teacher: {path} (distill.teacher_checkpoint)")
    model = cfg.distill.teacher_model
    if not isinstance(model, str):  # a model config with _target_: not one kdlight names
        raise KDLightError(
            "distill.teacher_model is a model config: name its weights with "
            "distill.teacher_checkpoint=PATH (a state dict or a Lightning checkpoint)"
        )
    classes = OmegaConf.select(cfg, "num_classes", default=None)
    return find_teacher(cfg.paths.root, model, classes, teacher_command(cfg, model))


def shipped_pair(teacher: str, student: str) -> str | None:
    """The zoo pair ``<teacher>_<student>`` when ``conf/pair/`` ships it, else None."""
    pair = f"{teacher}_{student}"
    return pair if (config_dir() / "pair" / f"{pair}.yaml").is_file() else None


def teacher_command(cfg: DictConfig, model: str) -> str:
    """The command that trains the teacher ``model`` a distillation ``cfg`` looks for: a
    CIFAR-100 zoo pair's with ``experiment=zoo_teacher pair=<pair>`` (the pair of the
    teacher and the student: the zoo's recipe and data), another CIFAR-100 teacher with
    ``experiment=zoo_teacher model=<model>``, else the reference ``experiment=teacher``."""
    if OmegaConf.select(cfg, "num_classes", default=None) != 100:
        return f"kdlight-train experiment=teacher model={model}"
    pair = shipped_pair(model, str(OmegaConf.select(cfg, "model.name", default=None)))
    if pair is not None:
        return f"kdlight-train experiment=zoo_teacher pair={pair}"
    return f"kdlight-train experiment=zoo_teacher model={model} with the same data and recipe"
