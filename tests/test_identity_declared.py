"""Run identity cannot drift silently (kdlight.runs.identity): every key of every shipped
config is declared a result setting or not one, so a new key is a decision, not a silent
change of every run id; and the run ids of the shipped experiments stay those that
finished runs on disk carry."""

from pathlib import Path

import pytest

from kdlight import config_dir
from kdlight.runs.identity import NOT_RESULTS, RESULTS, identify, is_distillation, undeclared
from tests.conftest import compose_config

CONF = config_dir()

#: Groups whose every choice is composed, each into one of the shipped experiments. The
#: model files are not: a model's keys are all under ``model``, declared whole.
GROUPS = ("data", "logger", "trainer", "optimizer", "scheduler", "recipe", "speed", "demo",
          "debug", "sweep")  # fmt: skip


def choices(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def shipped_configs() -> list[list[str]]:
    """Overrides that compose every shipped experiment and zoo pair (with ``distiller=dkd``
    where the pair has DKD settings of its own) and, spread over them, every distiller and
    every choice of :data:`GROUPS`: each choice once, in as few compositions as that takes."""
    pairs = choices("pair")
    runs = [[f"experiment={name}"] for name in choices("experiment") if not name.startswith("zoo")]
    runs += [["experiment=zoo_teacher", f"pair={pairs[0]}"]]
    runs += [["experiment=zoo_student", f"pair={pairs[1]}"]]
    for pair in pairs:
        runs.append(["experiment=zoo_distill", f"pair={pair}"])
        if (CONF / "pair" / pair / "dkd.yaml").is_file():  # the pair's own DKD settings
            runs[-1].append("distiller=dkd")
    methods = [run for run in runs if run[0].endswith("distill") and "distiller=dkd" not in run]
    spread(runs, methods, "distiller", [name for name in choices("distiller") if name != "dkd"])
    for group in GROUPS:
        spread(runs, runs, group, choices(group))
    return runs


def spread(runs: list[list[str]], into: list[list[str]], group: str, values: list[str]) -> None:
    """``group=<value>`` for each of ``values`` added to one run of ``into`` after another,
    and a new ``experiment=distill`` run (in ``runs`` too) where ``into`` has too few."""
    for i, value in enumerate(values):
        if i == len(into):
            into.append(["experiment=distill"])
            if into is not runs:
                runs.append(into[-1])
        into[i].append(f"{group}={value}")


def assert_declared(overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_config(overrides, tmp_path)
    command = " ".join(["kdlight-train", *overrides])
    assert not undeclared(cfg), "\n".join(
        f"{key} ({command}) is neither a result setting nor declared as not one: add it to "
        "kdlight.runs.identity.RESULTS if it can change a run's numbers, else to "
        "kdlight.runs.identity.NOT_RESULTS"
        for key in undeclared(cfg)
    )


@pytest.mark.parametrize("overrides", shipped_configs(), ids=" ".join)
def test_every_key_of_a_shipped_config_is_declared(overrides: list[str], tmp_path: Path):
    assert_declared(overrides, tmp_path)


def test_every_shipped_choice_is_composed():
    composed = {override for run in shipped_configs() for override in run}
    for group in ("experiment", "pair", "distiller", *GROUPS):
        assert {f"{group}={choice}" for choice in choices(group)} <= composed, group


def test_an_undeclared_key_fails_by_name_and_counts_as_a_result(tmp_path: Path):
    teacher = ["experiment=teacher"]
    new_key = [*teacher, "+data.prefetch_factor=2"]
    with pytest.raises(AssertionError) as failure:
        assert_declared(new_key, tmp_path)
    assert (
        "data.prefetch_factor (kdlight-train experiment=teacher +data.prefetch_factor=2) is "
        "neither a result setting nor declared as not one: add it to "
        "kdlight.runs.identity.RESULTS if it can change a run's numbers, else to "
        "kdlight.runs.identity.NOT_RESULTS"
    ) in str(failure.value)
    assert_declared([*teacher, "+model.depth=3"], tmp_path)  # in a group declared whole
    # until it is declared, it is a result: a new run rather than two runs in one folder
    plain = identify(compose_config(teacher, tmp_path))
    assert identify(compose_config(new_key, tmp_path)).id != plain.id


def test_no_key_is_declared_on_both_sides():
    assert not set(RESULTS) & set(NOT_RESULTS)


#: The folders of the shipped experiments (teacher ``T`` for a distillation), as the code
#: before the declarations named them: every finished run is found by its folder, so a
#: change here orphans them all.
FOLDERS = {
    "experiment=teacher": "resnet18_half/seed0-09c6ab6e",
    "experiment=student_baseline": "small_cnn/seed0-aa051cf5",
    "experiment=quick": "small_cnn/seed0-d57bf756",
    "experiment=distill": "small_cnn/T4_alpha0.9/seed0-9cbd0afe",
    "experiment=distill distiller=dkd": "small_cnn/dkd_T4_alpha1_beta8/seed0-1560e725",
    "experiment=distill_grid": "small_cnn/seed0-9a1816ab",
    "experiment=method_grid": "small_cnn/seed0-ca808328",  # DIST, CTKD, TTM, WTTM, MLKD, NST, KDSVD, CC
    "experiment=zoo_teacher pair=resnet32x4_resnet8x4": "resnet32x4/seed0-45d96b3f",
    "experiment=zoo_student pair=resnet32x4_resnet8x4": "resnet8x4/seed0-03ddeae5",
    "experiment=zoo_distill pair=vgg13_mobilenetv2 distiller=dkd": (
        "mobilenetv2/dkd_T4_alpha1_beta6/seed0-a23e00bf"
    ),
}


@pytest.mark.parametrize("command", FOLDERS)
def test_the_shipped_experiments_keep_their_run_ids(command: str, tmp_path: Path):
    cfg = compose_config(command.split(), tmp_path)
    assert identify(cfg, "T" if is_distillation(cfg) else None).folder == FOLDERS[command]
