"""What the Lightning systems must get right beyond training: the best validation accuracy
across a resume, each grid cell tested at its own best epoch, the teacher's test result
reused, strict and labelled metrics.json, the frozen teacher's eval-mode notice, the
top-level API and a student loaded without its teacher."""

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import kdlight
from kdlight.data import CIFAR10DataModule
from kdlight.errors import KDLightError
from kdlight.lit import (
    ClassifierModule,
    DistillationGridModule,
    DistillationModule,
    freeze,
    load_model,
)
from kdlight.models import create_model
from kdlight.trainer.callbacks import SaveLastCheckpoint
from tests.conftest import cpu_trainer, synthetic_datamodule


def tiny_data(**overrides) -> CIFAR10DataModule:
    """97 validation images: not a multiple of 10 classes, so some class is rarer than another."""
    return synthetic_datamodule(train=400, test=100, val=97, batch=50, **overrides)


class NamedTestSet(CIFAR10DataModule):
    """A datamodule that names its test set, as ``CIFAR10DataModule.test_set_id`` does."""

    def __init__(self, test_set_id: str, **kwargs) -> None:
        self._given_test_set_id = test_set_id
        super().__init__(**kwargs)

    @property
    def test_set_id(self) -> str:
        return self._given_test_set_id

    @test_set_id.setter
    def test_set_id(self, value: str) -> None:
        """The name given here wins over one that ``CIFAR10DataModule`` sets itself."""


def named_data(test_set_id: str = "synthetic-100") -> NamedTestSet:
    return NamedTestSet(
        test_set_id, source="synthetic", synthetic_train_size=400, synthetic_test_size=100,
        val_size=97, batch_size=50,
    )  # fmt: skip


def strict_json(path: Path) -> dict:
    """metrics.json read as strict JSON: NaN or Infinity fail."""

    def refuse(constant: str):
        raise ValueError(f"{path} is not strict JSON: it holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def predict_always(model: nn.Module, label: int) -> None:
    """Make a ``small_cnn`` predict ``label`` for every image: a zero last layer, one-hot bias."""
    head = model.head[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[label] = 1.0


def students(module: L.LightningModule) -> list[nn.Module]:
    return list(module.students) if isinstance(module, DistillationGridModule) else [module.model]


def val_label_counts(datamodule: CIFAR10DataModule) -> torch.Tensor:
    datamodule.setup("fit")
    return torch.bincount(torch.as_tensor(datamodule.val_set.labels), minlength=10)


class ValidateAs(Callback):
    """Before validation of epoch ``e``, each student ``i`` is made to predict
    ``labels[i][e]`` (when given): validation accuracies, and so best epochs, are chosen."""

    def __init__(self, labels: list[list[int | None]]) -> None:
        self.labels = labels

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for student, labels in zip(students(module), self.labels, strict=True):
            label = labels[min(trainer.current_epoch, len(labels) - 1)]
            if label is not None:
                predict_always(student, label)


def small_grid(**kwargs) -> DistillationGridModule:
    return DistillationGridModule(
        create_model("small_cnn", width=0.25), teacher=freeze(create_model("resnet8")),
        temperature=[2.0], alpha=[0.5, 0.9], **kwargs,
    )  # fmt: skip


# ------------------------------------------------------------ 1. val_acc_best across resume
@pytest.mark.parametrize("system", ["classifier", "grid"])
def test_resumed_run_reports_the_best_of_the_whole_run(system: str, tmp_path: Path):
    """At epoch 0 every student predicts the commonest validation class, from epoch 1 on
    the rarest, so the best epoch is 0. A run resumed from epoch 1's checkpoint must report
    epoch 0's accuracy as its best, like the run that was never interrupted."""
    counts = val_label_counts(tiny_data())
    common, rare = int(counts.argmax()), int(counts.argmin())
    sabotage = ValidateAs([[common, rare]] * (1 if system == "classifier" else 2))

    def make() -> L.LightningModule:
        L.seed_everything(0)
        if system == "classifier":
            return ClassifierModule(create_model("small_cnn", width=0.25))
        return small_grid()

    def run(root: Path, resume: Path | None = None) -> dict[str, float]:
        """Fit and test; the best accuracies logged at the end of fit."""
        module = make()
        every_epoch = ModelCheckpoint(root / "checkpoints", "{epoch}", save_top_k=-1)
        trainer = cpu_trainer(
            root, epochs=3, callbacks=[sabotage, every_epoch], enable_checkpointing=True
        )
        trainer.fit(module, datamodule=tiny_data(), ckpt_path=resume)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if "acc_best" in k}
        trainer.test(module, datamodule=tiny_data())
        return logged

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=tmp_path / "whole/checkpoints/epoch=1.ckpt")

    rarest_share = 100.0 * float(counts.min()) / 97
    cells = [""] if system == "classifier" else ["T2_alpha0.5", "T2_alpha0.9"]
    for cell in cells:
        expected = strict_json(tmp_path / "whole" / cell / "metrics.json")["val_acc_best"]
        got = strict_json(tmp_path / "resumed" / cell / "metrics.json")["val_acc_best"]
        assert expected > rarest_share + 1.0, "premise: epoch 0 beats the sabotaged epochs"
        assert got == pytest.approx(expected, abs=1e-9), cell or "the model"
    assert len(whole) == len(cells) and resumed == pytest.approx(whole, abs=1e-9)


# ------------------------------------------------ 2. each grid cell at its own best epoch
def test_each_grid_cell_is_tested_at_its_own_best_epoch(tmp_path: Path):
    """Cell 0 validates best at epoch 0, cell 1 at epoch 1 (the grid's mean is the same in
    both epochs, so the grid's one best.ckpt could serve only one of them)."""
    counts = val_label_counts(tiny_data())
    common, rare = int(counts.argmax()), int(counts.argmin())
    L.seed_everything(0)
    grid = small_grid()
    grid.test_weights = "best"
    last = SaveLastCheckpoint(tmp_path / "checkpoints", every_n_train_steps=0)
    trainer = cpu_trainer(
        tmp_path, epochs=2, enable_checkpointing=True,
        callbacks=[ValidateAs([[common, rare], [rare, common]]), last],
    )  # fmt: skip
    trainer.fit(grid, datamodule=tiny_data())
    assert grid.best_epochs == {grid.names[0]: 0, grid.names[1]: 1}

    trainer.test(grid, datamodule=tiny_data())
    for name in grid.names:  # both tested with the weights that predict `common`
        metrics = strict_json(tmp_path / name / "metrics.json")
        assert metrics["tested_weights"] == "best"
        assert metrics["per_class_accuracy"][CIFAR10DataModule.classes[common]] == 100.0
        assert sum(v for v in metrics["per_class_accuracy"].values() if v) == 100.0
    # the last weights are back after the test: cell 0 ended predicting `rare`
    assert int(grid.students[0].head[-1].bias.argmax()) == rare

    # a grid restored from its last.ckpt still knows each cell's best weights
    restored = small_grid()
    restored.test_weights = "best"
    tester = cpu_trainer(tmp_path / "again", epochs=1)
    tester.test(restored, datamodule=tiny_data(), ckpt_path=tmp_path / "checkpoints/last.ckpt")
    for name, summary in restored.test_summaries.items():
        assert summary["per_class_accuracy"][CIFAR10DataModule.classes[common]] == 100.0, name

    # with the last weights each cell is tested as it ended
    restored.test_weights = "last"
    tester.test(restored, datamodule=tiny_data(), ckpt_path=tmp_path / "checkpoints/last.ckpt")
    first = strict_json(tmp_path / "again" / grid.names[0] / "metrics.json")
    assert first["tested_weights"] == "last"
    assert first["per_class_accuracy"][CIFAR10DataModule.classes[rare]] == 100.0


def test_grid_refuses_unknown_test_weights(tmp_path: Path):
    grid = small_grid()
    grid.test_weights = "middle"
    with pytest.raises(KDLightError, match="test_ckpt=middle is not allowed: one of best, last"):
        cpu_trainer(tmp_path, epochs=1).test(grid, datamodule=tiny_data())


# --------------------------------------------------------- 4. the teacher's own test result
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished teacher run: checkpoints/last.ckpt and the metrics.json of its test."""
    root = tmp_path_factory.mktemp("teacher-run")
    L.seed_everything(0)
    teacher = ClassifierModule(create_model("resnet8"))
    last = SaveLastCheckpoint(root / "checkpoints", every_n_train_steps=0)
    trainer = cpu_trainer(root, epochs=1, callbacks=[last], enable_checkpointing=True)
    trainer.fit(teacher, datamodule=named_data())
    trainer.test(teacher, datamodule=named_data())
    return root


class CountCalls:
    """A forward hook that counts the images a module sees."""

    def __init__(self, module: nn.Module) -> None:
        self.images = 0
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        self.images += len(inputs[0])


@pytest.mark.parametrize("same_test_set", [True, False])
def test_teacher_accuracy_is_reused_from_its_run(
    teacher_run: Path, same_test_set: bool, tmp_path: Path
):
    teacher_metrics = strict_json(teacher_run / "metrics.json")
    assert teacher_metrics["test_set"] == "synthetic-100"
    assert teacher_metrics["tested_weights"] == "last"

    module = DistillationModule(
        create_model("small_cnn", width=0.25),
        teacher_checkpoint=str(teacher_run / "checkpoints" / "last.ckpt"),
    )
    trainer = cpu_trainer(tmp_path, epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, datamodule=named_data())
    teacher_images = CountCalls(module.teacher)
    trainer.test(module, datamodule=named_data("synthetic-100" if same_test_set else "other"))

    metrics = strict_json(tmp_path / "metrics.json")
    if same_test_set:
        assert teacher_images.images == 0, "the teacher was tested again"
        assert metrics["teacher_accuracy_from"] == str((teacher_run / "metrics.json").resolve())
        assert metrics["teacher_accuracy"] == teacher_metrics["accuracy"]
    else:
        assert teacher_images.images == 100
        assert metrics["teacher_accuracy_from"] == "measured"
        # the same images after all: the measured accuracy is the recorded one
        assert metrics["teacher_accuracy"] == pytest.approx(teacher_metrics["accuracy"])
    assert 100.0 * float(trainer.callback_metrics["test/teacher_acc"]) == pytest.approx(
        teacher_metrics["accuracy"], abs=1e-4
    )


def test_teacher_is_measured_when_its_test_saw_the_best_weights(teacher_run: Path, tmp_path):
    run = tmp_path / "teacher"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(
        (teacher_run / "checkpoints" / "last.ckpt").read_bytes()
    )
    recorded = strict_json(teacher_run / "metrics.json") | {"tested_weights": "best"}
    (run / "metrics.json").write_text(json.dumps(recorded))
    module = DistillationModule(
        create_model("small_cnn", width=0.25),
        teacher_checkpoint=str(run / "checkpoints" / "last.ckpt"),
    )
    cpu_trainer(tmp_path, epochs=1).test(module, datamodule=named_data())
    assert strict_json(tmp_path / "metrics.json")["teacher_accuracy_from"] == "measured"


# ------------------------------------------------------------- 5, 6. what metrics.json says
def test_metrics_json_is_strict_and_says_what_was_measured(tmp_path: Path, capsys):
    datamodule = named_data()
    datamodule.setup("test")
    absent = 3  # a class without test images
    keep = datamodule.test_set.labels != absent
    datamodule.test_set.images = datamodule.test_set.images[keep]
    datamodule.test_set.labels = datamodule.test_set.labels[keep]

    module = ClassifierModule(create_model("small_cnn", width=0.25))
    module.run_record = {"id": "0123abcd", "seed": 0, "debug": False, "settings": {"a.b": 1}}
    best = ModelCheckpoint(tmp_path / "checkpoints", "best", monitor="val/acc", mode="max")
    trainer = cpu_trainer(tmp_path, epochs=1, callbacks=[best], enable_checkpointing=True)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)

    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["per_class_accuracy"][CIFAR10DataModule.classes[absent]] is None
    assert metrics["test_images"] == int(keep.sum())
    assert "Accuracy of   cat : n/a (no test images)" in capsys.readouterr().out
    assert (metrics["validation"], metrics["test_set"]) == ("held_out", "synthetic-100")
    assert metrics["tested_weights"] == "last"
    assert metrics["run"] == module.run_record and list(metrics)[-1] == "run"

    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    assert strict_json(tmp_path / "metrics.json")["tested_weights"] == "best"


def test_validation_on_the_test_set_is_labelled(tmp_path: Path):
    """val_size=0 validates on the test set: val_acc_best is then a test accuracy."""
    datamodule = synthetic_datamodule(train=300, test=100, val=0, batch=50)
    trainer = cpu_trainer(tmp_path, epochs=1)
    module = DistillationModule(
        create_model("small_cnn", width=0.25), teacher=create_model("resnet8")
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["validation"] == "test_set" and metrics["val_acc_best"] is not None
    assert metrics["teacher_accuracy_from"] == "measured" and "run" not in metrics


# ---------------------------------------------------------------- 7. the eval-mode notice
def fit_distillation(tmp_path: Path, student_in_eval: bool) -> list[str]:
    module = DistillationModule(
        create_model("small_cnn", width=0.25), teacher=create_model("resnet8")
    )
    if student_in_eval:
        module.student.head.eval()
    trainer = cpu_trainer(tmp_path, epochs=1, limit_train_batches=1, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        trainer.fit(module, datamodule=tiny_data())
        assert warnings.filters == filters, "a warnings filter outlived the fit"
    return [str(w.message) for w in caught if "in eval mode" in str(w.message)]


def test_frozen_teacher_is_announced_once_in_kdlights_words(tmp_path: Path, caplog):
    teacher_modules = len(list(create_model("resnet8").modules()))
    with caplog.at_level(logging.INFO, logger="kdlight"):
        assert fit_distillation(tmp_path, student_in_eval=False) == []
    notices = [r.getMessage() for r in caplog.records if "teacher frozen" in r.getMessage()]
    assert notices == [f"teacher frozen: {teacher_modules} modules in eval mode, no gradients"]


def test_a_student_left_in_eval_mode_is_still_warned_about(tmp_path: Path):
    teacher_modules = len(list(create_model("resnet8").modules()))
    found = fit_distillation(tmp_path, student_in_eval=True)
    assert len(found) == 1 and found[0].startswith(f"Found {teacher_modules + 4} module(s)")


# -------------------------------------------------------------------- 8. the public API
PUBLIC_API = """
import sys
import kdlight
assert "torch" not in sys.modules, "import kdlight imported torch"  # Hydra's resolver needs none
from kdlight import (
    CIFAR10DataModule, ClassifierModule, DistillationModule, DistillationGridModule, kd_loss,
    create_model, load_teacher, load_model,
)
import kdlight.data, kdlight.lit, kdlight.losses, kdlight.models
assert (CIFAR10DataModule, create_model, kd_loss) == (
    kdlight.data.CIFAR10DataModule, kdlight.models.create_model, kdlight.losses.kd_loss
)
assert (ClassifierModule, DistillationModule, DistillationGridModule) == (
    kdlight.lit.ClassifierModule, kdlight.lit.DistillationModule, kdlight.lit.DistillationGridModule
)
assert (load_teacher, load_model) == (kdlight.lit.load_teacher, kdlight.lit.load_model)
print("ok")
"""


def test_top_level_package_hands_on_the_public_api():
    """In a fresh interpreter, as a user's script or notebook starts."""
    result = subprocess.run([sys.executable, "-c", PUBLIC_API], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-2000:]
    for name in kdlight.__all__:
        assert getattr(kdlight, name) is not None and name in dir(kdlight)
    assert kdlight.config_dir().is_dir()
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        kdlight.nothing_here  # noqa: B018


# ------------------------------------------------------- 9. a student without its teacher
def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_a_distilled_student_loads_without_its_teacher(teacher_run: Path, tmp_path: Path):
    teacher_copy = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    teacher_copy.parent.mkdir(parents=True)
    teacher_copy.write_bytes((teacher_run / "checkpoints" / "last.ckpt").read_bytes())
    L.seed_everything(0)
    module = DistillationModule(
        create_model("small_cnn", width=0.25), teacher_checkpoint=str(teacher_copy)
    )
    last = SaveLastCheckpoint(tmp_path / "checkpoints", every_n_train_steps=0)
    trainer = cpu_trainer(
        tmp_path, epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[last],
        enable_checkpointing=True,
    )  # fmt: skip
    trainer.fit(module, datamodule=tiny_data())
    teacher_copy.unlink()  # the teacher is gone: only the student's checkpoint is left

    student = load_model(tmp_path / "checkpoints" / "last.ckpt")
    images = torch.randn(8, 3, 32, 32)
    assert not student.training and student.spec == module.student.spec
    torch.testing.assert_close(logits(student, images), logits(module, images), rtol=0, atol=0)
    with pytest.raises(KDLightError, match="holds one model, not a grid"):
        load_model(tmp_path / "checkpoints" / "last.ckpt", cell="T4_alpha0.9")


def test_a_grid_cell_and_a_classifier_load_alone(tmp_path: Path):
    L.seed_everything(0)
    grid = small_grid()
    last = SaveLastCheckpoint(tmp_path / "checkpoints", every_n_train_steps=0)
    trainer = cpu_trainer(
        tmp_path, epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[last],
        enable_checkpointing=True,
    )  # fmt: skip
    trainer.fit(grid, datamodule=tiny_data())
    path = tmp_path / "checkpoints" / "last.ckpt"
    torch.load(path, weights_only=True)  # plain hyperparameters: loadable without pickles

    images = torch.randn(8, 3, 32, 32)
    expected = logits(grid, images)
    for index, cell in enumerate(["T2_alpha0.5", (2, 0.9)]):
        student = load_model(path, cell=cell)
        torch.testing.assert_close(logits(student, images), expected[index], rtol=0, atol=0)
    best = load_model(path, cell="T2.0_alpha0.50", best=True)  # one validation: best == last
    torch.testing.assert_close(logits(best, images), expected[0], rtol=0, atol=0)
    with pytest.raises(KDLightError, match="grid of 2 students: pass cell= one of T2_alpha0.5"):
        load_model(path)
    with pytest.raises(KDLightError, match="no cell 'T4_alpha0.5'; its cells: T2_alpha0.5"):
        load_model(path, cell="T4_alpha0.5")

    classifier = ClassifierModule(create_model("resnet8"))
    checkpoint = {"state_dict": classifier.state_dict()}
    classifier.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "classifier.ckpt")
    loaded = load_model(tmp_path / "classifier.ckpt")
    torch.testing.assert_close(logits(loaded, images), logits(classifier, images))


def test_load_model_names_what_is_wrong(tmp_path: Path):
    with pytest.raises(KDLightError, match=r"cannot read checkpoint .*nope.ckpt \(no such file\)"):
        load_model(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(KDLightError, match="cannot read checkpoint .*junk.ckpt"):
        load_model(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(KDLightError, match="is not a kdlight checkpoint"):
        load_model(tmp_path / "bare.ckpt")
