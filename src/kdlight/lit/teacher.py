"""The frozen teacher: restored from a ``ClassifierModule`` checkpoint, and the behaviour
every distillation system shares (:class:`FrozenTeacherMixin`)."""

import json
import logging
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kdlight.errors import KDLightError, first_line
from kdlight.lit.base import FastForward
from kdlight.models.published import official_names
from kdlight.models.registry import build_model, build_recorded_model, spec_name, spec_targets
from kdlight.trainer.checkpointing import load_failure

MAKE_A_TEACHER = "train one first: kdlight-train experiment=teacher"

log = logging.getLogger("kdlight")


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
    if not path.is_file():
        raise KDLightError(f"teacher checkpoint not found: {path}; {MAKE_A_TEACHER}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors, wrong format...
        raise KDLightError(
            f"teacher checkpoint {path} cannot be read ({load_failure(err)}): expected a file "
            "written by torch.save (a kdlight or Lightning checkpoint, or a state dict)"
        ) from None
    if not isinstance(checkpoint, dict):
        raise KDLightError(
            f"teacher checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint "
            "or a state dict"
        )
    spec = _recorded_spec(checkpoint, f"teacher checkpoint {path}")
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
        weights = fit_keys(foreign_weights(checkpoint, model), model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise KDLightError(
            f"teacher checkpoint {path} does not fit {spec_name(spec or wanted, model)}: "
            f"{_mismatch(err)}{_classes_hint(weights, model)}"
        ) from None
    return freeze(model)


#: The data choice of each class count the shipped datasets have.
DATA_OF_CLASSES = {10: "data=cifar10", 100: "data=cifar100"}


def _classes_hint(weights: dict, model: nn.Module) -> str:
    """Where the file's classifier predicts another number of classes than the model built
    for the data (a published CIFAR-100 ``ckpt_epoch_240.pth`` on CIFAR-10, say), what to
    add to the command line: the data of the file's classes. Empty otherwise."""
    last = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    key = f"{last[-1]}.weight" if last else None
    found = weights.get(key) if key else None
    if not isinstance(found, torch.Tensor) or found.ndim != 2:
        return ""
    theirs, ours = found.shape[0], model.get_submodule(last[-1]).out_features
    if theirs == ours:
        return ""
    data = DATA_OF_CLASSES.get(theirs, f"data of {theirs} classes")
    return f" (the file's teacher predicts {theirs} classes, this data {ours}: add {data})"


def _recorded_spec(checkpoint: dict, source: str) -> dict | None:
    """The model a checkpoint records (``kdlight.model_spec``), None where it records none."""
    record = checkpoint.get("kdlight")
    spec = record.get("model_spec") if isinstance(record, dict) else None
    if spec is not None and not isinstance(spec, dict):
        raise KDLightError(f"{source} records a model spec that is a {type(spec).__name__}")
    return spec


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
    or the file itself, a state dict."""
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    weights = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    name = getattr(model, "spec", {}).get("name")
    if name is None or set(weights) == set(model.state_dict()):
        return weights
    kdlight_key = {official: key for key, official in official_names(name, model).items()}
    return {kdlight_key.get(k, k): v for k, v in weights.items()}


def fit_keys(weights: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``weights`` with the prefix their keys carry removed (a LightningModule's ``model.``
    or ``net.``, DataParallel's ``module.``), when that makes them the model's keys; as they
    are otherwise (``load_state_dict`` then says what differs)."""
    expected = set(model.state_dict())
    if set(weights) == expected or not expected:
        return weights
    anchor = next(iter(model.state_dict()))
    prefixes = {k[: len(k) - len(anchor)] for k in weights if k.endswith(anchor)}
    for prefix in sorted(prefixes, key=len):
        fitted = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        if set(fitted) == expected:
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


def recorded_teacher_accuracy(
    teacher_checkpoint: str | Path | None, test_set: str | None, model_name: str | None = None
) -> tuple[float, Path] | None:
    """The teacher's own test accuracy, when its run already measured what a distillation
    test would measure again; ``None`` otherwise.

    A teacher checkpoint ``<run>/checkpoints/last.ckpt`` has its run's test result in
    ``<run>/metrics.json``. It is reused (with that file's path) when that test saw the same
    images (its ``test_set`` equals ``test_set``, and neither is ``None``) and the weights of
    this very checkpoint: ``tested_weights`` is ``last``, the model is ``model_name`` when
    given, and the file was written after the checkpoint. Testing a teacher again costs a
    whole pass over the test set (about 30 s for 10,000 images on a CPU) in every
    distillation run.
    """
    if teacher_checkpoint is None or test_set is None:
        return None
    checkpoint = Path(teacher_checkpoint)
    if checkpoint.name != "last.ckpt" or checkpoint.parent.name != "checkpoints":
        return None
    path = checkpoint.parent.parent / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        written_after = path.stat().st_mtime >= checkpoint.stat().st_mtime
    except (OSError, ValueError):  # no such run, or a file that is not JSON
        return None
    if not isinstance(metrics, dict) or not written_after:
        return None
    accuracy = metrics.get("accuracy")
    same = (
        metrics.get("test_set") == test_set
        and metrics.get("tested_weights") == "last"
        and (model_name is None or metrics.get("model") == model_name)
    )
    if not same or not isinstance(accuracy, int | float) or isinstance(accuracy, bool):
        return None
    return float(accuracy), path.resolve()


def built_teacher_model(teacher_model) -> list[str]:
    """``["teacher_model"]`` when it is a built ``nn.Module`` (Hydra instantiates a model
    config with ``_target_``): the systems keep it out of their hyperparameters."""
    return ["teacher_model"] if isinstance(teacher_model, nn.Module) else []


class FrozenTeacherMixin:
    """What a LightningModule that distils from ``self.teacher`` shares with the others.

    The teacher is frozen for good: eval mode (also after every ``train()`` call Lightning
    makes around validation), ``requires_grad=False``, and, in the systems, run under
    ``no_grad`` and kept out of the optimizer. Its weights are not written into the
    students' checkpoints: they live in ``teacher_checkpoint``, which ``__init__`` reads
    again when a student checkpoint is restored.

    Its test accuracy is measured alongside the students' (:meth:`test_teacher`), unless
    its own run already measured it on the same images (:func:`recorded_teacher_accuracy`);
    ``metrics.json`` says which in ``teacher_accuracy_from``.
    """

    teacher: nn.Module
    #: the teacher's test accuracy (percent) and the metrics.json it comes from, if reused
    teacher_result: tuple[float, Path] | None = None

    def attach_teacher(
        self,
        teacher: nn.Module | None,
        teacher_checkpoint: str | None,
        teacher_model: str | Mapping | nn.Module | None,
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

    # ------------------------------------------------------------------ eval-mode notice
    def on_fit_start(self) -> None:
        """Say once that the teacher is frozen, instead of Lightning's warning about modules
        in eval mode at the start of training, which the teacher sets off on purpose.

        Lightning's warning is silenced only for this fit's own check, and only when the
        teacher's modules are all that it would count: a student module left in eval mode
        is still warned about (then with the teacher's modules in the count).
        """
        super().on_fit_start()
        self._restore_warnings()  # left over from a fit that failed before training
        in_eval = [name for name, module in self.named_modules() if not module.training]
        teacher = [name for name in in_eval if name == "teacher" or name.startswith("teacher.")]
        rank_zero_only(log.info)(
            "teacher frozen: %d modules in eval mode, no gradients", len(teacher)
        )
        if in_eval and len(teacher) == len(in_eval):
            self._eval_mode_notice = warnings.catch_warnings()
            self._eval_mode_notice.__enter__()
            warnings.filterwarnings(
                "ignore",
                message=re.escape(f"Found {len(in_eval)} module(s) in eval mode at the start"),
                category=PossibleUserWarning,
            )

    def on_train_start(self) -> None:
        """Lightning's eval-mode check has run (just before this hook): undo the filter."""
        super().on_train_start()
        self._restore_warnings()

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self._restore_warnings()  # a fit that never reached on_train_start

    def _restore_warnings(self) -> None:
        notice = self.__dict__.pop("_eval_mode_notice", None)
        if notice is not None:
            notice.__exit__(None, None, None)

    # ------------------------------------------------------------------ testing
    def on_test_start(self) -> None:
        """Decide whether the teacher's test accuracy has to be measured again."""
        super().on_test_start()
        self.teacher_result = recorded_teacher_accuracy(
            self.hparams.get("teacher_checkpoint"),
            getattr(self.trainer.datamodule, "test_set_id", None),
            getattr(self.teacher, "spec", {}).get("name"),
        )

    def test_teacher(self, images: Tensor, labels: Tensor) -> None:
        """The teacher's accuracy on a test batch (in ``test_step``), unless it is reused."""
        if self.teacher_result is None:
            with torch.no_grad():
                self.teacher_test_acc(self.fast_teacher.eager(images), labels)
            self.log("test/teacher_acc", self.teacher_test_acc)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.teacher_result is not None:
            self.log("test/teacher_acc", self.teacher_result[0] / 100.0, sync_dist=True)

    def teacher_record(self) -> dict:
        """The teacher's part of ``metrics.json``: its model, checkpoint and test accuracy,
        and where that accuracy comes from (its run's ``metrics.json``, or ``measured``)."""
        checkpoint = self.hparams.teacher_checkpoint
        if self.teacher_result is None:
            accuracy, source = 100.0 * float(self.teacher_test_acc.compute()), "measured"
        else:
            accuracy, source = self.teacher_result[0], str(self.teacher_result[1])
        return {
            "teacher_model": getattr(self.teacher, "spec", {}).get(
                "name", type(self.teacher).__name__
            ),
            "teacher_checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "teacher_accuracy": accuracy,
            "teacher_accuracy_from": source,
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
