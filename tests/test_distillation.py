"""DistillationModule: the teacher stays frozen, the student learns from it, bad settings
fail early with one clear line."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kdlight.data import CIFAR10DataModule
from kdlight.errors import KDLightError
from kdlight.lit import ClassifierModule, DistillationModule, load_teacher
from kdlight.models import create_model
from tests.conftest import cpu_trainer, synthetic_datamodule


def synthetic_data() -> CIFAR10DataModule:
    return synthetic_datamodule(train=2000, test=500, val=200, batch=100)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet8 teacher trained for a few epochs on synthetic data, as ClassifierModule saves it."""
    root = tmp_path_factory.mktemp("teacher")
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    trainer = cpu_trainer(root, epochs=4, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(ClassifierModule(create_model("resnet8")), datamodule=synthetic_data())
    return root / "checkpoints" / "last.ckpt"


class TeacherModeProbe(Callback):
    """Records the teacher's mode whenever training batches start and validation ends."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.modes.append(module.teacher.training)

    def on_validation_end(self, trainer, module) -> None:
        self.modes.append(module.teacher.training)


def test_teacher_stays_frozen(teacher_checkpoint: Path, tmp_path: Path):
    module = DistillationModule(
        create_model("small_cnn", width=0.5), teacher_checkpoint=str(teacher_checkpoint)
    )
    before = {
        k: v.clone() for k, v in module.teacher.state_dict().items()
    }  # BN statistics included
    probe = TeacherModeProbe()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = cpu_trainer(
        tmp_path, epochs=2, callbacks=[probe, checkpoint], enable_checkpointing=True
    )
    trainer.fit(module, datamodule=synthetic_data())

    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights changed"
    assert probe.modes and not any(probe.modes), "teacher left eval mode"
    assert not any(p.requires_grad for p in module.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}

    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher.") for key in saved["state_dict"]), (
        "teacher saved in student checkpoint"
    )
    restored = DistillationModule.load_from_checkpoint(
        tmp_path / "checkpoints" / "last.ckpt", model=create_model("small_cnn", width=0.5)
    )
    assert all(torch.equal(restored.teacher.state_dict()[k], before[k]) for k in before)
    assert (restored.temperature, restored.alpha) == (module.temperature, module.alpha)


def test_student_learns_the_teachers_predictions(teacher_checkpoint: Path, tmp_path: Path):
    """With alpha=1 and the training labels shuffled, the only signal is the teacher's."""
    L.seed_everything(1)
    datamodule = synthetic_data()
    datamodule.setup("fit")
    labels = datamodule.train_set.labels
    datamodule.train_set.labels = labels[torch.randperm(len(labels))]
    teacher = load_teacher(teacher_checkpoint)
    module = DistillationModule(
        create_model("small_cnn", width=0.5), teacher=teacher, temperature=4.0, alpha=1.0
    )
    cpu_trainer(tmp_path, epochs=4).fit(module, datamodule=datamodule)

    datamodule.setup("test")
    images = datamodule.normalize(datamodule.test_set.images)
    module.eval()
    with torch.no_grad():
        agreement = (module(images).argmax(1) == teacher(images).argmax(1)).float().mean().item()
    assert agreement > 0.5, (
        f"student agrees with the teacher on {agreement:.0%} of test images (chance ~10%)"
    )


def test_report_includes_teacher_and_settings(teacher_checkpoint: Path, tmp_path: Path):
    module = DistillationModule(
        create_model("small_cnn", width=0.5),
        teacher_checkpoint=str(teacher_checkpoint),
        temperature=2.0,
        alpha=0.5,
    )
    trainer = cpu_trainer(tmp_path, epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=synthetic_data())
    trainer.test(module, datamodule=synthetic_data())
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (
        metrics["temperature"] == 2.0
        and metrics["alpha"] == 0.5
        and metrics["teacher_model"] == "resnet8"
    )
    assert metrics["teacher_checkpoint"] == str(teacher_checkpoint.resolve())
    assert 10.0 < metrics["teacher_accuracy"] <= 100.0 and metrics["test_images"] == 500


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": 0.0}, "distill.temperature=0.0 is not allowed: a finite number > 0"),
        ({"temperature": -1.0}, "distill.temperature=-1.0 is not allowed: a finite number > 0"),
        ({"alpha": 1.5}, "distill.alpha=1.5 is not allowed: a number in [0, 1]"),
        ({"alpha": -0.1}, "distill.alpha=-0.1 is not allowed: a number in [0, 1]"),
        (
            {"teacher_checkpoint": "/nope/last.ckpt"},
            "cannot read teacher checkpoint /nope/last.ckpt (no such file); expected a file "
            "written by torch.save",
        ),
        ({"teacher_model": "resnet18_half"}, "holds a resnet8, not a resnet18_half"),
        ({"num_classes": 100}, "predicts 10 classes, the student 100"),
    ],
)
def test_bad_settings_fail_before_training(teacher_checkpoint: Path, settings: dict, message: str):
    kwargs = {"teacher_checkpoint": str(teacher_checkpoint), **settings}
    with pytest.raises(KDLightError, match=None) as caught:
        DistillationModule(
            create_model("small_cnn", num_classes=kwargs.get("num_classes", 10)), **kwargs
        )
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_corrupt_teacher_checkpoint(tmp_path: Path, content: bytes):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(
        KDLightError, match=r"cannot read teacher checkpoint .*\); expected a file written by torch"
    ):
        load_teacher(path)


def test_a_checkpoint_without_its_model_needs_the_teacher_named(tmp_path: Path):
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(KDLightError, match="a Lightning checkpoint that does not record its model"):
        load_teacher(path)
