"""A teacher read back from a file as a frozen ``nn.Module``: a kdlight checkpoint, which
records its model, or a file that does not (another Lightning checkpoint, a state dict, a
published RepDistiller/mdistiller teacher), its keys mapped to the model's."""

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import Tensor, nn

from kdlight.errors import KDLightError, first_line
from kdlight.models.published import official_names
from kdlight.models.registry import build_model, build_recorded_model, spec_name, spec_targets
from kdlight.trainer.checkpointing import read_checkpoint

TEACHER_FILES = (
    "expected a file written by torch.save (a kdlight or Lightning checkpoint, or a state "
    "dict); to train one: kdlight-train experiment=teacher"
)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher only ever runs inference."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(
    path: str | Path,
    model_name: str | Mapping | nn.Module | None = None,
    num_classes: int | None = None,
    trusted_targets: Iterable[str] = (),
) -> nn.Module:
    """Build a teacher, load its weights from ``path`` and freeze it.

    Any of these files:

    - a kdlight checkpoint (``experiment=teacher``, or any kdlight system's): it records its
      model, which is rebuilt (``model_name``, if given, must name the same one; a built
      ``model_name`` is used as it is). A recorded model is built only when it is a
      registered kdlight model or every target (``_target_``) it names is the user's: in
      ``model_name``, in ``trusted_targets``, or trusted by the process
      (:func:`kdlight.models.registry.trust_targets`). The file is read without running
      code; building a target it names, such as ``builtins.open``, would run it;
    - with ``model_name``, a file that does not record its model: a Lightning checkpoint of
      another LightningModule (``state_dict``, its keys' prefix such as ``model.`` or
      ``net.`` found and removed), a plain state dict, or a teacher as RepDistiller and
      mdistiller publish them (``ckpt_epoch_240.pth``: the weights under ``model``, keys
      mapped to kdlight's module names where they differ).

    Args:
        path: the file.
        model_name: the architecture: a registered name (``create_model``), a model config
            with ``_target_`` (any ``nn.Module`` class or function and its arguments, e.g.
            ``{"_target_": "torchvision.models.resnet18", "num_classes": 10}``), or a built
            ``nn.Module`` whose weights the file holds.
        num_classes: if given, the teacher must predict this many classes.
        trusted_targets: dotted names (``"torchvision.models.resnet18"``) that the file's
            recorded model may be built with, besides those in ``model_name``.

    Raises:
        KDLightError: one line: a missing or unreadable file, a file that does not fit,
            saying what was expected and what was found, or a recorded model built by a
            ``_target_`` that is not trusted, naming it.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, what="teacher checkpoint", remedy=TEACHER_FILES)
    record = checkpoint.get("kdlight")
    spec = record.get("model_spec") if isinstance(record, dict) else None  # the model it records
    if spec is not None and not isinstance(spec, dict):
        raise KDLightError(
            f"teacher checkpoint {path} records a model spec that is a {type(spec).__name__}"
        )
    wanted = _as_spec(model_name, num_classes)
    predicts = (spec or wanted or {}).get("num_classes")
    if num_classes is not None and predicts is not None and predicts != num_classes:
        raise KDLightError(
            f"teacher checkpoint {path} predicts {predicts} classes, the student {num_classes}"
        )
    if spec:
        named = wanted is not None and ("name" in wanted or not isinstance(model_name, nn.Module))
        if named and spec_name(spec) != spec_name(wanted):
            raise KDLightError(
                f"teacher checkpoint {path} holds a {spec_name(spec)}, not a {spec_name(wanted)} "
                f"(set distill.teacher_model={spec_name(spec)} or point "
                f"distill.teacher_checkpoint at a {spec_name(wanted)})"
            )
        if isinstance(model_name, nn.Module):  # the user's own: nothing is built from the file
            model = model_name
        else:
            trusted = [*trusted_targets, *spec_targets(wanted or {})]
            model = build_recorded_model(spec, f"teacher checkpoint {path}", trusted)
        weights = {
            k.removeprefix("model."): v
            for k, v in (checkpoint.get("state_dict") or {}).items()
            if k.startswith("model.")
        }
    else:
        if wanted is None:
            found = "a Lightning checkpoint" if "state_dict" in checkpoint else "a state dict"
            raise KDLightError(
                f"teacher checkpoint {path} is {found} that does not record its model: name "
                "the architecture with distill.teacher_model=NAME (or a model config with "
                "_target_)"
            )
        model = model_name if isinstance(model_name, nn.Module) else build_model(wanted)
        weights = foreign_weights(checkpoint, model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise KDLightError(
            f"teacher checkpoint {path} does not fit {spec_name(spec or wanted, model)}: "
            f"{_mismatch(err)}{_classes_hint(weights, model)}"
        ) from None
    return freeze(model)


def _classes_hint(weights: dict, model: nn.Module) -> str:
    """Where the file's classifier predicts another number of classes than the model built
    for the data (a published CIFAR-100 ``ckpt_epoch_240.pth`` on CIFAR-10, say), what to
    add to the command line: the data of the file's classes. Empty otherwise."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    name, classifier = linears[-1] if linears else ("", None)
    found = weights.get(f"{name}.weight")
    if classifier is None or not isinstance(found, Tensor) or found.ndim != 2:
        return ""
    theirs, ours = found.shape[0], classifier.out_features
    if theirs == ours:
        return ""
    # the data choice of each class count the shipped datasets have
    data = {10: "data=cifar10", 100: "data=cifar100"}.get(theirs, f"data of {theirs} classes")
    return f" (the file's teacher predicts {theirs} classes, this data {ours}: add {data})"


def _as_spec(model: str | Mapping | nn.Module | None, num_classes: int | None) -> dict | None:
    """A registered name or a model config as a :func:`build_model` spec."""
    if model is None:
        return None
    if isinstance(model, nn.Module):  # built already: its spec, if it has one
        return dict(getattr(model, "spec", None) or {"_target_": type(model).__qualname__})
    if isinstance(model, str):
        return {"name": model} | ({"num_classes": num_classes} if num_classes else {})
    return dict(model)


def foreign_weights(checkpoint: dict, model: nn.Module) -> dict[str, Tensor]:
    """The weights of a file that kdlight did not write: a Lightning checkpoint's
    ``state_dict``, a published teacher's ``model`` (its keys in kdlight's names where a
    registered model names them otherwise: :func:`kdlight.models.published.official_names`),
    or the file itself, a state dict. The prefix their keys carry (a LightningModule's
    ``model.`` or ``net.``, DataParallel's ``module.``) is removed when that makes them the
    model's keys; otherwise they are kept as they are (``load_state_dict`` then says what
    differs)."""
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    weights = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    own = model.state_dict()
    name = getattr(model, "spec", {}).get("name")
    if set(weights) == set(own) or not own:
        return weights
    if name is not None:
        kdlight_key = {official: key for key, official in official_names(name, model).items()}
        weights = {kdlight_key.get(k, k): v for k, v in weights.items()}
    anchor = next(iter(own))
    prefixes = {k[: len(k) - len(anchor)] for k in weights if k.endswith(anchor)}
    for prefix in sorted(prefixes, key=len):
        fitted = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        if set(fitted) == set(own):
            return fitted
    return weights


def _mismatch(err: RuntimeError) -> str:
    """``load_state_dict``'s complaint in one line: the first missing and unexpected keys
    and the first shape that differs."""
    text = str(err)
    parts = []
    for label, pattern in (
        ("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*$"),
        ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$"),
    ):
        match = re.search(pattern, text, flags=re.MULTILINE)
        if match:
            keys = [k.strip().strip('"') for k in match[1].split(",")]
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{label} {', '.join(keys[:3])}{more}")
    shape = re.search(
        r"size mismatch for (.*?): copying a param with shape (.*?) from "
        r"checkpoint, the shape in current model is (torch\.Size\(\[.*?\]\))",
        text,
    )
    if shape:
        parts.append(f"{shape[1]} is {shape[2]} in the file, {shape[3]} in the model")
    return "; ".join(parts) or first_line(err)
