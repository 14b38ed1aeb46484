"""One ``pair=`` drives the CIFAR-100 zoo study: ``experiment=zoo_teacher``, ``zoo_student``
and ``zoo_distill`` of one pair compose the same recipe and data, the student alone is the
baseline ``kdlight-report`` finds for the pair's distilled students, and ``recipe=`` is a
group choice of any experiment."""

from pathlib import Path

import pytest

from kdlight.runs import settings
from kdlight.stats import BASELINE_ROLES, DATA_KEYS
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
