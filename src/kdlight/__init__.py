"""kdlight: knowledge distillation on CIFAR-10 and CIFAR-100 with Lightning and Hydra (its
rooms: README.md's "Layout").

The public API is here, imported on first use (``import kdlight`` alone stays light: Hydra's
config resolvers below need no torch)::

    from kdlight import CIFAR10DataModule, ClassifierModule, DistillationModule, create_model
"""

import ast
import functools
import importlib
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported when the name is first used.
_PUBLIC = {
    "CIFAR10DataModule": "kdlight.data",
    "CIFAR100DataModule": "kdlight.data",
    "ImageFolderDataModule": "kdlight.data",
    "ClassifierModule": "kdlight.lit",
    "DistillationModule": "kdlight.lit",
    "DistillationGridModule": "kdlight.lit",
    "load_model": "kdlight.lit",
    "load_teacher": "kdlight.lit",
    "load_published": "kdlight.models",
    "kd_loss": "kdlight.losses",
    "KDLoss": "kdlight.losses",
    "create_model": "kdlight.models",
    "list_models": "kdlight.models",
    "KDLightError": "kdlight.errors",
}

__all__ = ["__version__", "config_dir", *_PUBLIC]


def __getattr__(name: str):
    """Import a public name on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kdlight' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later uses find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


def _fast_cpu_precision() -> str:
    from kdlight.trainer.hardware import fast_cpu_precision  # torch is imported only when resolved

    return fast_cpu_precision()


# conf/speed/fast_cpu.yaml: `trainer.precision: ${kdlight.fast_cpu_precision:}`
OmegaConf.register_new_resolver("kdlight.fast_cpu_precision", _fast_cpu_precision, replace=True)


def _run_folder(*, _root_):
    from kdlight.runs.identity import run_folder  # Lightning is imported only when resolved

    return run_folder(_root_=_root_)


# conf/hydra/default.yaml: each run's directory, named by its settings (kdlight.runs.identity)
OmegaConf.register_new_resolver("kdlight.run_folder", _run_folder, replace=True)
# conf/paths/default.yaml: `data_dir: ${kdlight.data_cache:}`; kdlight.data registers it (no torch)
importlib.import_module("kdlight.data")


def _pair_teacher(pair: str) -> str:
    """The teacher model of a CIFAR-100 zoo pair: ``distill.teacher_model`` of
    ``conf/pair/<pair>.yaml`` (a file of kdlight's, read as data)."""
    return str(OmegaConf.load(config_dir() / "pair" / f"{pair}.yaml").distill.teacher_model)


# conf/experiment/zoo_teacher.yaml: `override /model: ${kdlight.pair_teacher:${pair}}`, the
# pair's teacher as the model choice (a Hydra defaults list sees choices, not settings)
OmegaConf.register_new_resolver("kdlight.pair_teacher", _pair_teacher, replace=True)


def config_dir() -> Path:
    """The directory that holds kdlight's Hydra configs.

    A source checkout (editable install) reads the top-level ``conf/``; an installed wheel
    carries the same files as ``kdlight/conf``. Whatever composes them finds the directory
    here, so the model group's choices that have no file (:func:`_store_model_choices`) are
    registered on the first call.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    conf = packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"
    _store_model_choices(conf / "model")
    return conf


def _registered_names(source: str) -> list[str]:
    """The model names one module of ``kdlight/models/`` registers, read from its source: its
    ``@register_model`` functions and the keys of each table it gives ``register_variants``
    (a dict literal, a module-level dict's name, or a comprehension over its ``.items()``)."""
    tree = ast.parse(source)
    tables = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
    }
    names = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(decorator) == "register_model" for decorator in node.decorator_list)
    ]
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "register_variants":
            table = call.args[1]
            if isinstance(table, ast.DictComp):  # {name: ... for name, ... in TABLE.items()}
                table = table.generators[0].iter.func.value
            names += [key.value for key in tables.get(getattr(table, "id", None), table).keys]
    return names


@functools.cache
def _store_model_choices(files: Path) -> None:
    """``model=<name>`` for every registered model without a file in ``conf/model/``: one
    template in Hydra's ConfigStore, ``create_model`` with the name and the run's
    ``num_classes``. A file is for a model with settings of its own (``width``).

    The names are read from the registry's source (:func:`_registered_names`), not from
    ``kdlight.models.list_models``, which imports torch: :func:`config_dir` serves callers
    that need none (a resolver, ``kdlight-study``'s job list); a test holds the two equal."""
    from hydra.core.config_store import ConfigStore  # Hydra is imported by whoever composes

    own_file = {path.stem for path in files.glob("*.yaml")}
    sources = sorted((Path(__file__).resolve().parent / "models").glob("*.py"))
    names = [name for file in sources for name in _registered_names(file.read_text())]
    for name in sorted(set(names) - own_file):
        template = {"_target_": "kdlight.models.create_model", "name": name}
        ConfigStore.instance().store(
            group="model", name=name, node={**template, "num_classes": "${num_classes}"}
        )
