"""A run is its config (kdlight.runs.identity): directories named by every result-changing setting,
seeds as a sweep axis, checkpoints resumed only by their own run, teachers found by model."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdlight.errors import KDLightError
from kdlight.runs.identity import (
    check_checkpoint_owner,
    group_key,
    identify,
    is_debug,
    settings,
)
from kdlight.teacher.find import find_teacher
from kdlight.trainer.callbacks import RecordRunIdentity
from tests.conftest import compose_config


def folder(overrides: list[str], tmp_path: Path, teacher: str | None = None) -> str:
    return identify(compose_config(overrides, tmp_path), teacher).folder


BASE = ["experiment=student_baseline", "trainer=cpu", "data=synthetic", "model=resnet8"]


def test_the_folder_is_readable_first_and_unique_after(tmp_path: Path):
    name = folder(BASE, tmp_path)
    model, leaf = name.split("/")
    assert model == "resnet8" and leaf.startswith("seed0-") and len(leaf) == len("seed0-") + 8
    assert folder(BASE, tmp_path) == name  # the same command is the same run


@pytest.mark.parametrize(
    "change",
    [
        ["seed=1"],
        ["trainer.max_epochs=2"],
        ["optimizer=adamw"],
        ["optimizer.lr=0.01"],
        ["data.val_size=100"],
        ["data.train_subset=100"],
        ["trainer.precision=bf16-mixed"],
        ["scheduler=cosine"],
        ["model.width=0.5"],
        ["test_ckpt=best"],
    ],
)
def test_every_result_changing_setting_is_a_new_run(tmp_path: Path, change: list[str]):
    assert folder([*BASE, *change], tmp_path) != folder(BASE, tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        ["logger=tensorboard"],
        ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"],
        ["trainer.log_every_n_steps=7"],
        ["data.num_workers=2"],
        ["data.eval_batch_size=50"],
        ["callbacks.last_checkpoint.every_n_train_steps=3"],
        ["paths.data_dir=/elsewhere"],
        ["module.channels_last=true"],
    ],
)
def test_where_and_how_things_are_shown_is_the_same_run(tmp_path: Path, change: list[str]):
    assert folder([*BASE, *change], tmp_path) == folder(BASE, tmp_path)


def test_numbers_are_spelled_one_way(tmp_path: Path):
    distill = ["experiment=distill", "trainer=cpu", "data=synthetic"]
    four = folder([*distill, "distill.temperature=4"], tmp_path, "t")
    assert four == folder([*distill, "distill.temperature=4.0"], tmp_path, "t")
    assert "/T4_alpha0.9/seed0-" in four
    grid = ["experiment=distill_grid", "trainer=cpu", "data=synthetic"]
    assert folder([*grid, "distill.temperature=[2,8]"], tmp_path, "t") == folder(
        [*grid, "distill.temperature=[8.0,2.0]"], tmp_path, "t"
    )


def test_the_teacher_is_part_of_a_distillation_run(tmp_path: Path):
    distill = ["experiment=distill", "trainer=cpu", "data=synthetic"]
    assert folder(distill, tmp_path, "resnet8/seed0-aaaaaaaa") != folder(
        distill, tmp_path, "resnet8/seed1-bbbbbbbb"
    )
    assert folder(distill, tmp_path, "x") != folder(
        [*distill, "distill.teacher_model=resnet20"], tmp_path, "x"
    )


def test_seeds_of_a_grid_are_separate_runs_and_cells_group_with_separate_runs(tmp_path: Path):
    grid = ["experiment=distill_grid", "trainer=cpu", "data=synthetic"]
    grid += ["distill.temperature=[2,8]", "distill.alpha=[0.5]"]
    assert folder([*grid, "seed=0"], tmp_path, "t") != folder([*grid, "seed=1"], tmp_path, "t")
    cell = settings(compose_config(grid, tmp_path), "t")
    single = ["experiment=distill", "trainer=cpu", "data=synthetic"]
    separate = settings(
        compose_config([*single, "distill.temperature=8", "distill.alpha=0.5"], tmp_path), "t"
    )
    assert group_key(cell, 8, 0.5) == group_key(separate, 8.0, 0.5)
    assert group_key(cell, 2, 0.5) != group_key(separate, 8, 0.5)
    assert "seed" not in cell


@pytest.mark.parametrize(
    "debug",
    [
        ["debug=fast_dev_run"],
        ["debug=limit_batches"],
        ["trainer.limit_train_batches=3"],
        ["trainer.limit_test_batches=0.5"],
    ],
)
def test_debug_runs_have_folders_of_their_own(tmp_path: Path, debug: list[str]):
    cfg = compose_config([*BASE, *debug], tmp_path)
    assert is_debug(cfg) and identify(cfg).folder.endswith("-debug")
    assert not is_debug(compose_config(BASE, tmp_path))


def test_an_evaluation_is_named_by_the_checkpoint_it_reads(tmp_path: Path):
    first, second = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    cfg = compose_config([*BASE, "train=false"], tmp_path)
    one, two = identify(cfg, evaluated=first), identify(cfg, evaluated=second)
    assert one.folder.startswith("resnet8/eval-") and one.folder != two.folder
    assert identify(cfg, evaluated=first).folder == one.folder


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path):
    mine = identify(compose_config(BASE, tmp_path))
    theirs = identify(compose_config([*BASE, "optimizer.lr=0.2", "seed=7"], tmp_path))
    state: dict = {}
    RecordRunIdentity(theirs).on_save_checkpoint(None, None, state)
    check_checkpoint_owner(Path("last.ckpt"), state, theirs)  # its own run takes it
    with pytest.raises(
        KDLightError, match=r"belongs to another run \(it differs in seed, optimizer.lr\)"
    ):
        check_checkpoint_owner(Path("last.ckpt"), state, mine)
    with pytest.raises(KDLightError, match="belongs to another run"):
        check_checkpoint_owner(Path("last.ckpt"), {"state_dict": {}}, mine)  # no id at all


def _teacher_run(root: Path, model: str, name: str, record: dict | None) -> Path:
    run = root / "teacher" / model / name
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    if record is not None:
        (run / "metrics.json").write_text(json.dumps(record))
    return run


def test_the_finished_teacher_is_found_by_its_model(tmp_path: Path):
    with pytest.raises(KDLightError, match="no teacher of model resnet8 .*experiment=teacher"):
        find_teacher(tmp_path, "resnet8")
    _teacher_run(tmp_path, "resnet8", "seed0-11111111", None)  # unfinished
    _teacher_run(tmp_path, "resnet8", "seed0-22222222-debug", {"run": {"debug": True}})
    with pytest.raises(KDLightError, match="no finished teacher .*unfinished: .*seed0-11111111"):
        find_teacher(tmp_path, "resnet8")

    old = _teacher_run(tmp_path, "resnet8", "seed0-33333333", {"accuracy": 50.0})
    os.utime(old / "metrics.json", (time.time() - 100, time.time() - 100))
    found = find_teacher(tmp_path, "resnet8")
    assert found.checkpoint == old / "checkpoints" / "last.ckpt"
    assert found.identity == "resnet8/seed0-33333333"

    new = _teacher_run(tmp_path, "resnet8", "seed1-44444444", {"accuracy": 60.0})
    found = find_teacher(tmp_path, "resnet8")
    assert found.checkpoint.parent.parent == new  # the newest finished one, and it says so
    assert "the newest of 2" in found.note and str(old) in found.note


def test_settings_are_flat_and_free_of_paths(tmp_path: Path):
    flat = settings(compose_config(BASE, tmp_path))
    assert flat["model.name"] == "resnet8" and flat["optimizer.lr"] == 0.1
    assert not any(key.startswith(("paths.", "logger.", "hydra.")) for key in flat)
    assert "data.data_dir" not in flat and "trainer.default_root_dir" not in flat
    assert json.loads(json.dumps(flat)) == flat  # stored as JSON in metrics.json
    assert OmegaConf.create(flat)  # and plain values only


def test_an_unreadable_metrics_json_is_never_a_finished_run(tmp_path: Path):
    """A metrics.json cut short (a full disk, a kill in an old kdlight) is not taken as
    "finished": the run goes on from its last.ckpt and writes a whole one."""
    from kdlight.train import train

    run_dir = tmp_path / "run"
    tiny = [*BASE, "data.synthetic_train_size=200", "data.synthetic_test_size=100"]
    cfg = compose_config([*tiny, "trainer.max_epochs=1", "data.batch_size=100"], run_dir)
    first = train(cfg)
    metrics = run_dir / "metrics.json"
    metrics.write_text("")  # what an in-place write left on a full disk
    again = train(cfg)
    assert again["accuracy"] == first["accuracy"]
    assert json.loads(metrics.read_text())["run"]["id"] == identify(cfg).id
