"""The user's own code: a method of their own given on the command line
(``'distiller={_target_: my_dist.DIST, beta: 2}'``), and the Python API, which measures
the number of classes from the student and takes the class names from the data module."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from kdlight import (
    CIFAR100DataModule,
    ClassifierModule,
    DistillationModule,
    create_model,
)
from kdlight.config.preflight import own_method_overrides
from kdlight.config.settings import validate_settings
from kdlight.errors import KDLightError
from tests.conftest import compose_config, cpu_trainer, run_cli

#: A user's method, as a researcher writes one (DIST, Huang et al. 2022, reduced to what
#: the test needs): its own arguments, none of KD's alpha.
MY_DIST = """
    import torch.nn.functional as F


    class DIST:
        def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0):
            self.beta, self.gamma, self.temperature = beta, gamma, temperature

        def __call__(self, student, teacher, targets, epoch=0):
            ce = F.cross_entropy(student.logits, targets)
            soft = F.mse_loss(student.logits.softmax(1), teacher.logits.softmax(1))
            return {"loss": ce + self.beta * soft, "ce": ce, "soft": soft}
"""


@pytest.fixture
def my_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``my_dist.py`` in a folder of its own, importable (as ``PYTHONPATH=.`` makes it)."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "my_dist.py").write_text(textwrap.dedent(MY_DIST))
    monkeypatch.syspath_prepend(str(folder))
    return folder


# ------------------------------------------------------------------ a method from the CLI
def test_a_users_method_from_the_command_line_is_built_from_what_was_written(
    my_dist: Path, tmp_path: Path, untrained_teacher: Path
):
    """KD's keys (the default conf/distiller/kd.yaml) are not merged in: no ``alpha`` reaches
    DIST; the argument written is overridden later, and one not written (``gamma``) too,
    without ``+``, as any shipped method's."""
    overrides = [
        "experiment=distill", f"distill.teacher_checkpoint={untrained_teacher}",
        "distiller={_target_: my_dist.DIST, beta: 2}", "distiller.beta=3", "distiller.gamma=5",
    ]  # fmt: skip
    cfg = compose_config(own_method_overrides(overrides), tmp_path / "out")
    validate_settings(cfg)  # before: unknown setting 'distiller.alpha' (my_dist.DIST takes ...)
    method = instantiate(cfg.module.distiller)
    assert type(method).__module__ == "my_dist"
    assert vars(method) == {"beta": 3, "gamma": 5, "temperature": 4.0}


def test_a_dict_without_target_still_sets_the_chosen_methods_settings(tmp_path: Path):
    """Only a dict with ``_target_`` is a method of one's own; ``distiller={...}`` without
    one stays Hydra's merge into the chosen method."""
    overrides = ["experiment=distill", "distiller=dkd", "distiller={beta: 2}"]
    assert own_method_overrides(overrides) == overrides
    cfg = compose_config(overrides, tmp_path / "out")
    assert cfg.distiller._target_ == "kdlight.distillers.DKD" and cfg.distiller.beta == 2


@pytest.mark.slow
def test_a_users_method_trains_from_kdlight_train(my_dist: Path, untrained_teacher: Path):
    """The spelling the README gives, end to end: the run trains DIST with beta 3 and
    records its settings."""
    result = run_cli(
        [
            "experiment=distill",
            "trainer=cpu",
            "data=synthetic",
            "model=small_cnn",
            "model.width=0.25",
            "data.synthetic_train_size=64",
            "data.synthetic_test_size=32",
            "data.val_size=0",
            "data.batch_size=32",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.enable_progress_bar=false",
            "~callbacks.progress_bar",
            f"distill.teacher_checkpoint={untrained_teacher}",
            "distiller={_target_: my_dist.DIST, beta: 2}",
            "distiller.beta=3",
        ],  # fmt: skip
        my_dist,
        PYTHONPATH=str(my_dist),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics,) = (my_dist / "outputs").rglob("metrics.json")
    record = json.loads(metrics.read_text())
    assert record["distiller"] == "dist"  # the class name, in lower case
    settings = record["run"]["settings"]  # every argument with a default is recorded
    assert {k: v for k, v in settings.items() if k.startswith("distiller.")} == {
        "distiller._target_": "my_dist.DIST", "distiller.beta": 3, "distiller.gamma": 1,
        "distiller.temperature": 4,
    }  # fmt: skip
    assert metrics.parent.parent.name == "dist_T4_beta3"  # the run's folder names it


# ------------------------------------------------------------ the Python API's class count
class DIST:
    """A user's logit method, as in the README: no base class."""

    def __call__(self, student, teacher, targets, epoch=0):
        ce = torch.nn.functional.cross_entropy(student.logits, targets)
        return {"loss": ce, "ce": ce}


def cifar100(**kwargs) -> CIFAR100DataModule:
    return CIFAR100DataModule(
        source="synthetic", synthetic_train_size=64, synthetic_test_size=100, val_size=0,
        batch_size=32, **kwargs,
    )  # fmt: skip


def test_a_100_class_student_distils_on_100_classes_without_num_classes(tmp_path: Path):
    """Before: num_classes defaulted to 10, and Lightning's sanity check ended in a
    torchmetrics traceback on labels up to 99."""
    student = create_model("resnet8", num_classes=100)
    teacher = create_model("resnet8", num_classes=100)
    module = DistillationModule(student, teacher=teacher, distiller=DIST())
    assert module.num_classes == 100
    trainer = cpu_trainer(tmp_path, 1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, datamodule=cifar100())
    trainer.test(module, datamodule=cifar100(), verbose=False)
    assert module.class_names[:2] == ("apple", "aquarium_fish")  # the data module's names
    assert len(module.test_summary["per_class_accuracy"]) == 100


def test_the_class_count_is_the_models_even_where_it_cannot_be_run(tmp_path: Path):
    """A model for other images (a fixed 64 x 64 flatten) is asked its last Linear; an
    explicit num_classes is kept, and must agree."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 7))
    assert ClassifierModule(model).num_classes == 7
    assert ClassifierModule(model, num_classes=7, input_shape=(3, 64, 64)).num_classes == 7
    with pytest.raises(KDLightError) as wrong:
        ClassifierModule(create_model("resnet8", num_classes=100), num_classes=10)
    assert str(wrong.value) == (
        "num_classes=10 does not fit the model (ResNet), which predicts 100 classes: leave "
        "num_classes out or make the model for 10 classes"
    )


def test_a_mismatch_with_the_data_or_the_teacher_is_one_line(tmp_path: Path):
    with pytest.raises(KDLightError) as data:
        cpu_trainer(tmp_path, 1, limit_train_batches=1).fit(
            ClassifierModule(create_model("small_cnn", width=0.25)), datamodule=cifar100()
        )
    assert str(data.value) == (
        "the model predicts 10 classes and the data (CIFAR100DataModule) has 100: use a model "
        "made for 100 classes (create_model(name, num_classes=100)) or data of 10 classes"
    )
    with pytest.raises(KDLightError) as teacher:
        DistillationModule(
            create_model("resnet8", num_classes=100), teacher=create_model("resnet8"),
            distiller=DIST(),
        )  # fmt: skip
    assert str(teacher.value) == (
        "the teacher (ResNet) predicts 10 classes and the student (ResNet) 100: distil "
        "between models made for the same classes"
    )


def test_the_probe_changes_nothing_in_the_model():
    """The forward pass that measures the classes runs in eval mode without gradients: the
    BatchNorm statistics, the mode and the random stream are as before."""
    model = create_model("resnet8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    module = ClassifierModule(model)
    assert module.num_classes == 10 and module.class_names[0] == "airplane"  # as before
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), state)
