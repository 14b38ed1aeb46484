"""A run is its config: the directory and identity of every ``kdlight-train`` run.

A run's directory follows from every setting that changes its numbers, readable first and
unique after::

    <paths.root>/<name>/<model>/[T4_alpha0.9/]seed0-3f2a9c1e          # one run
    <paths.root>/distill_grid/<model>/seed0-3f2a9c1e/T4_alpha0.9/     # a cell of a fused grid

The last eight hex digits are a hash of :func:`settings` (every result-changing setting,
numbers spelled one way, so ``4`` and ``4.0`` are one value) and the seed. Settings that only
change where or how things are written or shown (paths, loggers, progress bar, logging and
checkpoint intervals, workers) are not part of it. So the same command twice is the same
run (the second does nothing), a changed command is a new run, and a checkpoint is only
ever resumed by the run it belongs to: each checkpoint carries its run's id.

The teacher of a distillation run is part of its identity: the finished teacher run it
distils from, or the content of the checkpoint the user names (both found by
:func:`kdlight.teacher.find.resolve_teacher`; a file by its content, :func:`file_identity`).
"""

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdlight.errors import KDLightError

#: Trainer settings that make a run a quick check rather than a result.
DEBUG_KEYS = ("fast_dev_run", "limit_train_batches", "limit_val_batches", "limit_test_batches")

# Every key of a shipped config is declared on one side, alone or in a group all of whose
# keys are on that side; tests/test_identity_declared.py composes them all and names a key
# declared on neither. Such a key (a user's ``+data.extra=1``, say) counts as a result: a
# new run, never two runs that share a folder. A plain copy (``${distill.alpha}``) is the
# setting it copies.

#: Settings that change a run's numbers (the seed is the id's own part, beside them).
RESULTS = (
    "seed", "num_classes", "test_ckpt",
    "model", "optimizer", "scheduler", "distiller", "methods",  # built from all their keys
    "data._target_", "data.source", "data.root", "data.mean", "data.std",  # which images
    "data.synthetic_train_size", "data.synthetic_test_size", "data.val_size",
    "data.train_subset", "data.eval_subset", "data.batch_size", "data.augment",
    "data.drop_last", "data.on_device",  # on_device: augmented there, with its random stream
    "trainer._target_", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.sync_batchnorm", "trainer.precision", "trainer.deterministic",
    "trainer.max_epochs", "trainer.check_val_every_n_epoch", *(f"trainer.{k}" for k in DEBUG_KEYS),
    "module._target_", "module.distiller", "module.methods",
    "distill.teacher_model", "distill.temperature", "distill.alpha",
    "callbacks.model_checkpoint.monitor", "callbacks.model_checkpoint.mode",  # which is "best"
)  # fmt: skip
#: Settings that change where or how a run writes or shows things, never its numbers.
NOT_RESULTS = (
    "hydra", "paths", "logger", "name", "train", "test", "ckpt_path",
    "callbacks",  # checkpoint intervals, the progress bar...: all but "best" (RESULTS)
    "trainer.default_root_dir", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "trainer.plugins",  # plugins: how checkpoints are written
    "trainer.max_time",  # a launch's time limit: a run it stops is continued, not a result
    "data.data_dir", "data.archive_path", "data.download", "data.num_workers",
    "data.eval_batch_size", "data.seed",  # data.seed is ${seed}, which is kept apart
    "module.compile", "module.channels_last",  # speed options that compute the same
    "distill.teacher_checkpoint", "module.teacher_checkpoint",  # replaced by distill.teacher
    "module.temperature", "module.alpha", "module.teacher_model", "module.num_classes",
    "distill.teacher_cache", "module.teacher_cache",  # the same logits, looked up
    "trusted_targets",  # what may be built from a file, not what is built
)  # fmt: skip
#: Lists whose order does not matter: the cells of a fused grid.
UNORDERED = ("distill.temperature", "distill.alpha")
ID_LENGTH = 8
KD_KEYS = ("temperature", "alpha")


def cell_name(temperature: float, alpha: float) -> str:
    """A distillation cell's directory and metric suffix: ``T4_alpha0.9`` (4 and 4.0 alike)."""
    return f"T{float(temperature):g}_alpha{float(alpha):g}"


#: The settings of a method other than KD that its cell's name shows, by their short name.
OTHER_CELL_KEYS = {"T": "temperature", "alpha": "alpha", "beta": "beta", "w": "weight"}


def method_cell(settings: dict) -> str | None:
    """A distillation run's cell: ``T4_alpha0.9`` for KD (``_ls`` with logit
    standardization), the method and its main settings for others (``dkd_T4_alpha1_beta8``,
    ``fitnet_w100``); None for other runs and for a fused grid (its cells are folders of
    their own)."""
    target = settings.get("distiller._target_")
    if target is None and "distill.temperature" not in settings:
        return None
    if any(key.startswith("methods.") for key in settings):
        return None  # a grid of methods: each is a folder of its own
    value = {k: settings.get(f"distiller.{k}", settings.get(f"distill.{k}")) for k in KD_KEYS}
    if any(isinstance(v, list) for v in value.values()):
        return None
    method = str(target or "kd").rsplit(".", 1)[-1].lower()
    if method == "kd":
        cell = cell_name(value["temperature"], value["alpha"])
    else:  # the method's own settings only (distill.temperature is KD's)
        shown = {key: settings.get(f"distiller.{name}") for key, name in OTHER_CELL_KEYS.items()}
        numbers = [f"{k}{float(v):g}" for k, v in shown.items() if type(v) in (int, float)]
        cell = "_".join([method, *numbers])
    return cell + ("_ls" if settings.get("distiller.standardize") else "")


def _canonical(value):
    """One spelling per number: integral floats become ints (``4.0`` is ``4``)."""
    if value is None or isinstance(value, str | int):  # bools too
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return str(value)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat


def _hash(record: dict) -> str:
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


def is_debug(cfg: DictConfig) -> bool:
    """``fast_dev_run`` or a ``limit_*_batches`` below everything: a check, not a result."""
    trainer = cfg.get("trainer") or {}
    # Lightning reads a float as a fraction of the batches and an int as a number of batches
    limits = [trainer.get(key) for key in DEBUG_KEYS[1:]]
    return bool(trainer.get("fast_dev_run")) or any(
        limit is not None and (isinstance(limit, int) or float(limit) < 1.0) for limit in limits
    )


def is_distillation(cfg: DictConfig) -> bool:
    return "Distillation" in str(OmegaConf.select(cfg, "module._target_", default=""))


def is_grid(cfg: DictConfig) -> bool:
    return str(OmegaConf.select(cfg, "module._target_", default="")).endswith("GridModule")


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else [value]


def grid_cell_names(cfg: DictConfig) -> list[str]:
    """The folders of a fused grid's cells: its methods' names (``experiment=method_grid``)
    or ``T<T>_alpha<alpha>`` for a T x alpha grid, in the order they train."""
    methods = OmegaConf.select(cfg, "module.methods", default=None)
    if methods:
        return list(methods)
    temperatures, alphas = (_as_list(cfg.distill[key]) for key in KD_KEYS)
    return [cell_name(t, a) for t in temperatures for a in alphas]


# ------------------------------------------------------------------------------ identity
def settings(cfg: DictConfig, teacher: str | None = None) -> dict:
    """Every setting of ``cfg`` that changes a run's numbers, except the seed, as a flat
    ``{"dotted.key": value}`` dict with numbers spelled one way. ``teacher`` is the
    teacher's identity (:attr:`Teacher.identity`), stored as ``distill.teacher``."""
    tree = OmegaConf.to_container(cfg, resolve=False)  # resolved below, once trimmed
    # a result inside a group that is not one: the callbacks' choice of the best checkpoint
    inside = [k for k in RESULTS if any(_within(k, group) for group in NOT_RESULTS)]
    keep = {k: OmegaConf.select(cfg, k, default=None) for k in inside}
    for dotted in NOT_RESULTS:
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    flat = _flatten(_canonical(OmegaConf.to_container(OmegaConf.create(tree), resolve=True)))
    # a setting that only repeats another (`module.alpha: ${distill.alpha}`) is that one
    copies = [key for key, raw in _flatten(tree).items() if _is_reference(raw)]
    flat = {k: v for k, v in flat.items() if not any(_within(k, copy) for copy in copies)}
    flat.pop("seed", None)
    flat |= {k: _canonical(v) for k, v in keep.items() if v is not None}
    for key in UNORDERED:
        if isinstance(flat.get(key), list):
            flat[key] = sorted(flat[key])
    if is_distillation(cfg):
        flat["distill.teacher"] = teacher
    else:  # a model trained alone reads no distill.* (a zoo pair's teacher_model, say)
        flat = {k: v for k, v in flat.items() if not k.startswith("distill.")}
    return dict(sorted(flat.items()))


def undeclared(cfg: DictConfig) -> list[str]:
    """The keys of ``cfg`` declared neither in :data:`RESULTS` nor in :data:`NOT_RESULTS`
    (a plain copy of another setting needs neither: it is that one)."""
    declared = (*RESULTS, *NOT_RESULTS)
    flat = _flatten(OmegaConf.to_container(cfg, resolve=False))
    return [
        key
        for key, raw in flat.items()
        if not _is_reference(raw) and not any(_within(key, group) for group in declared)
    ]


def _is_reference(raw) -> bool:
    """``${other.setting}``: a plain reference to another setting (not a resolver's value,
    such as ``${oc.env:...}``, which is a setting of its own)."""
    return isinstance(raw, str) and re.fullmatch(r"\$\{[\w.]+\}", raw) is not None


def _within(key: str, node: str) -> bool:
    return key == node or key.startswith(f"{node}.")


def group_key(
    settings: dict,
    temperature: float | None = None,
    alpha: float | None = None,
    cell: str | None = None,
) -> str:
    """The group of runs that differ only in seed: a hash of ``settings`` where a fused-grid
    cell counts as the separate ``experiment=distill`` run with its own T and alpha, and a
    method grid's ``cell`` as the run of its method (``distiller=<method>``)."""
    record = dict(settings)
    if cell is not None and any(key.startswith("methods.") for key in record):
        prefix = f"methods.{cell}."
        record = {k: v for k, v in record.items() if not k.startswith("methods.")}
        record |= {
            f"distiller.{k[len(prefix) :]}": v for k, v in settings.items() if k.startswith(prefix)
        }
        record.pop("module.distiller", None)  # null in the grid, the method in its run
    for key, value in zip(KD_KEYS, (temperature, alpha), strict=True):
        if value is not None:
            record[f"distill.{key}"] = _canonical(float(value))
    if str(record.get("module._target_", "")).endswith("DistillationGridModule"):
        record["module._target_"] = "kdlight.lit.DistillationModule"
    return _hash(record)


@dataclass(frozen=True)
class RunIdentity:
    """Who a run is: its result-changing settings, seed, id and directory (relative to
    ``paths.root``)."""

    settings: dict
    seed: int | None
    debug: bool

    @property
    def id(self) -> str:
        return _hash({**self.settings, "seed": self.seed, "debug": self.debug})

    @property
    def folder(self) -> str:
        """``<model>/[<cell>/]seed<seed>-<id>[-debug]`` below ``<paths.root>/<name>/``, or
        ``<model>/eval-<id>`` for the evaluation of a checkpoint."""
        model, cell = str(self.settings.get("model.name", "model")), method_cell(self.settings)
        if "eval.checkpoint" in self.settings:  # train=false: a named checkpoint's test
            return f"{model}/eval-{self.id}"
        leaf = f"seed{self.seed}-{self.id}" + ("-debug" if self.debug else "")
        return "/".join([model, cell, leaf] if cell else [model, leaf])

    def record(self) -> dict:
        """The ``run`` block of ``metrics.json``."""
        return {"id": self.id, "seed": self.seed, "debug": self.debug, "settings": self.settings}


def identify(
    cfg: DictConfig, teacher: str | None = None, evaluated: str | Path | None = None
) -> RunIdentity:
    """The identity of the run ``cfg`` describes: ``teacher`` as for :func:`settings`, and,
    for a ``train=false`` run, the checkpoint it evaluates (``evaluated``), by content."""
    seed = OmegaConf.select(cfg, "seed", default=None)
    flat = settings(cfg, teacher)
    if not OmegaConf.select(cfg, "train", default=True):
        flat["eval.checkpoint"] = file_identity(evaluated) if evaluated else "missing"
    return RunIdentity(settings=flat, seed=_canonical(seed), debug=is_debug(cfg))


@functools.lru_cache(maxsize=32)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:16]


def file_identity(path: str | Path) -> str:
    """``file:<hash of the content>`` (cached while the file's size and time are unchanged)."""
    stat = os.stat(path)
    return f"file:{_file_hash(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)}"


def run_folder(*, _root_: DictConfig) -> str:
    """The OmegaConf resolver ``${kdlight.run_folder:}`` that names a run's directory in
    ``hydra.run.dir`` and ``hydra.sweep.subdir``. It never raises: a teacher that cannot be
    found is named ``missing`` here, and ``kdlight-train`` says why in one line."""
    from kdlight.teacher.find import resolve_teacher  # the teacher room reads run identity

    try:
        teacher = resolve_teacher(_root_)
    except (KDLightError, OSError):
        teacher = None
    evaluated = OmegaConf.select(_root_, "ckpt_path", default=None)
    evaluated = evaluated if evaluated and Path(str(evaluated)).is_file() else None
    return identify(_root_, teacher.identity if teacher else "missing", evaluated).folder


def check_checkpoint_owner(path: Path, state: dict, identity: RunIdentity) -> None:
    """Refuse, in one line, a checkpoint written by another run (other settings or seed):
    one whose ``kdlight_run`` record (:meth:`RunIdentity.record`) is not this run's."""
    owner = state.get("kdlight_run") if isinstance(state, dict) else None
    owner = owner if isinstance(owner, dict) else {}
    if owner.get("id") == identity.id:
        return
    theirs, ours = owner.get("settings", {}), identity.settings
    changed = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if owner.get("seed") != identity.seed:
        changed.insert(0, "seed")
    detail = f" (it differs in {', '.join(changed[:5])})" if changed and theirs else ""
    raise KDLightError(
        f"{path} belongs to another run{detail}, not to this one ({identity.id}); "
        "it is not resumed: move it away or launch the command that wrote it"
    )
