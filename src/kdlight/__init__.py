"""kdlight: knowledge distillation (Hinton et al., 2015) on CIFAR-10 with Lightning and Hydra.

Rooms: ``kdlight.data`` (CIFAR-10 DataModule), ``kdlight.models`` (architectures and the
``create_model`` registry), ``kdlight.losses`` (the KD loss), ``kdlight.lit`` (the Lightning
systems), ``kdlight.train`` (the Hydra entry point) and ``kdlight.report`` (sweep tables).
"""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _fast_cpu_precision() -> str:
    from kdlight.hardware import fast_cpu_precision  # torch is imported only when resolved

    return fast_cpu_precision()


# conf/speed/fast_cpu.yaml: `trainer.precision: ${kdlight.fast_cpu_precision:}`
OmegaConf.register_new_resolver("kdlight.fast_cpu_precision", _fast_cpu_precision, replace=True)


def config_dir() -> Path:
    """The directory that holds kdlight's Hydra configs.

    A source checkout (editable install) reads the top-level ``conf/``; an installed wheel
    carries the same files as ``kdlight/conf``.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"
