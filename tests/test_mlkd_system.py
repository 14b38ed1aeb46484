"""MLKD in the distillation systems: the teacher cache serves the weak view only and says
so, and the data module gives the strong view only to a fit whose method asks for it. (An
MLKD cell beside the other methods' in one grid: tests/test_methods_cli.py.)"""

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from kdlight.distillers import MLKD
from kdlight.errors import KDLightError
from kdlight.lit import DistillationModule
from kdlight.lit.methods import attach_training_data
from kdlight.models import create_model
from tests.conftest import cpu_trainer, synthetic_datamodule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8").eval()


def student() -> torch.nn.Module:
    return create_model("small_cnn", width=0.25)


def fit(module, root: Path, data) -> None:
    L.seed_everything(0)
    cpu_trainer(root, epochs=1, limit_val_batches=0, num_sanity_val_steps=0).fit(
        module, datamodule=data
    )


def test_the_cache_serves_the_weak_view_and_the_strong_one_runs_live(
    teacher, tmp_path: Path, caplog
):
    data = synthetic_datamodule(train=100, test=20, val=0, batch=50, data_dir=tmp_path)
    module = DistillationModule(student(), teacher=teacher, distiller=MLKD(), teacher_cache=True)
    live_sizes = []
    live = module.frozen.live
    module.frozen.live = lambda images: live_sizes.append(len(images)) or live(images)
    with caplog.at_level("INFO", logger="kdlight"):
        fit(module, tmp_path / "mlkd", data)
    assert (
        "distill.teacher_cache: serves the weak view only: distiller=mlkd's strong view runs "
        "the teacher live" in caplog.text
    )
    assert module.frozen.cache.lookups == 100  # every weak image looked up
    assert live_sizes == [50, 50]  # the strong views, live
    record = module.frozen.cache_record()["teacher_cache"]
    assert record["used"] and record["strong_view"] == "live"
    # a KD fit on the same data module afterwards: no strong view, no such record
    kd = DistillationModule(student(), teacher=teacher, teacher_cache=True)
    fit(kd, tmp_path / "kd", data)
    assert (
        not data.with_strong_view and "strong_view" not in kd.frozen.cache_record()["teacher_cache"]
    )


def test_the_strong_view_is_asked_for_by_a_method_that_needs_it_only(teacher):
    """A data module that an MLKD fit asked for the strong view leaves it out again for a
    fit whose methods do not need it (the bench trains every method on one data module)."""
    data = synthetic_datamodule(train=100, test=20, val=0, batch=50)
    trainer = SimpleNamespace(datamodule=data, num_devices=1, num_nodes=1)
    mlkd = DistillationModule(student(), teacher=teacher, distiller=MLKD())
    attach_training_data(trainer, mlkd.slots)
    assert data.with_strong_view
    attach_training_data(trainer, DistillationModule(student(), teacher=teacher).slots)
    assert not data.with_strong_view
    with pytest.raises(KDLightError, match="distiller=mlkd trains on a strongly augmented"):
        attach_training_data(SimpleNamespace(datamodule=object()), mlkd.slots)
