"""Command lines that trained what was not asked, ended in a traceback, or were refused
though valid: each is now one error line before any work, or a run that trains. And the
guard that keeps fault tests honest: with ``--fault-skips-fail`` (CI) a skipped one fails."""

import os
from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar

from kdlight.config.preflight import check_command_line
from kdlight.config.settings import validate_settings
from kdlight.errors import KDLightError
from kdlight.lit import DistillationModule
from kdlight.models import create_model
from kdlight.models.width import TooNarrow
from kdlight.train import build_module, build_trainer
from tests.conftest import TINY, compose_config

pytestmark = pytest.mark.fault
pytest_plugins = ["pytester"]

RESNET8_WIDTHS = (
    "a number > 0.03125 for resnet8 (every layer needs >= 1 channel, and its narrowest have "
    "16 at width 1)"
)


def refusal(overrides: list[str], tmp_path: Path) -> str:
    """The one line :func:`validate_settings` refuses the composed config with."""
    with pytest.raises(KDLightError) as refused:
        validate_settings(compose_config([*TINY, *overrides], tmp_path / "run"))
    assert "\n" not in str(refused.value)
    return str(refused.value)


# ---------------------------------------------------------------------------- model.width
@pytest.mark.parametrize(("width", "shown"), [("0.001", "0.001"), ("1e-9", "1e-09")])
def test_a_width_that_leaves_a_layer_without_a_channel_is_refused(
    tmp_path: Path, width: str, shown: str
):
    """Both widths trained a resnet8 of one channel per layer (each count was clamped to 1)."""
    assert refusal(["model=resnet8", f"model.width={width}"], tmp_path) == (
        f"model.width={shown} is not allowed: {RESNET8_WIDTHS}"
    )


def test_the_narrowest_width_allowed_gives_every_layer_one_channel(tmp_path: Path):
    validate_settings(compose_config([*TINY, "model=resnet8", "model.width=0.0313"], tmp_path))
    model = create_model("resnet8", width=0.0313)
    assert model.stem[0].out_channels == 1 and model.fc.in_features == 2  # 64 x 0.0313


def test_the_builders_refuse_it_too():
    """Code that builds a model without a config gets the same answer."""
    with pytest.raises(TooNarrow, match=r"^width=0.01 is not allowed: a number > 0.015625 for"):
        create_model("small_cnn", width=0.01)
    with pytest.raises(TooNarrow, match=r"^width=0 is not allowed: a number > 0.0078125 for"):
        create_model("resnet18", width=0)


# ------------------------------------------------------------------- GPU settings on a CPU
@pytest.mark.parametrize("devices", ["-1", "[0,1]", "'0,1'"])
def test_gpu_devices_on_the_cpu_are_refused(tmp_path: Path, devices: str):
    """Lightning stopped with a TypeError traceback when the Trainer was made."""
    message = refusal([f"trainer.devices={devices}"], tmp_path)
    assert message.startswith("trainer.devices=") and message.endswith(
        "is not allowed: a number of processes >= 1 or auto with trainer.accelerator=cpu "
        "(-1 and lists of indices pick GPUs)"
    )


def test_cpu_processes_are_still_a_number(tmp_path: Path):
    for devices in ("2", "'2'", "auto"):
        validate_settings(compose_config([*TINY, f"trainer.devices={devices}"], tmp_path))


@pytest.mark.parametrize(("strategy", "device"), [("fsdp", "a GPU"), ("xla", "a TPU")])
def test_a_gpu_strategy_on_the_cpu_is_refused(tmp_path: Path, strategy: str, device: str):
    """FSDP stopped with a ValueError traceback, XLA with a ModuleNotFoundError."""
    assert refusal([f"+trainer.strategy={strategy}"], tmp_path) == (
        f"trainer.strategy={strategy} needs {device}, and the run is on the CPU with "
        "trainer.accelerator=cpu: leave the strategy out (auto), or ddp for several processes"
    )


# ----------------------------------------------------------------------- paths.root length
def preflight_refusal(argv: list[str]) -> str:
    with pytest.raises(KDLightError) as refused:
        check_command_line(argv)
    assert "\n" not in str(refused.value)
    return str(refused.value)


@pytest.mark.parametrize("below", [".", "new"])  # and below a folder still to be made
def test_a_name_longer_than_the_filesystem_takes_is_one_line(tmp_path: Path, below: str):
    """``OSError: File name too long`` was a traceback before Hydra even started."""
    name = "a" * 300
    message = preflight_refusal(["trainer=cpu", f"paths.root={tmp_path / below / name}"])
    assert message.startswith("paths.root=") and message.endswith(
        f"cannot be made: its name {'a' * 40}...{'a' * 40} is 300 bytes long, and its "
        f"filesystem takes at most {os.pathconf(tmp_path, 'PC_NAME_MAX')} (NAME_MAX)"
    )


def test_a_path_longer_than_path_max_is_one_line(tmp_path: Path):
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    root = tmp_path.joinpath(*["b" * 200] * (path_max // 200 + 1))
    message = preflight_refusal(["trainer=cpu", f"paths.root={root}"])
    assert (
        message.startswith("paths.root=")
        and " cannot be made: the run's folder in it is " in message
    )
    assert message.endswith(f"where the system takes paths shorter than {path_max} (PATH_MAX)")


def test_a_root_whose_run_folders_would_be_too_long_is_refused_and_a_long_one_is_not(
    tmp_path: Path,
):
    """The run's folder below ``paths.root`` (and the files in it) must fit as well; a root
    well inside the limit, deep folders and all, is launched."""
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    base = len(str(tmp_path)) + 1

    def root_of(length: int) -> Path:
        return tmp_path / "/".join(["c" * 99] * ((length - base) // 100)) / ("d" * 50)

    near = root_of(path_max - 150)
    assert "the run's folder in it" in preflight_refusal(["trainer=cpu", f"paths.root={near}"])
    check_command_line(["trainer=cpu", f"paths.root={root_of(path_max - 800)}"])


# ------------------------------------------------------------------- the progress bar off
def test_progress_bar_off_drops_the_progress_bar_callback_and_trains(tmp_path: Path):
    """Lightning refused the run: conf/callbacks' progress bar stayed in the callbacks list
    beside ``enable_progress_bar=false``. TINY sets the switch and keeps the callback."""
    overrides = [*TINY, "model=small_cnn", "model.width=0.25", "data.synthetic_train_size=200"]
    cfg = compose_config(overrides, tmp_path / "run")
    assert cfg.callbacks.progress_bar is not None and cfg.trainer.enable_progress_bar is False
    validate_settings(cfg)
    trainer = build_trainer(cfg)
    assert not any(isinstance(c, ProgressBar) for c in trainer.callbacks)
    datamodule, module = build_module(cfg, None, trainer.world_size)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.current_epoch == 1 and trainer.global_step == 2  # 100 images, batches of 50


def test_progress_bar_on_keeps_it(tmp_path: Path):
    overrides = [*TINY, "trainer.enable_progress_bar=true"]
    trainer = build_trainer(compose_config(overrides, tmp_path / "run"))
    assert sum(isinstance(c, ProgressBar) for c in trainer.callbacks) == 1


# ---------------------------------------------------------------------- a tap not there
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_tap_that_is_not_there_is_named_with_the_valid_ones(tmp_path: Path, role: str):
    """``distiller.student_taps=[nope]`` was answered about distiller.stage (FitNet paired
    the one name given with the teacher's last stage, then could not find stage -2)."""
    overrides = [*TINY, "experiment=distill", "distiller=fitnet", f"distiller.{role}_taps=[nope]"]
    distiller = instantiate(compose_config(overrides, tmp_path / "run").distiller)
    with pytest.raises(KDLightError) as refused:
        DistillationModule(create_model("resnet8"), teacher=create_model("resnet8"), distiller=distiller)  # fmt: skip
    names = "stem, stem.0, stem.1, stem.2, stages, stages.0, stages.0.conv1"
    assert str(refused.value).startswith(
        f"the {role} (ResNet) has no module 'nope' to tap; valid names: {names}, "
    )
    assert str(refused.value).endswith("stages.2.shortcut.1, pool, fc")


# ------------------------------------------------------------------ fault tests cannot skip
SKIPPING = """
import pytest

@pytest.mark.fault
def test_a_fault_that_cannot_run_here():
    pytest.skip("no small filesystem here")

def test_an_ordinary_skip():
    pytest.skip("not a fault test")
"""


def test_a_skipped_fault_test_fails_with_fault_skips_fail(pytester: pytest.Pytester):
    """What .ci/run passes: the fault test's skip is a failure, an ordinary skip stays one."""
    pytester.makepyfile(test_scratch=SKIPPING)
    strict = pytester.runpytest_inprocess("-p", "tests.conftest", "--fault-skips-fail")
    strict.assert_outcomes(failed=1, skipped=1)
    strict.stdout.fnmatch_lines(["*a fault test skipped, and --fault-skips-fail is set*"])
    pytester.runpytest_inprocess("-p", "tests.conftest").assert_outcomes(skipped=2)
