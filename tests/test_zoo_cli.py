"""The CIFAR-100 KD zoo from the command line: a zoo model on 100 classes, a teacher file
laid out as RepDistiller publishes it, and the zoo's recipes and pairs."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from kdlight.data import CIFAR100_CLASSES
from kdlight.models import create_model, official_state_dict
from tests.conftest import compose_config, finish, start_cli

CIFAR100 = [
    "data=cifar100", "data.source=synthetic", "data.synthetic_train_size=400",
    "data.synthetic_test_size=200", "data.val_size=100", "data.batch_size=50",
    "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
]  # fmt: skip
PAIRS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "pair").glob("*.yaml"))


@pytest.fixture(scope="module")
def zoo_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The runs of the two tests below, by name: the folder each ran in and what it did.
    They are started together, each in its own folder, so that one imports torch while
    the other trains."""
    model, distill = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=100)  # kdlight names it otherwise
    published = {"model": official_state_dict("resnet20", teacher), "epoch": 240}
    torch.save(published, distill / "ckpt_epoch_240.pth")
    args = ["experiment=distill", *CIFAR100, "model=resnet8", "distill.teacher_model=resnet20"]
    args.append(f"distill.teacher_checkpoint={distill / 'ckpt_epoch_240.pth'}")
    runs = {
        "model": (model, start_cli([*CIFAR100, "model=resnet8x4"], model)),
        "distill": (distill, start_cli(args, distill)),
    }
    return {name: (folder, finish(run)) for name, (folder, run) in runs.items()}


@pytest.mark.slow
def test_a_zoo_model_on_cifar100_reports_100_classes(zoo_runs):
    folder, result = zoo_runs["model"]
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (folder / "outputs").rglob("metrics.json")
    per_class = json.loads(metrics.read_text())["per_class_accuracy"]
    assert list(per_class) == list(CIFAR100_CLASSES) and len(per_class) == 100


@pytest.mark.slow
def test_distilling_from_a_published_teacher_file(zoo_runs):
    """``ckpt_epoch_240.pth`` as RepDistiller saves it (the weights under ``model``, its
    module names), read as it is by ``distill.teacher_checkpoint`` and ``teacher_model``."""
    folder, result = zoo_runs["distill"]
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (folder / "outputs").rglob("metrics.json")
    record = json.loads(metrics.read_text())
    assert record["teacher_model"] == "resnet20" and len(record["per_class_accuracy"]) == 100


@pytest.mark.parametrize("pair", PAIRS)
def test_each_pair_composes_with_the_zoo_recipe(pair: str, tmp_path: Path):
    cfg = compose_config(["experiment=zoo_distill", f"pair={pair}", "trainer=cpu"], tmp_path)
    teacher, student = cfg.distill.teacher_model, cfg.model.name
    assert pair == f"{teacher}_{student}" and cfg.num_classes == cfg.model.num_classes == 100
    lightweight = student.startswith(("shuffle", "mobilenet"))
    assert cfg.optimizer.lr == (0.01 if lightweight else 0.05)
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.trainer.max_epochs == 240
    assert cfg.data.batch_size == 64 and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.weight_decay == 5e-4


def test_the_zoo_teacher_recipe_is_found_by_distillation(tmp_path: Path):
    cfg = compose_config(["experiment=zoo_teacher", "model=resnet32x4"], tmp_path)
    assert cfg.name == "teacher" and cfg.model.name == "resnet32x4" and cfg.num_classes == 100
    assert cfg.optimizer.lr == 0.05 and cfg.data._target_.endswith("CIFAR100DataModule")


def test_a_cifar100_student_never_gets_a_cifar10_teacher(tmp_path: Path):
    from kdlight.errors import KDLightError
    from kdlight.teacher.find import find_teacher

    def teacher_run(name: str, classes: int) -> Path:
        run = tmp_path / "teacher" / "resnet20" / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        per_class = {f"class{i}": 50.0 for i in range(classes)}
        (run / "metrics.json").write_text(json.dumps({"per_class_accuracy": per_class}))
        return run

    ten = teacher_run("seed0-aaaaaaaa", 10)
    with pytest.raises(KDLightError, match=r"^no teacher of model resnet20 for 100 classes"):
        find_teacher(tmp_path, "resnet20", num_classes=100)
    hundred = teacher_run("seed0-bbbbbbbb", 100)
    assert find_teacher(tmp_path, "resnet20", num_classes=100).checkpoint.parent.parent == hundred
    assert find_teacher(tmp_path, "resnet20", num_classes=10).checkpoint.parent.parent == ten
