"""Every setting's type and range, declared once (:func:`rules`), and the checks that read it,
each bad setting told in one line::

    error: optimizer.lr=-1 is not allowed: a finite number > 0

``kdlight-train`` calls :func:`validate_settings` before any work, so a bad setting is told
before any hardware error; kdlight's own constructors (the data modules, the callbacks, the
distillation systems) call the same checks (:func:`check`, :func:`check_data`,
:func:`check_one_process`), so a bad value given from Python stops with the same line. The
command line is checked earlier, before Hydra runs, by :mod:`kdlight.config.preflight`.
"""

import contextlib
import importlib.util
import inspect
import math
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hydra._internal.utils import _locate  # hydra.utils.get_object, without logging errors
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from kdlight import config_dir
from kdlight.errors import KDLightError, first_line


# ---------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """What a setting allows: ``allowed`` says it in words, ``accepts`` checks a value."""

    allowed: str
    accepts: Callable[[Any], bool]

    def __or__(self, other: "Rule") -> "Rule":
        return Rule(
            f"{self.allowed} or {other.allowed}", lambda v: self.accepts(v) or other.accepts(v)
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int | None = None) -> Rule:
    """An integer (not a bool, not a float) from ``low`` up to ``high``."""
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    return Rule(allowed, lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def number(low: float, high: float | None = None, above: bool = False, below: bool = False) -> Rule:
    """A finite number (an int or a float, not a bool) from ``low`` (excluded when ``above``)
    up to ``high`` (excluded when ``below``)."""
    if high is None:
        allowed = f"a finite number {'>' if above else '>='} {low:g}"
    else:
        allowed = f"a number in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"

    top = math.inf if high is None else high

    def accepts(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > low if above else v >= low) and (v < top if below else v <= top)

    return Rule(allowed, accepts)


def one_of(*choices) -> Rule:
    """One of ``choices``, of the same type (the text ``"32"`` is not the number 32)."""
    shown = dict.fromkeys(show(c) for c in choices)  # 32 and "32" are said once
    return Rule(
        f"one of {', '.join(shown)}", lambda v: any(type(v) is type(c) and v == c for c in choices)
    )


def list_of(item: Rule, allowed: str, length: int | None = None) -> Rule:
    """A non-empty list or tuple (of ``length`` items) whose every item is ``item``."""

    def accepts(v) -> bool:
        listed = isinstance(v, list | tuple) and len(v) > 0 and len(v) == (length or len(v))
        return listed and all(item.accepts(x) for x in v)

    return Rule(allowed, accepts)


def _devices(v) -> bool:
    """Lightning's ``devices``: a count, -1, ``auto``, ``"0,1"`` or ``[0, 1]``."""
    if isinstance(v, str):
        return re.fullmatch(r"auto|-1|\d+|(\d+,)+\d*", v.replace(" ", "")) is not None
    if isinstance(v, list):
        return bool(v) and all(_is_int(x) and x >= 0 for x in v) and len(set(v)) == len(v)
    return _is_int(v) and (v >= 1 or v == -1)


NULL = Rule("null", lambda v: v is None)
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a text", lambda v: isinstance(v, str))
NAME = Rule("a non-empty text", lambda v: isinstance(v, str) and bool(v.strip()))
PATH = Rule("a path", lambda v: isinstance(v, os.PathLike) or NAME.accepts(v))
POSITIVE = number(0, above=True)
FRACTION = number(0, 1)
SEED = integer(0, 2**32 - 1)  # what Lightning's seed_everything (numpy's) accepts
BATCHES = Rule(  # Lightning reads a float as a fraction of the batches, an int as a count
    "a fraction in (0, 1] or a number of batches >= 1",
    lambda v: (isinstance(v, float) and 0 < v <= 1) or (_is_int(v) and v >= 1),
)
DEVICES = Rule("a number of devices >= 1, -1 (all), auto, or a list of device indices", _devices)
PLUGINS = Rule(  # each instantiated by Hydra, or named as Lightning names its own
    "a list of plugins (each a _target_ or a name)",
    lambda v: (
        isinstance(v, list)
        and all(isinstance(x, str) or (isinstance(x, dict) and "_target_" in x) for x in v)
    ),
)
A_GROUP = Rule("a group of settings, not a value", lambda v: False)
TAPS = Rule(
    "null (the models' default taps) or a list of module names",
    lambda v: v is None or (isinstance(v, list) and bool(v) and all(NAME.accepts(x) for x in v)),
)
GRID = " (a list of them for experiment=distill_grid)"
TEMPERATURE = Rule(POSITIVE.allowed + GRID, (POSITIVE | list_of(POSITIVE, "")).accepts)
ALPHA = Rule(FRACTION.allowed + GRID, (FRACTION | list_of(FRACTION, "")).accepts)
#: The parts of a config in the order they are checked: settings that others interpolate
#: (seed, num_classes, trainer.max_epochs) before those others, so the message names them.
SECTIONS = ("data", "model", "distill", "distiller", "module", "optimizer", "trainer")
SECTIONS += ("scheduler", "callbacks", "logger", "paths")


def choices(group: str) -> list[str]:
    """The choices of the config group ``group`` that have a file (``conf/<group>/*.yaml``)."""
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


@cache
def rules() -> dict[str, Rule]:
    """Every setting's rule by its dotted key, the one place a setting's type and range are
    declared (written by section, "" the top level); ``callbacks.*`` and ``logger.*`` stand
    for any entry of those groups. A key without a rule is not checked."""
    from lightning.fabric.connector import _PRECISION_INPUT
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    from kdlight.data.datamodule import Source
    from kdlight.models import list_models
    from kdlight.models.registry import is_dotted_name

    models = one_of(*list_models())
    targets = Rule(
        "a list of dotted names, such as [torchvision.models.resnet18]",
        lambda v: isinstance(v, list) and all(is_dotted_name(x) for x in v),
    )
    methods = ", ".join(choices("distiller"))
    method = Rule(
        f"a method of conf/distiller/ (distiller={methods})", lambda v: isinstance(v, Mapping)
    )
    precisions = [p for kind in typing.get_args(_PRECISION_INPUT) for p in typing.get_args(kind)]
    accelerators = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
    # the distillation systems take these distill.* values as their own arguments (module.*)
    passed = {"teacher_checkpoint": NULL | PATH, "temperature": TEMPERATURE, "alpha": ALPHA}
    passed |= {"teacher_cache": BOOL}

    def switches(*keys: str) -> dict[str, Rule]:
        return dict.fromkeys(keys, BOOL)

    sections = {
        "": {
            "name": NAME, "seed": SEED, "num_classes": integer(2), "train": BOOL, "test": BOOL,
            "test_ckpt": one_of("best", "last"), "ckpt_path": NULL | PATH,
            "trusted_targets": targets, "scheduler": NULL, "callbacks": NULL, "logger": NULL,
            "callbacks.*": NULL, "logger.*": NULL,  # callbacks.progress_bar=null leaves it out
            "methods.*": method,  # a method grid's cells, each as distiller=
        },
        "data": {
            "source": one_of(*typing.get_args(Source)), "archive_path": NULL | PATH,
            "data_dir": PATH, "val_size": integer(0), "train_subset": NULL | integer(1),
            "eval_subset": NULL | integer(1), "batch_size": integer(1),
            "eval_batch_size": integer(1), "num_workers": integer(0), "seed": SEED,
            "synthetic_train_size": integer(1), "synthetic_test_size": integer(1),
            "root": NULL | PATH, "num_classes": NULL | integer(2),
            "mean": list_of(FRACTION, "three numbers in [0, 1]", 3) | NULL,
            "std": list_of(POSITIVE, "three numbers > 0", 3) | NULL,
            **switches("download", "augment", "on_device", "drop_last"),
        },
        "model": {"name": models, "num_classes": integer(2), "width": POSITIVE},
        "distill": {"teacher_model": models, **passed},
        "module": {
            "num_classes": integer(2), "teacher_model": NULL | models, **passed,
            "distiller": NULL | method, "methods": NULL, **switches("compile", "channels_last"),
        },
        "distiller": {
            "temperature": TEMPERATURE,
            "alpha": number(0) | list_of(number(0), "a list of numbers >= 0"),
            "beta": number(0), "ce_weight": number(0), "warmup_epochs": integer(0),
            "gamma": number(0),  # DIST's intra-class weight
            "weight": number(0), "stage": NULL | Rule("an integer", _is_int),
            "hint_layer": integer(1), "p": POSITIVE, "init_pred_var": POSITIVE,
            "distance_weight": number(0), "angle_weight": number(0), "dim": integer(1),
            "num_negatives": integer(1), "nce_temperature": POSITIVE, "momentum": FRACTION,
            "student_taps": TAPS, "teacher_taps": TAPS,
            "connector_kernel_size": integer(1),  # OFD's connector convolution
            "singular_vectors": integer(1),  # KDSVD's k, the teacher's vectors compared
            "pairing": one_of("deepest", "shallowest"), **switches("standardize", "replacement"),
            "exponent": POSITIVE,  # TTM's and WTTM's power of the teacher's probabilities
            # CTKD's learned temperature's range and the ramp of its reversed gradient
            "min_temperature": number(0), "temperature_range": POSITIVE, "reversal": number(0),
            "ramp_epochs": integer(0),
            # MLKD's temperatures, and those at which its strong-view KD reads the strong view
            "temperatures": list_of(POSITIVE, "a list of numbers > 0"),
            "strong_temperatures": list_of(POSITIVE, "a list of numbers > 0"),
        },
        "optimizer": {
            "lr": POSITIVE, "momentum": number(0, 1, below=True),
            "dampening": number(0, 1, below=True), "weight_decay": number(0),
            "betas": list_of(number(0, 1, below=True), "two numbers in [0, 1)", 2),
            "eps": POSITIVE, "foreach": NULL | BOOL, "fused": NULL | BOOL,
            **switches("nesterov", "amsgrad", "maximize", "capturable", "differentiable"),
        },
        "trainer": {
            "accelerator": one_of(*accelerators), "devices": DEVICES, "num_nodes": integer(1),
            "precision": one_of(*precisions),
            "strategy": one_of("auto", *StrategyRegistry.available_strategies()),
            "max_epochs": integer(1), "min_epochs": NULL | integer(0),
            "max_steps": one_of(-1) | integer(1), "min_steps": NULL | integer(0),
            "check_val_every_n_epoch": NULL | integer(1), "val_check_interval": NULL | BATCHES,
            "log_every_n_steps": integer(1), "overfit_batches": FRACTION | integer(0),
            "fast_dev_run": BOOL | integer(0), "deterministic": NULL | BOOL | one_of("warn"),
            "benchmark": NULL | BOOL, "gradient_clip_val": NULL | POSITIVE,
            "gradient_clip_algorithm": NULL | one_of("norm", "value"),
            "accumulate_grad_batches": integer(1), "num_sanity_val_steps": NULL | integer(-1),
            "reload_dataloaders_every_n_epochs": integer(0), "default_root_dir": NULL | PATH,
            "max_time": NULL | TEXT, "plugins": NULL | PLUGINS,
            **{f"limit_{s}_batches": NULL | BATCHES for s in ("train", "val", "test", "predict")},
            **switches("enable_progress_bar", "enable_checkpointing", "enable_model_summary",
                       "sync_batchnorm", "inference_mode", "use_distributed_sampler",
                       "detect_anomaly", "barebones"),
        },
        "scheduler": {
            "milestones": list_of(integer(1), "a list of epochs >= 1"),
            "gamma": number(0, 1, above=True), "T_max": integer(1), "eta_min": number(0),
            "step_size": integer(1), "last_epoch": integer(-1),
        },
        "callbacks.*": {
            "dirpath": NULL | PATH, "filename": NULL | PATH, "monitor": NULL | TEXT,
            "mode": one_of("min", "max"), "save_last": NULL | BOOL | one_of("link"),
            "save_top_k": integer(-1), "every_n_epochs": NULL | integer(0),
            "every_n_train_steps": NULL | integer(0), "save_on_train_epoch_end": NULL | BOOL,
            "logging_interval": NULL | one_of("epoch", "step"), "refresh_rate": integer(0),
            "process_position": integer(0), "check_every_n_steps": integer(1),
            **switches("auto_insert_metric_name", "save_weights_only", "verbose", "log_momentum",
                       "log_weight_decay", "leave", "enable_version_counter"),
        },
        "callbacks.last_checkpoint": {"every_n_train_steps": integer(0)},  # 0: epoch ends only
        "logger.*": {
            "save_dir": PATH, "name": NULL | TEXT, "version": NULL | TEXT | integer(0),
            "prefix": TEXT, "sub_dir": NULL | PATH, "flush_logs_every_n_steps": integer(1),
            "tracking_uri": NULL | TEXT, "experiment_name": NAME, "run_name": NULL | TEXT,
            "artifact_location": NULL | PATH, "project": NULL | NAME, "group": NULL | TEXT,
            **switches("log_graph", "default_hp_metric", "offline"),
        },
        "paths": {"root": PATH, "data_dir": PATH, "output_dir": PATH},
    }  # fmt: skip
    table = {f"{s}.{k}".lstrip("."): r for s, rs in sections.items() for k, r in rs.items()}
    return dict.fromkeys(SECTIONS, A_GROUP) | table  # a group's own rule wins: scheduler=null


def rule_for(key: str) -> Rule | None:
    """The rule of the dotted ``key``, if kdlight has one."""
    parts = key.split(".")
    if parts[:2] == ["module", "methods"] and len(parts) > 2:  # ${methods}, passed to the grid
        parts = parts[1:]
    any_entry = len(parts) > 1 and parts[0] in ("callbacks", "logger", "methods")
    if parts[0] == "methods" and len(parts) > 2:  # a method grid's cell: as distiller=
        parts = ["distiller", *parts[2:]]
    elif any_entry and ".".join(parts) not in rules():
        parts[1] = "*"
    return rules().get(".".join(parts))


# ------------------------------------------------------------------------------- checking
def show(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return "''" if value == "" else str(value)


def not_allowed(key: str, value, allowed: str) -> KDLightError:
    """The error for ``key=value``, which breaks the rule that says ``allowed``."""
    return KDLightError(f"{key}={show(value)} is not allowed: {allowed}")


def check(section: str, **values) -> None:
    """Raise the error of the first of ``values`` that breaks its rule, each named
    ``<section>.<name>`` as on the command line: ``check("data", batch_size=0)`` raises
    ``data.batch_size=0 is not allowed: an integer >= 1``. A setting without a rule passes."""
    for name, value in values.items():
        key = f"{section}.{name}" if section else name
        rule = rule_for(key)
        if rule is not None and not rule.accepts(value):
            raise not_allowed(key, value, rule.allowed)


def _settings(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(dotted key, resolved value)`` below ``node``; lists are values. Hydra's own
    keys (``_target_``, ``_partial_``, the ``hydra`` node) are not settings."""
    for key in node:
        path = f"{prefix}{key}"
        if str(key).startswith("_") or path == "hydra":
            continue
        try:
            value = node[key]
        except MissingMandatoryValue:
            raise KDLightError(f"{path} has no value: set {path}=VALUE") from None
        except InterpolationResolutionError as err:
            if "HydraConfig was not set" in str(err):
                continue  # ${hydra:...} outside a Hydra run: nothing to check
            raise KDLightError(f"{path} cannot be resolved: {first_line(err)}") from None
        if isinstance(value, DictConfig):
            yield from _settings(value, f"{path}.")
        elif isinstance(value, ListConfig):
            yield path, OmegaConf.to_container(value, resolve=True)
        else:
            yield path, value


def validate_settings(cfg: DictConfig) -> None:
    """Raise a one-line :class:`KDLightError` for the first setting of ``cfg`` whose type or
    range is wrong or that does not fit the others (``num_classes`` and the data, a grid
    with a cell twice, a key its ``_target_`` does not take). Only values are checked (no
    data, model or Trainer is made): files, data and hardware are checked where used."""
    by_section: dict[str, list] = {}
    for key, value in _settings(cfg):
        by_section.setdefault(key.split(".")[0] if "." in key else "", []).append((key, value))
    for section in ["", *SECTIONS, *(s for s in by_section if s and s not in SECTIONS)]:
        check("", **dict(by_section.get(section, [])))
        if cross_check := _SECTION_CHECKS.get(section):
            cross_check(cfg)
    _check_targets(cfg)
    _check_model_width(cfg)  # builds the model's layers: once its arguments are known good


def value_of(cfg: DictConfig, key: str):
    """The value of the dotted ``key`` (None when ``cfg`` lacks it), lists and groups as plain
    ones."""
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def located(target):
    """What the dotted name ``target`` names, or None where it cannot be imported (the
    settings' check of ``_target_`` says so in one line)."""
    try:
        return _locate(str(target))
    except (ImportError, AttributeError, ValueError):
        return None


def _check_classes(cfg: DictConfig) -> None:
    classes = getattr(located(value_of(cfg, "data._target_")), "num_classes", None)
    expected = value_of(cfg, "num_classes")
    if None not in (classes, expected) and expected != classes:
        raise not_allowed("num_classes", expected, f"{classes} (the data has {classes} classes)")
    for key in ("model.num_classes", "module.num_classes", "data.num_classes"):
        if value_of(cfg, key) not in (None, expected):
            raise not_allowed(key, value_of(cfg, key), f"num_classes ({expected})")


def check_data(data: Mapping, dataset: str | None = None) -> None:
    """The ``data`` settings that must fit each other: a path with ``source=archive`` (an
    archive of ``dataset``, such as CIFAR-100), fewer validation images than synthetic
    training images, ``mean`` and ``std`` both or neither."""
    source, size, val_size = (data.get(k) for k in ("source", "synthetic_train_size", "val_size"))
    if source == "archive" and not data.get("archive_path"):
        of = f" (a {dataset} image-folder .tar.gz)" if dataset else ""
        raise not_allowed("data.archive_path", None, f"a path with data.source=archive{of}")
    if source == "synthetic" and size is not None and (val_size or 0) >= size:
        raise not_allowed("data.val_size", val_size, f"fewer than data.synthetic_train_size={size}")
    if (data.get("mean") is None) != (data.get("std") is None):
        raise KDLightError(
            "data.mean and data.std go together: give both, or neither to compute them "
            "from the training images"
        )


def _check_data(cfg: DictConfig) -> None:
    keys = ("source", "archive_path", "val_size", "synthetic_train_size", "mean", "std")
    spec = getattr(located(value_of(cfg, "data._target_")), "dataset", None)  # CIFAR's
    check_data({key: value_of(cfg, f"data.{key}") for key in keys}, spec and spec.name)


def _check_distillation(cfg: DictConfig) -> None:
    """A list of values only for the fused grid, and each cell once: 2 and 2.0 are one
    cell, ``T2`` (its folder and metrics, see :func:`kdlight.runs.identity.cell_name`)."""
    grid = str(value_of(cfg, "module._target_")).endswith("GridModule")
    for key, prefix in (("distill.temperature", "T"), ("distill.alpha", "alpha")):
        values = value_of(cfg, key)
        if not isinstance(values, list):
            continue
        if not grid:
            raise not_allowed(key, values, "one value (a list is a grid: experiment=distill_grid)")
        cells = [f"{float(v):g}" for v in values]
        for i, cell in enumerate(cells):
            if cell in cells[:i]:
                twice = f"{show(values[cells.index(cell)])} and {show(values[i])}"
                once = f"each value once ({twice} are one cell, {prefix}{cell})"
                raise not_allowed(key, values, once)


def check_one_process(method, devices, num_nodes) -> None:
    """``method`` (a distillation method, or its class) that needs each image's index
    without ``supports_ddp`` keeps a memory bank per process (CRD): it is trained by one
    process, on ``trainer.devices`` and ``trainer.num_nodes`` of 1."""
    if not getattr(method, "needs_index", False) or getattr(method, "supports_ddp", False):
        return
    several = (_is_int(devices) and devices > 1) or (isinstance(devices, list) and len(devices) > 1)
    if several or (_is_int(num_nodes) and num_nodes > 1):
        key, value = ("trainer.devices", devices) if several else ("trainer.num_nodes", num_nodes)
        kind = method if isinstance(method, type) else type(method)
        name = getattr(method, "name", None) or kind.__name__.lower()
        raise not_allowed(
            key, value, f"1 with distiller={name} (its memory banks are one process's, not shared)"
        )


def _check_cpu_settings(cfg: DictConfig) -> None:
    """Settings that name GPUs do not fit a run on the CPU (``trainer.accelerator=cpu``, or
    ``auto`` where Lightning finds no TPU, Apple GPU or GPU), where Lightning would stop with
    a traceback when the Trainer is made: ``trainer.devices=-1`` (every GPU) or a list of
    device indices, and a strategy made for GPUs or TPUs (FSDP, XLA)."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator, XLAAccelerator
    from lightning.pytorch.strategies import (
        FSDPStrategy,
        SingleDeviceXLAStrategy,
        StrategyRegistry,
        XLAStrategy,
    )

    accelerator = value_of(cfg, "trainer.accelerator")
    if accelerator == "auto":  # Lightning's own choice, in its order
        if any(a.is_available() for a in (XLAAccelerator, MPSAccelerator, CUDAAccelerator)):
            return
    elif accelerator != "cpu":
        return
    where = "with trainer.accelerator=cpu" if accelerator == "cpu" else "here (no GPU)"
    devices = value_of(cfg, "trainer.devices")
    if isinstance(devices, str) and devices.isdigit():  # Lightning's CPU processes: "2" is 2
        devices = int(devices)
    if devices is not None and not (devices == "auto" or integer(1).accepts(devices)):
        raise not_allowed(
            "trainer.devices",
            devices,
            f"a number of processes >= 1 or auto {where} (-1 and lists of indices pick GPUs)",
        )
    strategy = value_of(cfg, "trainer.strategy")
    if strategy in StrategyRegistry.available_strategies():
        needs = {FSDPStrategy: "a GPU", XLAStrategy: "a TPU", SingleDeviceXLAStrategy: "a TPU"}
        made = StrategyRegistry[strategy]["strategy"]
        for kind, device in needs.items():
            if issubclass(made, kind):
                raise KDLightError(
                    f"trainer.strategy={strategy} needs {device}, and the run is on the CPU "
                    f"{where}: leave the strategy out (auto), or ddp for several processes"
                )


def _check_trainer(cfg: DictConfig) -> None:
    targets = [value_of(cfg, "distiller._target_")]
    targets += [m.get("_target_") for m in (value_of(cfg, "methods") or {}).values()]
    devices, nodes = value_of(cfg, "trainer.devices"), value_of(cfg, "trainer.num_nodes")
    for method in filter(None, map(located, targets)):
        check_one_process(method, devices, nodes)
    _check_cpu_settings(cfg)


def _check_model_width(cfg: DictConfig) -> None:
    """``model.width`` gives each of the registered model's layers at least one channel; the
    model is built on the meta device (its layers, no weights' memory) to know."""
    import torch

    from kdlight.models import create_model
    from kdlight.models.width import TooNarrow

    spec = value_of(cfg, "model")
    registered = isinstance(spec, dict) and spec.get("_target_") == "kdlight.models.create_model"
    if not registered or "width" not in spec:
        return
    arguments = {key: value for key, value in spec.items() if not key.startswith("_")}
    try:
        with torch.device("meta"):
            create_model(**arguments)
    except TooNarrow as err:
        raise not_allowed("model.width", spec["width"], err.allowed) from None


def _check_optimizer(cfg: DictConfig) -> None:
    momentum, dampening = value_of(cfg, "optimizer.momentum"), value_of(cfg, "optimizer.dampening")
    if value_of(cfg, "optimizer.nesterov") and (not momentum or dampening):
        raise not_allowed("optimizer.nesterov", True, "only with momentum > 0 and dampening 0")


#: The optional loggers, by the end of their ``_target_``: their choice of conf/logger/
#: (and kdlight's extra of that name) and the packages they import, as alternatives of
#: which one must be installed whole (MLflow's SQLite store needs SQLAlchemy and Alembic,
#: which mlflow-skinny leaves out).
LOGGER_EXTRAS = {
    "TensorBoardLogger": ("tensorboard", [("tensorboard",), ("tensorboardX",)]),
    "MLFlowLogger": ("mlflow", [("mlflow", "sqlalchemy", "alembic")]),
    "WandbLogger": ("wandb", [("wandb",)]),
}


def check_extras(cfg: DictConfig) -> None:
    """The optional packages that ``cfg``'s loggers need are installed."""
    loggers = OmegaConf.select(cfg, "logger", default=None) or {}
    for entry in loggers.values():  # only _target_ is read: the paths need a Hydra run
        target = str((entry or {}).get("_target_", ""))
        for suffix, (extra, alternatives) in LOGGER_EXTRAS.items():
            if target.endswith(suffix):
                missing = [[m for m in a if not importlib.util.find_spec(m)] for a in alternatives]
                if all(missing):  # every alternative lacks a package: name the first one's
                    raise missing_extra(f"logger={extra}", missing[0][0], extra)


def missing_extra(setting: str, package: str, extra: str) -> KDLightError:
    """The error for a ``setting`` whose ``package`` (kdlight's ``extra``) is not installed."""
    return KDLightError(
        f"{setting} needs {package}, which is not installed: pip install 'kdlight[{extra}]'"
    )


#: Bytes kept free below a run's folder when its length is checked before the launch, for
#: what goes in it: a multirun job's folder (model, T and alpha, seed and hash), a grid
#: cell's folder, ``checkpoints/`` and a save's temporary name (about 100 in all).
RUN_FILES = 200


def check_path_length(
    path: str | Path, setting: str, value: str | Path | None = None, room: int = 0
) -> Path:
    """``path`` can be made: none of the names still to be made is longer than NAME_MAX, and
    the whole, with ``room`` bytes more for what goes below it, is shorter than PATH_MAX
    (``os.pathconf`` of its deepest part that exists, which is returned; 255 and 4096 bytes
    on Linux). Otherwise the first folder made there would end in ``OSError: File name too
    long``. The error names ``setting=value`` (``value`` defaults to ``path``)."""
    absolute = Path(path).expanduser().absolute()
    # os.path.exists, unlike Path.exists, is False (not an OSError) for a name too long
    existing = next(p for p in (absolute, *absolute.parents) if os.path.exists(p))
    shown = _shortened(value if value is not None else path)
    name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    for name in absolute.relative_to(existing).parts:
        if len(os.fsencode(name)) > name_max:
            raise KDLightError(
                f"{setting}={shown} cannot be made: its name {_shortened(name)} is "
                f"{len(os.fsencode(name))} bytes long, and its filesystem takes at most "
                f"{name_max} (NAME_MAX)"
            )
    length = len(os.fsencode(str(absolute)))
    if length + room >= path_max:  # PATH_MAX counts the terminating NUL byte
        subject = "it" if value is None or str(value) == str(path) else "the run's folder in it"
        files = f", and {room} more for the files below it," if room else ""
        raise KDLightError(
            f"{setting}={shown} cannot be made: {subject} is {length} bytes long as an "
            f"absolute path{files} where the system takes paths shorter than {path_max} "
            "(PATH_MAX)"
        )
    return existing


def _shortened(text: str | Path, keep: int = 40) -> str:
    """A long path or name as its start and end, so that its error stays a readable line."""
    text = str(text)
    return text if len(text) <= 2 * keep else f"{text[:keep]}...{text[-keep:]}"


def check_writable(folder: str | Path, setting: str) -> None:
    """``folder`` can be written, or created below a folder that can: its names and its
    length fit the filesystem (:func:`check_path_length`), and the deepest part of it that
    exists is a folder this process may write into."""
    existing = check_path_length(folder, setting)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not writable" if existing.is_dir() else "is not a folder"
        raise KDLightError(
            f"{setting}={folder} cannot be written ({existing} {why}): launch from a writable "
            "folder or set paths.root=DIR (or KDLIGHT_OUTPUTS=DIR)"
        )
    free = _free_bytes(existing)
    if free is not None and free < MIN_FREE_BYTES:
        raise KDLightError(
            f"{setting}={folder} cannot be written: its filesystem ({existing}) is full "
            f"({free // 1024} KiB free, a run needs at least {MIN_FREE_BYTES >> 20} MiB to "
            "start): free space or set paths.root=DIR (or KDLIGHT_OUTPUTS=DIR)"
        )


#: The least free space a run starts with: Hydra's record, the config, the lock and the log
#: take tens of kilobytes; below this the launch would fail in Hydra's own code.
MIN_FREE_BYTES = 1 << 20


def _free_bytes(folder: Path) -> int | None:
    """Bytes this process may still write on ``folder``'s filesystem (none when it has no
    free file entries left); None where the system does not say."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_files and not stats.f_ffree:
        return 0
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail  # root may use the reserve
    return blocks * stats.f_frsize


def _check_paths(cfg: DictConfig) -> None:
    with contextlib.suppress(InterpolationResolutionError):  # no Hydra run: nothing to write
        if folder := OmegaConf.select(cfg, "paths.output_dir", default=None):
            check_writable(folder, "paths.output_dir")


def _arguments(target: str, node: DictConfig) -> list[str] | None:
    """The arguments ``target`` takes (None: any, it has ``**kwargs``)."""
    if target == "kdlight.models.create_model":  # it passes them on to the registered model
        from kdlight.models.registry import model_arguments

        return ["name", *model_arguments(node.name)]
    parameters = inspect.signature(_locate(target)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters]


def _check_targets(cfg: DictConfig) -> None:
    """Every key of a ``_target_`` entry is an argument of what it builds, so that a
    ``+key=value`` that would fail when the object is made stops here."""
    nodes = [(s, cfg.get(s)) for s in SECTIONS if s not in ("callbacks", "logger")]
    for group in ("callbacks", "logger", "methods"):
        nodes += [(f"{group}.{key}", node) for key, node in (cfg.get(group) or {}).items()]
    for path, node in nodes:
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            takes = _arguments(str(node._target_), node)
        except (ImportError, AttributeError, ValueError):
            importable = "a class or function that can be imported"
            raise not_allowed(f"{path}._target_", node._target_, importable) from None
        unknown = [k for k in node if takes is not None and k not in takes and k[0] != "_"]
        if unknown:
            passed = ("params", "model", "teacher", "optimizer", "scheduler")  # by kdlight.train
            listed = ", ".join(a for a in takes if a not in passed)
            raise KDLightError(
                f"unknown setting '{path}.{unknown[0]}' ({node._target_} takes {listed})"
            )


#: Checks of settings that must fit each other, run once the section's own rules passed
#: ("" is the top level).
_SECTION_CHECKS: dict[str, Callable[[DictConfig], None]] = {
    "": _check_classes,
    "data": _check_data,
    "distill": _check_distillation,
    "trainer": _check_trainer,
    "optimizer": _check_optimizer,
    "logger": check_extras,
    "paths": _check_paths,
}
