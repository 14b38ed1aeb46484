"""One ``pair=`` drives the CIFAR-100 zoo study: ``experiment=zoo_teacher``, ``zoo_student``
and ``zoo_distill`` of one pair compose the same recipe and data, the student alone is the
baseline ``kdlight-report`` finds for the pair's distilled students, and ``recipe=`` is a
group choice of any experiment."""

from pathlib import Path

import pytest
import torch

from kdlight.analysis.stats import BASELINE_ROLES, DATA_KEYS
from kdlight.config.preflight import check_command_line
from kdlight.errors import KDLightError
from kdlight.lit import load_teacher
from kdlight.models import create_model, official_state_dict
from kdlight.runs.identity import identify, settings
from kdlight.teacher.find import resolve_teacher
from tests.conftest import compose_config

PAIRS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "pair").glob("*.yaml"))
#: What a distilled student has and its baseline lacks: the method and its teacher.
DISTILLATION_ONLY = ("distill.", "distiller.", "module.")


@pytest.mark.parametrize("pair", ["resnet32x4_resnet8x4", "vgg13_mobilenetv2"])
def test_the_zoo_student_alone_is_the_baseline_of_its_distilled_students(pair: str, tmp_path: Path):
    """Same model, data, recipe (a lightweight student's lr 0.01 included) and trainer as
    ``experiment=zoo_distill pair=X``: the two differ only in the distillation's own
    settings, and the run's name is one of the report's baseline roles."""
    alone = compose_config(["experiment=zoo_student", f"pair={pair}"], tmp_path)
    distilled = compose_config(["experiment=zoo_distill", f"pair={pair}"], tmp_path)
    assert alone.name in BASELINE_ROLES and alone.module._target_.endswith("ClassifierModule")
    assert alone.model.name == distilled.model.name == pair.split("_")[-1]
    mine, theirs = settings(alone), settings(distilled, teacher="resnet32x4/seed0-x")
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    assert differ and all(k.startswith(DISTILLATION_ONLY) for k in differ), differ
    assert all(mine.get(k) == theirs.get(k) for k in DATA_KEYS)
    assert alone.data._target_.endswith("CIFAR100DataModule") and alone.num_classes == 100


def test_the_recipe_is_a_group_choice_of_any_experiment(tmp_path: Path):
    """``recipe=cifar_kd`` without ``+`` on an experiment that picks no recipe gives the
    zoo's recipe; the choice itself is no setting of the run: the reference teacher with the
    recipe is the same run as ``experiment=zoo_teacher model=resnet18_half``."""
    cfg = compose_config(["experiment=student_baseline", "recipe=cifar_kd"], tmp_path)
    assert cfg.data._target_.endswith("CIFAR100DataModule") and cfg.optimizer.lr == 0.05
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.trainer.max_epochs == 240
    assert cfg.data.batch_size == 64 and cfg.model.name == "small_cnn"
    teacher = compose_config(["experiment=teacher", "recipe=cifar_kd"], tmp_path)
    zoo = compose_config(["experiment=zoo_teacher", "model=resnet18_half"], tmp_path)
    assert settings(teacher) == settings(zoo)


@pytest.mark.parametrize(
    "pair", ["resnet32x4_resnet8x4", "vgg13_mobilenetv2", "wrn_40_2_shufflev1"]
)
def test_the_zoo_teacher_of_a_pair_is_the_run_its_students_find(pair: str, tmp_path: Path):
    """``experiment=zoo_teacher pair=X`` trains X's teacher (``distill.teacher_model``) with
    the recipe's lr, not a lightweight student's, and is the very run of
    ``experiment=zoo_teacher model=<teacher>``: same identity and folder, under
    ``teacher/<teacher>/`` where ``experiment=zoo_distill pair=X`` looks."""
    by_pair = compose_config(["experiment=zoo_teacher", f"pair={pair}"], tmp_path)
    student = compose_config(["experiment=zoo_distill", f"pair={pair}"], tmp_path)
    teacher = student.distill.teacher_model
    by_model = compose_config(["experiment=zoo_teacher", f"model={teacher}"], tmp_path)
    assert by_pair.model.name == teacher and by_pair.optimizer.lr == 0.05
    assert by_pair.module._target_.endswith("ClassifierModule") and by_pair.num_classes == 100
    assert identify(by_pair).id == identify(by_model).id
    assert identify(by_pair).folder.startswith(f"{teacher}/seed0-") and by_pair.name == "teacher"
    assert settings(by_pair)["data._target_"] == settings(student)["data._target_"]


def test_a_missing_zoo_teacher_names_the_command_that_trains_it(tmp_path: Path):
    """No finished teacher: the line names ``experiment=zoo_teacher pair=X`` for a zoo
    pair, ``experiment=zoo_teacher model=M`` for another CIFAR-100 student, and the
    reference ``experiment=teacher`` (a 10-class teacher) for a CIFAR-10 one."""

    def missing(*overrides: str) -> str:
        cfg = compose_config([*overrides, f"paths.root={tmp_path}"], tmp_path)
        with pytest.raises(KDLightError) as caught:
            resolve_teacher(cfg)
        return str(caught.value)

    assert missing("experiment=zoo_distill", "pair=vgg13_mobilenetv2").endswith(
        "train it first (kdlight-train experiment=zoo_teacher pair=vgg13_mobilenetv2, "
        "same paths.root)"
    )
    other = missing("experiment=zoo_distill", "model=resnet8", "distill.teacher_model=resnet20")
    assert "(kdlight-train experiment=zoo_teacher model=resnet20 with the same data" in other
    assert "(kdlight-train experiment=teacher model=resnet18_half," in missing("experiment=distill")


def test_a_cifar100_teacher_file_on_cifar10_data_says_to_add_data_cifar100(tmp_path: Path):
    """A published ``ckpt_epoch_240.pth`` of 100 classes read for a 10-class student: the
    line says which data the file's teacher was trained for."""
    torch.manual_seed(0)
    published = official_state_dict("resnet8", create_model("resnet8", num_classes=100))
    torch.save({"model": published, "epoch": 240}, tmp_path / "ckpt_epoch_240.pth")
    with pytest.raises(KDLightError) as caught:
        load_teacher(tmp_path / "ckpt_epoch_240.pth", "resnet8", num_classes=10)
    assert str(caught.value).endswith(
        "(the file's teacher predicts 100 classes, this data 10: add data=cifar100)"
    )


@pytest.mark.parametrize("experiment", ["student_baseline", "teacher"])
def test_a_group_choice_the_experiment_does_not_pick_says_so(experiment: str, tmp_path: Path):
    """``pair=`` on an experiment without a pair: one line that it is a config group, which
    experiments pick it, and the ``+`` that adds it (Hydra's own words were "unknown
    setting 'pair' (did you mean 'pair'?)")."""
    with pytest.raises(KDLightError) as caught:
        check_command_line([f"experiment={experiment}", "pair=vgg13_vgg8", "--cfg", "job"])
    assert str(caught.value) == (
        "pair is a config group this config does not pick (it comes with "
        "experiment=zoo_distill, experiment=zoo_student, experiment=zoo_teacher: pick one of "
        "those), or add it: +pair=vgg13_vgg8"
    )
