"""Every config choice composes from the real ``conf/``, passes the settings checks and
instantiates."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import OmegaConf

from kdlight import config_dir
from kdlight.config.settings import rule_for, validate_settings
from kdlight.models import list_models
from kdlight.train import build_trainer
from kdlight.trainer.checkpointing import AtomicCheckpointIO
from tests.conftest import TINY, compose_config

GROUPS = ["data", "model", "module", "optimizer", "scheduler", "trainer", "logger", "callbacks"]
GROUPS += ["experiment", "sweep", "demo", "speed", "debug"]


def choices(group: str) -> list[str]:
    """The group's choices as Hydra lists them: conf/'s files and the ConfigStore's (the
    models without a file of their own)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return GlobalHydra.instance().config_loader().get_group_options(group)


def build(cfg):
    """Instantiate what ``kdlight.train`` instantiates, without training."""
    model = instantiate(cfg.model)
    module = instantiate(
        cfg.module,
        model=model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
    )
    return instantiate(cfg.data), model, module


def test_every_group_has_choices():
    for group in GROUPS:
        assert choices(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize(("group", "choice"), [(g, c) for g in GROUPS for c in choices(g)])
def test_choice_composes_and_instantiates(
    group: str, choice: str, tmp_path: Path, untrained_teacher: Path
):
    overrides = [f"{group}={choice}", *TINY]
    if "distill" in choice or choice == "method_grid":
        overrides.append(f"distill.teacher_checkpoint={untrained_teacher}")
        overrides.append("distill.teacher_model=resnet18_half")  # the untrained teacher's
    if group in ("trainer", "experiment"):
        overrides.append("trainer.accelerator=cpu")  # trainer=gpu composes; CI has no GPU
    cfg = compose_config(overrides, tmp_path)
    validate_settings(cfg)
    OmegaConf.resolve(cfg)
    datamodule, model, module = build(cfg)
    assert isinstance(module, L.LightningModule)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, cfg.num_classes)
    optimizers = module.configure_optimizers()
    assert optimizers is not None
    trainer = build_trainer(cfg)  # the callbacks and loggers, as kdlight-train builds them
    assert isinstance(trainer, L.Trainer) and isinstance(datamodule, L.LightningDataModule)


def test_every_registered_model_is_a_choice(tmp_path: Path):
    """``model=<name>`` for every model of the registry: a file in conf/model/ for those with
    settings of their own, one template for the others, which carries nothing but the name."""
    assert choices("model") == list_models()
    files = {path.stem for path in (config_dir() / "model").glob("*.yaml")}
    for name in set(list_models()) - files:
        model = compose_config([f"model={name}"], tmp_path).model
        assert OmegaConf.to_container(model) == {
            "_target_": "kdlight.models.create_model",
            "name": name,
            "num_classes": "${num_classes}",
        }
    for name in files:  # a file says more than the template would
        assert set(OmegaConf.load(config_dir() / "model" / f"{name}.yaml")) - {
            "_target_", "name", "num_classes"
        }  # fmt: skip


def test_no_experiment_inherits_another():
    """An experiment states what it changes (its trainer, test_ckpt and data too), rather
    than taking them unseen from a chain of other experiments."""
    for file in (config_dir() / "experiment").glob("*.yaml"):
        picked = OmegaConf.load(file).get("defaults") or []
        named = [entry for entry in picked if isinstance(entry, str)]
        assert not set(named) & set(choices("experiment")), f"{file.name} picks {named}"


@pytest.mark.parametrize(
    ("plugins", "writer"),
    [
        ("[]", AtomicCheckpointIO),
        ("[{_target_:lightning.pytorch.plugins.environments.LightningEnvironment}]", AtomicCheckpointIO),
        ("null", AtomicCheckpointIO),
        ("[{_target_:lightning.pytorch.plugins.TorchCheckpointIO}]", TorchCheckpointIO),
    ],
    ids=["none", "another-kind", "null", "a-checkpoint-io-of-ones-own"],
)  # fmt: skip
def test_other_plugins_keep_the_atomic_checkpoint_writes(tmp_path: Path, plugins: str, writer):
    """Setting ``trainer.plugins`` (an environment, say) keeps kdlight's atomic writer; only a
    CheckpointIO of the user's own replaces it."""
    cfg = compose_config([*TINY, f"trainer.plugins={plugins}"], tmp_path)
    assert type(build_trainer(cfg).strategy.checkpoint_io) is writer


def leaf_keys(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaf_keys(value, f"{prefix}{key}.")
        elif not str(key).startswith("_"):
            yield f"{prefix}{key}"


@pytest.mark.parametrize("group", GROUPS)
def test_every_setting_has_a_rule(group: str, tmp_path: Path):
    """A setting in conf/ that kdlight.config.settings has no rule for would go unchecked."""
    for choice in choices(group):
        cfg = OmegaConf.to_container(compose_config([f"{group}={choice}"], tmp_path))
        unchecked = [key for key in leaf_keys(cfg) if rule_for(key) is None]
        assert not unchecked, (
            f"{group}={choice}: no rule in kdlight.config.settings for {unchecked}"
        )


#: The command lines of the README, the Makefile and the configs' comments.
DOCUMENTED = [
    ["experiment=teacher", "demo=cpu", "model=resnet20", "trainer.max_epochs=6"],
    ["experiment=student_baseline", "demo=cpu", "model.width=0.5"],
    [
        "experiment=distill_grid",
        "demo=cpu",
        "model.width=0.5",
        "distill.temperature=[2,8]",
        "distill.alpha=[0.5,0.9]",
    ],
    ["experiment=quick", "data.source=synthetic", "trainer.max_epochs=1"],
    [
        "model=resnet18",
        "model.width=0.25",
        "optimizer.lr=0.05",
        "data.batch_size=256",
        "trainer=gpu",
    ],
    ["experiment=teacher", "speed=fast"],
    ["experiment=teacher", "trainer=ddp", "trainer.devices=4", "trainer.sync_batchnorm=true"],
    ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    ["experiment=distill", "distill.temperature=4", "distill.alpha=0.9"],
    ["experiment=distill_grid"],
    ["experiment=quick", "debug=fast_dev_run"],
]


@pytest.mark.parametrize("overrides", DOCUMENTED, ids=lambda o: " ".join(o)[:60])
def test_documented_commands_pass_the_settings_checks(overrides: list[str], tmp_path: Path):
    validate_settings(compose_config(overrides, tmp_path))


def test_every_cell_of_the_reference_sweep_passes(tmp_path: Path):
    params = OmegaConf.load(config_dir() / "sweep" / "reference_grid.yaml").hydra.sweeper.params
    for temperature in str(params["distill.temperature"]).split(","):
        for alpha in str(params["distill.alpha"]).split(","):
            cell = [f"distill.temperature={temperature}", f"distill.alpha={alpha}"]
            validate_settings(compose_config(["experiment=distill", *cell], tmp_path))


def test_reference_recipe(tmp_path: Path):
    """The defaults are the reference study's recipe."""
    cfg = compose_config(["experiment=teacher"], tmp_path)
    assert cfg.model.name == "resnet18_half"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        0.1,
        0.9,
        5e-4,
    )
    assert list(cfg.scheduler.milestones) == [100, 150] and cfg.scheduler.gamma == 0.1
    assert cfg.trainer.max_epochs == 200 and cfg.data.batch_size == 128
    assert cfg.data.val_size == 0 and cfg.trainer.accelerator == "gpu"


def test_command_line_overrides_reach_every_object(tmp_path: Path):
    cfg = compose_config(
        [*TINY, "model=resnet18", "model.width=0.25", "data.train_subset=50", "optimizer.lr=0.05"],
        tmp_path,
    )
    datamodule, model, module = build(cfg)
    assert model.spec["width"] == 0.25 and datamodule.hparams.train_subset == 50
    assert module.configure_optimizers()["optimizer"].param_groups[0]["lr"] == 0.05


@pytest.mark.slow
def test_configs_found_after_a_regular_install(tmp_path: Path):
    """A non-editable ``pip install .`` carries conf/ as kdlight/conf, and the app finds it."""
    repo = config_dir().parent
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--target",
        str(tmp_path / "site"),
        str(repo),
    ]
    subprocess.run(pip, check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    shown = subprocess.run(
        [sys.executable, "-m", "kdlight.train", "experiment=teacher", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "name: resnet18_half" in shown.stdout
    located = subprocess.run(
        [sys.executable, "-c", "import kdlight; print(kdlight.config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert located.stdout.strip() == str(tmp_path / "site" / "kdlight" / "conf")
