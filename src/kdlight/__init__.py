"""kdlight: knowledge distillation on CIFAR-10 and CIFAR-100 with Lightning and Hydra.

Rooms: ``kdlight.data`` (the DataModules), ``kdlight.models`` (architectures, the KD zoo's
among them, and the ``create_model`` registry), ``kdlight.losses`` (each method's loss and
connectors), ``kdlight.distillers`` (the methods as components), ``kdlight.models.taps`` (features
by module name), ``kdlight.lit`` (the Lightning systems), ``kdlight.train`` (the Hydra entry
point) and ``kdlight.cli.report`` (tables with seed statistics).

The public API is here too, imported on first use (``import kdlight`` alone stays light:
Hydra's config resolver below needs no torch)::

    from kdlight import CIFAR10DataModule, ClassifierModule, DistillationModule, create_model
"""

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
    carries the same files as ``kdlight/conf``.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"
