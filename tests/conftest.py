"""Shared fixtures: the real Hydra config composed for CPU and tiny data, the CLI in a
subprocess, and the offline CIFAR-10 archive (decoded once per session)."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kdlight import config_dir
from kdlight.data import CIFAR10DataModule

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

#: Overrides that make any composed config a small CPU job on synthetic data.
TINY = [
    "trainer=cpu",
    "data=synthetic",
    "data.synthetic_train_size=600",
    "data.synthetic_test_size=300",
    "data.val_size=100",
    "data.batch_size=50",
    "data.eval_batch_size=100",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
]


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The real ``train`` config with ``overrides``, writing under ``output_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def synthetic_datamodule(
    train: int, test: int, val: int, batch: int, **overrides
) -> CIFAR10DataModule:
    """A ``CIFAR10DataModule`` on synthetic data of the given sizes."""
    return CIFAR10DataModule(
        source="synthetic", synthetic_train_size=train, synthetic_test_size=test, val_size=val,
        batch_size=batch, **overrides,
    )  # fmt: skip


def cpu_trainer(root: Path, epochs: int, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer writing into ``root``: no logger, progress bar or summary, and no
    checkpoints unless ``enable_checkpointing=True`` is passed."""
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def run_cli(
    args: list[str], cwd: Path, entry: str = "kdlight.train", **env: str
) -> subprocess.CompletedProcess:
    """Run ``python -m <entry> ARGS`` in ``cwd`` with outputs under ``cwd/outputs``."""
    environ = {
        **os.environ,
        "KDLIGHT_OUTPUTS": str(cwd / "outputs"),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", entry, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory: pytest.TempPathFactory):
    """No test writes into the user's data cache (~/.cache/kdlight)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("KDLIGHT_DATA", str(tmp_path_factory.mktemp("kdlight-data")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def archive() -> Path:
    if not ARCHIVE.exists():
        pytest.skip(f"offline CIFAR-10 archive not found at {ARCHIVE}")
    return ARCHIVE


@pytest.fixture(scope="session")
def archive_cache(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding the decoded archive, so each test does not decode it again."""
    from kdlight.data.sources import load_archive

    cache = tmp_path_factory.mktemp("cifar10-cache")
    load_archive(archive, cache)
    return cache


@pytest.fixture(scope="session")
def untrained_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ClassifierModule checkpoint of the default teacher (resnet18_half), untrained."""
    import torch

    from kdlight.lit import ClassifierModule
    from kdlight.models import create_model

    module = ClassifierModule(create_model("resnet18_half"))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("teacher") / "last.ckpt"
    torch.save(checkpoint, path)
    return path
