"""Every setting is checked before any work (kdlight.config.settings): a bad one stops the run with
one ``error:`` line that names the setting, its value and what is allowed, and status 2.

Most tests call ``validate_settings`` and ``preflight`` directly; the ``test_cli_*`` ones run
``kdlight-train`` itself, which calls ``preflight`` before Hydra starts and
``validate_settings`` first thing in ``train``.
"""

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kdlight import config_dir
from kdlight.cli.slurm import main as slurm_main
from kdlight.config.preflight import preflight
from kdlight.config.settings import check_one_process, validate_settings
from kdlight.data import CIFAR10DataModule, ImageFolderDataModule
from kdlight.distillers import CRD
from kdlight.errors import KDLightError
from kdlight.models import list_models
from kdlight.trainer.callbacks import SaveLastCheckpoint, StopOnNonFiniteLoss
from tests.conftest import (
    TINY,
    compose_config,
    finish,
    mount,
    mounts_here,
    run_cli,
    start_cli,
    unmount,
)

REPO = Path(__file__).resolve().parents[1]
MODELS = ", ".join(list_models())  # what a message offers for a model that does not exist
#: tensorboard, and the SLURM launcher with submitit, as if they were not installed
NO_TENSORBOARD = "tensorboard,tensorboardX"
NO_SLURM = "hydra_plugins.hydra_submitit_launcher,submitit"

# ----------------------------------------------------------------------- validate_settings
BAD_SETTINGS = [
    (["data.batch_size=abc"], "data.batch_size=abc is not allowed: an integer >= 1"),
    (["data.batch_size=0"], "data.batch_size=0 is not allowed: an integer >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1 is not allowed: an integer >= 0"),
    (["data.train_subset=0"], "data.train_subset=0 is not allowed: null or an integer >= 1"),
    (["data.val_size=-1"], "data.val_size=-1 is not allowed: an integer >= 0"),
    (
        ["data.source=cifar"],
        "data.source=cifar is not allowed: one of archive, torchvision, synthetic",
    ),
    (
        ["data.val_size=600"],
        "data.val_size=600 is not allowed: fewer than data.synthetic_train_size=600",
    ),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is not allowed: a finite number > 0"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is not allowed: a finite number > 0"),
    (["optimizer.momentum=-1"], "optimizer.momentum=-1 is not allowed: a number in [0, 1)"),
    (
        ["optimizer.weight_decay=-1e-4"],
        "optimizer.weight_decay=-0.0001 is not allowed: a finite number >= 0",
    ),  # fmt: skip
    (
        ["optimizer=adamw", "+optimizer.betas=[0.9,1.0]"],
        "optimizer.betas=[0.9, 1.0] is not allowed: two numbers in [0, 1)",
    ),
    (
        ["+optimizer.nesterov=true", "optimizer.momentum=0"],
        "optimizer.nesterov=true is not allowed: only with momentum > 0 and dampening 0",
    ),
    (["scheduler.gamma=0"], "scheduler.gamma=0 is not allowed: a number in (0, 1]"),
    (
        ["scheduler.milestones=[0,150]"],
        "scheduler.milestones=[0, 150] is not allowed: a list of epochs >= 1",
    ),
    (["seed=abc"], "seed=abc is not allowed: an integer from 0 to 4294967295"),
    (["seed=-1"], "seed=-1 is not allowed: an integer from 0 to 4294967295"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs=abc is not allowed: an integer >= 1"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 is not allowed: an integer >= 1"),
    (
        ["trainer.devices=0"],
        "trainer.devices=0 is not allowed: a number of devices >= 1, -1 (all), auto, or a "
        "list of device indices",
    ),
    (
        ["trainer.limit_train_batches=0"],
        "trainer.limit_train_batches=0 is not allowed: null or a fraction in (0, 1] or a number "
        "of batches >= 1",
    ),
    (
        ["trainer.limit_val_batches=1.5"],
        "trainer.limit_val_batches=1.5 is not allowed: null or a fraction in (0, 1] or a "
        "number of batches >= 1",
    ),
    (
        ["+trainer.gradient_clip_val=-1"],
        "trainer.gradient_clip_val=-1 is not allowed: null or a finite number > 0",
    ),
    (
        ["trainer.enable_progress_bar=yes"],
        "trainer.enable_progress_bar=yes is not allowed: true or false",
    ),  # fmt: skip
    (["num_classes=5"], "num_classes=5 is not allowed: 10 (the data has 10 classes)"),
    (["model.num_classes=5"], "model.num_classes=5 is not allowed: num_classes (10)"),
    (["model=small_cnn", "model.width=0"], "model.width=0 is not allowed: a finite number > 0"),
    (["test_ckpt=foo"], "test_ckpt=foo is not allowed: one of best, last"),
    (["train=maybe"], "train=maybe is not allowed: true or false"),
    (
        ["callbacks.last_checkpoint.every_n_train_steps=-1"],
        "callbacks.last_checkpoint.every_n_train_steps=-1 is not allowed: an integer >= 0",
    ),
    (
        ["callbacks.stop_on_nonfinite_loss.check_every_n_steps=0"],
        "callbacks.stop_on_nonfinite_loss.check_every_n_steps=0 is not allowed: an integer >= 1",
    ),
    (
        ["callbacks.model_checkpoint.mode=best"],
        "callbacks.model_checkpoint.mode=best is not allowed: one of min, max",
    ),
    (
        ["experiment=distill", "distill.temperature=inf"],
        "distill.temperature=inf is not allowed: a finite number > 0 (a list of them for "
        "experiment=distill_grid)",
    ),
    (
        ["experiment=distill", "distill.temperature=0"],
        "distill.temperature=0 is not allowed: a finite number > 0 (a list of them for "
        "experiment=distill_grid)",
    ),
    (
        ["experiment=distill", "distill.alpha=1.5"],
        "distill.alpha=1.5 is not allowed: a number in [0, 1] (a list of them for "
        "experiment=distill_grid)",
    ),
    (
        ["experiment=distill", "distill.temperature=[2,4]"],
        "distill.temperature=[2, 4] is not allowed: one value (a list is a grid: "
        "experiment=distill_grid)",
    ),
    (
        ["experiment=distill_grid", "distill.temperature=[2,2.0]"],
        "distill.temperature=[2, 2.0] is not allowed: each value once (2 and 2.0 are one cell, T2)",
    ),
    (
        ["experiment=distill_grid", "distill.alpha=[0.5,0.9,0.50]"],
        "distill.alpha=[0.5, 0.9, 0.5] is not allowed: each value once (0.5 and 0.5 are one "
        "cell, alpha0.5)",
    ),
    (
        ["experiment=distill_grid", "distill.teacher_model=resnet1000"],
        f"distill.teacher_model=resnet1000 is not allowed: one of {MODELS}",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS, ids=lambda x: str(x)[:60])
def test_a_bad_setting_is_one_line(overrides: list[str], message: str, tmp_path: Path):
    with pytest.raises(KDLightError) as caught:
        validate_settings(compose_config([*TINY, *overrides], tmp_path))
    assert str(caught.value) == message


#: A bad setting on the command line, and the same value given to kdlight's own class from
#: Python: one check, so one message (the setting named as the command line names it).
FROM_PYTHON = [
    (["data.batch_size=0"], lambda _: CIFAR10DataModule(source="synthetic", batch_size=0)),
    (["data.eval_subset=0"], lambda _: CIFAR10DataModule(source="synthetic", eval_subset=0)),
    (["data.source=cifar"], lambda _: CIFAR10DataModule(source="cifar")),
    (["data.source=archive", "data.archive_path=null"], lambda _: CIFAR10DataModule()),
    (
        ["data.val_size=600"],
        lambda _: CIFAR10DataModule(source="synthetic", synthetic_train_size=600, val_size=600),
    ),
    (
        ["data=image_folder", "data.root=/x", "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0,0.2]"],
        lambda _: ImageFolderDataModule("/x", mean=[0.5, 0.5, 0.5], std=[0.2, 0, 0.2]),
    ),
    (
        ["callbacks.last_checkpoint.every_n_train_steps=-1"],
        lambda folder: SaveLastCheckpoint(folder, every_n_train_steps=-1),
    ),
    (
        ["callbacks.stop_on_nonfinite_loss.check_every_n_steps=0"],
        lambda _: StopOnNonFiniteLoss(check_every_n_steps=0),
    ),
    (  # what a system checks as fitting starts, from the Trainer's devices and nodes
        ["experiment=distill", "distiller=crd", "trainer.devices=2"],
        lambda _: check_one_process(CRD(), devices=2, num_nodes=1),
    ),
]


@pytest.mark.parametrize(
    ("overrides", "make"), FROM_PYTHON, ids=[" ".join(overrides) for overrides, _ in FROM_PYTHON]
)
def test_python_and_the_command_line_say_the_same(overrides, make, tmp_path: Path):
    base = ["trainer=cpu"] if overrides[0].startswith("data=") else TINY  # or TINY's data
    with pytest.raises(KDLightError) as from_cli:
        validate_settings(compose_config([*base, *overrides], tmp_path))
    with pytest.raises(KDLightError) as from_python:
        make(tmp_path)
    assert str(from_python.value) == str(from_cli.value)
    assert " is not allowed: " in str(from_cli.value)


def test_interpolated_settings_are_named_at_their_source(tmp_path: Path):
    """scheduler.T_max is ${trainer.max_epochs} and data.seed is ${seed}: the message names
    the setting the user wrote."""
    cosine = compose_config([*TINY, "scheduler=cosine", "trainer.max_epochs=-3"], tmp_path)
    with pytest.raises(KDLightError, match=r"^trainer\.max_epochs=-3 is not allowed"):
        validate_settings(cosine)
    with pytest.raises(KDLightError, match=r"^seed=1.5 is not allowed"):
        validate_settings(compose_config([*TINY, "seed=1.5"], tmp_path))


def test_a_key_its_target_does_not_take_is_unknown(tmp_path: Path):
    """``+key=value`` passes Hydra but would fail when the object is built, after the
    Trainer: it stops here, with what the target takes."""
    with pytest.raises(KDLightError) as caught:
        validate_settings(compose_config([*TINY, "+optimizer.momentun=0.9"], tmp_path))
    assert str(caught.value) == (
        "unknown setting 'optimizer.momentun' (torch.optim.SGD takes lr, momentum, dampening, "
        "weight_decay, nesterov, maximize, foreach, differentiable, fused)"
    )
    with pytest.raises(KDLightError) as caught:
        validate_settings(compose_config([*TINY, "model=resnet8", "+model.depth=8"], tmp_path))
    assert str(caught.value) == (
        "unknown setting 'model.depth' (kdlight.models.create_model takes name, num_classes, width)"
    )


@pytest.mark.fault
def test_the_output_folder_must_be_writable(read_only_folder: Path, tmp_path: Path):
    cfg = compose_config(TINY, read_only_folder / "run")
    with pytest.raises(KDLightError) as caught:
        validate_settings(cfg)
    assert str(caught.value) == (
        f"paths.output_dir={read_only_folder / 'run'} cannot be written ({read_only_folder} is "
        "not writable): launch from a writable folder or set paths.root=DIR (or "
        "KDLIGHT_OUTPUTS=DIR)"
    )
    validate_settings(compose_config(TINY, tmp_path / "new" / "run"))  # made when needed


# ------------------------------------------------------------------------------- preflight
@pytest.fixture
def launch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder kdlight-train is launched from, outputs below it, full errors off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDLIGHT_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return tmp_path


def preflight_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """What preflight prints when it stops ``kdlight-train ARGV`` (it must, with status 2)."""
    with pytest.raises(SystemExit) as stopped:
        preflight(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


BAD_COMMAND_LINES = [
    (
        ["experiment=distill", "distil.temperature=4"],
        "unknown setting 'distil.temperature' (did you mean 'distill.temperature'?)",
    ),
    (
        ["distil.temperature=4"],
        "unknown setting 'distil.temperature' (did you mean 'distill.temperature', which comes "
        "with experiment=distill?)",
    ),
    (
        ["distill.temperature=4"],
        "unknown setting 'distill.temperature' in this config (it comes with "
        "experiment=distill, experiment=distill_grid, experiment=method_grid, "
        "experiment=zoo_distill)",
    ),
    (
        ["model.width=0.5"],  # the default model, resnet18_half, has no width
        "unknown setting 'model.width' in this config (it comes with model=resnet18, "
        "model=resnet20, model=resnet8, model=small_cnn)",
    ),
    (["modle=resnet8"], "unknown setting 'modle' (did you mean 'model'?)"),
    (["lr=0.05"], "unknown setting 'lr' (did you mean 'optimizer.lr'?)"),
    (
        ["trainer.max_epoch=3"],
        "unknown setting 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)",
    ),  # fmt: skip
    (
        ["~callbacks.progres_bar"],
        "unknown setting 'callbacks.progres_bar' (did you mean 'callbacks.progress_bar'?)",
    ),
    (["foo.bar=1"], "unknown setting 'foo.bar' (kdlight-train --cfg job prints every setting)"),
    (
        ["model=resnt20"],
        f"model=resnt20 is not allowed: one of {MODELS} (did you mean model=resnet20?)",
    ),
    (["+optimizer.lr=0.05"], "optimizer.lr exists already: set it without the +"),
    (
        ["x=["],
        "cannot read 'x=[': no viable alternative at input '[' (the syntax: "
        "https://hydra.cc/docs/advanced/override_grammar/basic)",
    ),
    (
        ["data.batch_size=64,128"],
        "data.batch_size=64,128 has several values: add -m for one run per value, or write a "
        "list as [a,b]",
    ),
    (  # each value of a sweep over a config group is composed, not only the first
        ["-m", "model=small_cnn,resnt20"],
        f"model=resnt20 is not allowed: one of {MODELS} (did you mean model=resnet20?)",
    ),
    (  # conf/sweep/'s params are settings of the jobs too
        ["-m", "sweep=reference_grid"],
        "unknown setting 'distill.temperature' in this config (it comes with "
        "experiment=distill, experiment=distill_grid, experiment=method_grid, "
        "experiment=zoo_distill)",
    ),
    (
        ["-m", "hydra/launcher=slurm", "trainer=ddp"],
        "trainer.devices=auto is not allowed for hydra/launcher=slurm: set trainer.devices=N "
        "(a number of GPUs per node)",
    ),
    (
        ["-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=0"],
        "trainer.num_nodes=0 is not allowed for hydra/launcher=slurm: set trainer.num_nodes=N "
        "(a number of nodes)",
    ),
    (
        ["-m", "hydra/launcher=slurm", "trainer.devices=4", "hydra.launcher.timeout_min=abc"],
        "hydra.launcher.timeout_min=abc is not allowed: Value 'abc' of type 'str' could not be "
        "converted to Integer",
    ),
]


@pytest.mark.parametrize(("argv", "message"), BAD_COMMAND_LINES, ids=lambda x: str(x)[:60])
def test_preflight_says_what_hydra_refuses_in_one_line(
    argv: list[str], message: str, launch_folder: Path, capsys: pytest.CaptureFixture
):
    assert preflight_error(argv, capsys) == message
    assert not any(launch_folder.iterdir())  # nothing written


GOOD_COMMAND_LINES = [
    [],
    ["experiment=quick", "data.source=synthetic", "trainer.max_epochs=1"],
    ["experiment=distill", "distill.temperature=4", "distill.alpha=0.9"],
    ["-m", "experiment=distill", "distill.temperature=1,2,4,8,16", "distill.alpha=0.1,0.5,0.9"],
    ["-m", "experiment=distill", "sweep=reference_grid", "seed=0,1,2"],
    ["-m", "model=glob(resnet*)", "optimizer=sgd,adamw"],
    ["experiment=distill_grid", "distill.temperature=[2,8]", "distill.alpha=[0.5,0.9]"],
    ["experiment=teacher", "demo=cpu", "model=resnet20", "trainer.max_epochs=6"],
    [
        "-m",
        "hydra/launcher=slurm",
        "experiment=teacher",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
    ],  # fmt: skip
    # a DDP process that Lightning starts runs kdlight.train again with this job's settings
    [
        "--config-name=train",
        "trainer=ddp",
        'hydra.run.dir="/tmp/a run"',
        "hydra.job.chdir=False",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
    ],  # fmt: skip
    ["--help"],
    ["--cfg", "job", "experiment=teacher"],
]


@pytest.mark.parametrize("argv", GOOD_COMMAND_LINES, ids=lambda x: " ".join(x)[:60])
def test_preflight_lets_good_command_lines_through_silently(
    argv: list[str], launch_folder: Path, capsys: pytest.CaptureFixture
):
    preflight(argv)
    assert capsys.readouterr() == ("", "")
    assert not any(launch_folder.iterdir())  # nothing written
    assert not GlobalHydra.instance().is_initialized()  # Hydra's main starts afresh


def test_preflight_raises_with_full_errors(launch_folder: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(KDLightError, match="unknown setting 'distil.temperature'"):
        preflight(["distil.temperature=4"])


@pytest.fixture
def read_only_folder(tmp_path: Path, request: pytest.FixtureRequest):
    """A folder nothing can be written into: read-only permissions, or for root (whom
    permissions do not stop) a read-only filesystem mounted there; where root may not
    mount, the test runs again in a user and mount namespace (``tests.conftest``)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not mounts_here(request.node):
        yield folder  # not used: the test runs in the namespace
        return
    mount(folder, "ro,size=1m")
    try:
        yield folder
    finally:
        unmount(folder)


@pytest.mark.fault
def test_preflight_refuses_a_read_only_launch_folder(
    read_only_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.chdir(read_only_folder)
    monkeypatch.delenv("KDLIGHT_OUTPUTS", raising=False)  # the default root: ./outputs
    assert preflight_error(["trainer=cpu"], capsys) == (
        f"paths.root=outputs cannot be written ({read_only_folder} is not writable): launch "
        "from a writable folder or set paths.root=DIR (or KDLIGHT_OUTPUTS=DIR)"
    )
    elsewhere = read_only_folder.parent / "runs"
    preflight(["trainer=cpu", f"paths.root={elsewhere}"])  # the way out works


# --------------------------------------------------------------------------------- extras
def start_without(blocked: str, entry: str, args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``python -m ENTRY ARGS`` in ``cwd`` (made here) with the modules ``blocked``
    unimportable, as if their packages were not installed (``sys.modules[name] = None`` is
    how Python marks a module that cannot be imported)."""
    cwd.mkdir()
    (cwd / "without.py").write_text(
        "import os, runpy, sys\n"
        "for name in os.environ['KDLIGHT_TEST_BLOCKED'].split(','):\n"
        "    sys.modules[name] = None\n"
        "entry = sys.argv.pop(1)\n"
        "if entry == 'preflight':\n"
        "    from kdlight.config.preflight import preflight\n"
        "    preflight(sys.argv[1:])\n"
        "else:\n"
        "    runpy.run_module(entry, run_name='__main__', alter_sys=True)\n"
    )
    environment = {"PYTHONPATH": str(cwd), "KDLIGHT_TEST_BLOCKED": blocked}
    return start_cli([entry, *args], cwd, entry="without", **environment)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


TENSORBOARD_MISSING = (
    "error: logger=tensorboard needs tensorboard, which is not installed: "
    "pip install 'kdlight[tensorboard]'"
)
SLURM_MISSING = (
    "error: hydra/launcher=slurm needs hydra-submitit-launcher, which is not installed: "
    "pip install 'kdlight[slurm]'"
)


def test_missing_extras_are_named(tmp_path: Path):
    # started together, each in its own folder: each spends seconds importing torch
    args = [*TINY, "logger=tensorboard"]
    tensorboard = start_without(NO_TENSORBOARD, "preflight", args, tmp_path / "tensorboard")
    multirun = ["-m", "hydra/launcher=slurm"]
    slurm = start_without(NO_SLURM, "preflight", multirun, tmp_path / "slurm")
    devices = ["trainer.devices=4"]
    dry_run = start_without(NO_SLURM, "kdlight.cli.slurm", devices, tmp_path / "dry_run")
    tensorboard, slurm, dry_run = finish(tensorboard), finish(slurm), finish(dry_run)
    assert tensorboard.returncode == 2 and error_lines(tensorboard) == [TENSORBOARD_MISSING]
    assert slurm.returncode == 2 and error_lines(slurm) == [SLURM_MISSING]
    assert dry_run.returncode == 2 and error_lines(dry_run) == [SLURM_MISSING]
    assert "Traceback" not in tensorboard.stderr + slurm.stderr + dry_run.stderr


def test_the_extras_exist_and_dev_installs_them():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
    assert any(r.startswith("hydra-submitit-launcher") for r in extras["slurm"])
    assert "kdlight[tensorboard,slurm]" in extras["dev"]


# ---------------------------------------------------------------------------------- SLURM
def test_slurm_dry_run_help(capsys: pytest.CaptureFixture):
    slurm_main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m kdlight.cli.slurm [-h] [OVERRIDE ...]\n")
    assert "kdlight-train -m hydra/launcher=slurm" in out


def test_slurm_dry_run_needs_a_number_of_devices(
    launch_folder: Path, capsys: pytest.CaptureFixture
):
    with pytest.raises(SystemExit) as stopped:
        slurm_main(["experiment=teacher", "trainer=ddp"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "error: trainer.devices=auto is not allowed for hydra/launcher=slurm: set "
        "trainer.devices=N (a number of GPUs per node)\n"
    )


def test_config_comments_name_choices_that_exist():
    """A command in a config's comment (``hydra/launcher=slurm``, ``experiment=distill``)
    names a choice that exists: ``slurm_dry_run`` was named and never existed."""
    named = re.compile(r"(?<![\w./+~-])([a-z_]+(?:/[a-z_]+)?)=(\w+)")  # not a.b=, +a=, --a=
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        loader = GlobalHydra.instance().config_loader()
        for file in sorted(config_dir().rglob("*.yaml")):
            lines = file.read_text().splitlines()
            comments = "\n".join(line.split("#", 1)[1] for line in lines if "#" in line)
            for group, choice in named.findall(comments):
                options = loader.get_group_options(group)
                if options:
                    assert choice in options, f"{file.name}: {group}={choice}"


# -------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (  # a setting error comes before the GPU that experiment=distill asks for
            ["experiment=distill", "data=synthetic", "distill.temperature=0"],
            "distill.temperature=0 is not allowed: a finite number > 0 (a list of them for "
            "experiment=distill_grid)",
        ),
        (
            ["experiment=distill", "distil.temperature=4"],
            "unknown setting 'distil.temperature' (did you mean 'distill.temperature'?)",
        ),
        ([*TINY, "data.batch_size=abc"], "data.batch_size=abc is not allowed: an integer >= 1"),
        ([*TINY, "trainer.max_epochs=0"], "trainer.max_epochs=0 is not allowed: an integer >= 1"),
    ],
    ids=["temperature-before-gpu", "typo", "batch-size", "zero-epochs"],
)
def test_cli_stops_a_bad_setting_before_any_work(tmp_path: Path, args: list[str], message: str):
    result = run_cli(args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error_lines(result) == [f"error: {message}"], result.stderr[-2000:]
    assert "To append to your config" not in result.stderr  # Hydra's own text
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.ckpt"))


def test_cli_names_missing_extras_and_slurm_devices(tmp_path: Path):
    # started together, each in its own folder: each spends seconds importing torch
    args = [*TINY, "logger=tensorboard"]
    tensorboard = start_without(NO_TENSORBOARD, "kdlight.train", args, tmp_path / "tensorboard")
    multirun = ["-m", "hydra/launcher=slurm"]
    slurm = start_without(NO_SLURM, "kdlight.train", multirun, tmp_path / "slurm")
    auto = start_cli([*multirun, "trainer=ddp"], tmp_path)
    tensorboard, slurm, auto = finish(tensorboard), finish(slurm), finish(auto)
    assert tensorboard.returncode == 2 and error_lines(tensorboard) == [TENSORBOARD_MISSING]
    assert slurm.returncode == 2 and error_lines(slurm) == [SLURM_MISSING]
    assert auto.returncode == 2 and error_lines(auto) == [
        "error: trainer.devices=auto is not allowed for hydra/launcher=slurm: set "
        "trainer.devices=N (a number of GPUs per node)"
    ]


@pytest.mark.fault
def test_cli_from_a_read_only_folder(read_only_folder: Path):
    result = run_cli(["trainer=cpu"], read_only_folder)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error_lines(result) == [
        f"error: paths.root={read_only_folder / 'outputs'} cannot be written "
        f"({read_only_folder} is not writable): launch from a writable folder or set "
        "paths.root=DIR (or KDLIGHT_OUTPUTS=DIR)"
    ]
