"""Distillation methods as components (kdlight.distillers): KD and DKD through
DistillationModule, a user's own method without subclassing, the CLI's `distiller=`, run
folders and the report."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlight import load_model
from kdlight.distillers import DKD, KD, Outputs
from kdlight.errors import KDLightError
from kdlight.lit import DistillationGridModule, DistillationModule
from kdlight.losses import dkd_loss, kd_loss
from kdlight.models import create_model
from kdlight.runs.identity import identify, method_cell
from tests.conftest import compose_config, cpu_trainer, synthetic_datamodule


def logits(seed: int, shape=(6, 10)) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_kd_is_kd_loss_and_the_default_method():
    student, teacher, targets = logits(0), logits(1), torch.arange(6) % 10
    parts = KD(2.0, 0.5, standardize=True)(Outputs(student), Outputs(teacher), targets)
    expected = kd_loss(student, teacher, targets, 2.0, 0.5, standardize=True)
    assert all(torch.equal(parts[k], expected[k]) for k in ("loss", "kd", "ce"))
    module = DistillationModule(create_model("small_cnn", width=0.25), teacher=nn.Linear(1, 1))
    assert isinstance(module.distiller, KD) and (
        module.distiller.temperature,
        module.distiller.alpha,
    ) == (4.0, 0.9)


@pytest.mark.parametrize("epoch", [0, 9, 19, 40])
def test_dkd_adds_the_cross_entropy_and_warms_up_its_term(epoch: int):
    student, teacher, targets = logits(2), logits(3), torch.arange(6) % 10
    method = DKD(temperature=4.0, alpha=1.0, beta=8.0, ce_weight=0.5, warmup_epochs=20)
    parts = method(Outputs(student), Outputs(teacher), targets, epoch=epoch)
    warmup = min((epoch + 1) / 20, 1.0)  # mdistiller's epoch counts from 1
    decoupled = dkd_loss(student, teacher, targets, 4.0, 1.0, 8.0)
    expected = 0.5 * F.cross_entropy(student, targets) + warmup * decoupled["loss"]
    torch.testing.assert_close(parts["loss"], expected)
    assert set(parts) == {"loss", "ce", "tckd", "nckd"}


class CosineToTeacher(nn.Module):
    """A user's method, no kdlight base class: CE plus a trainable temperature's KL."""

    name = "cosine_to_teacher"

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, student: Outputs, teacher: Outputs, targets: Tensor, epoch: int = 0):
        t = self.log_temperature.exp()
        soft = F.kl_div(
            F.log_softmax(student.logits / t, -1),
            F.softmax(teacher.logits / t, -1),
            reduction="batchmean",
        )
        ce = F.cross_entropy(student.logits, targets)
        return {"loss": ce + soft, "ce": ce, "soft": soft}

    def settings(self) -> dict:
        return {"learned_temperature": True}


def test_a_users_own_method_trains_is_saved_and_is_reported_by_its_name(tmp_path: Path):
    teacher = create_model("resnet8").eval()
    method = CosineToTeacher()
    module = DistillationModule(
        create_model("small_cnn", width=0.25), teacher=teacher, distiller=method
    )
    before = teacher.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    L.seed_everything(0)
    trainer = cpu_trainer(tmp_path, epochs=1, enable_checkpointing=False)
    data = synthetic_datamodule(train=300, test=100, val=100, batch=100)
    trainer.fit(module, datamodule=data)
    assert method.log_temperature.item() != 0.0  # the method's own parameter was trained
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # frozen
    trainer.save_checkpoint(tmp_path / "method.ckpt")
    state = torch.load(tmp_path / "method.ckpt", weights_only=False)["state_dict"]
    assert "distiller.log_temperature" in state and not any(k.startswith("teacher.") for k in state)
    student = load_model(tmp_path / "method.ckpt")  # the student alone, without the method
    assert not any("log_temperature" in name for name, _ in student.named_parameters())

    trainer.test(module, datamodule=data, verbose=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["distiller"] == "cosine_to_teacher"
    assert metrics["distiller_settings"] == {"learned_temperature": True}
    assert "temperature" not in metrics  # T and alpha are KD's, not this method's


def test_the_method_is_part_of_the_run(tmp_path: Path):
    distill = ["experiment=distill", "trainer=cpu", "data=synthetic"]
    kd = identify(compose_config(distill, tmp_path), "t")
    dkd = identify(compose_config([*distill, "distiller=dkd"], tmp_path), "t")
    beta = identify(compose_config([*distill, "distiller=dkd", "distiller.beta=2"], tmp_path), "t")
    assert len({kd.id, dkd.id, beta.id}) == 3
    assert "distiller.temperature" not in kd.settings  # KD's T is distill.temperature
    assert method_cell(kd.settings) == "T4_alpha0.9"
    assert method_cell(dkd.settings) == "dkd_T4_alpha1_beta8"
    assert method_cell(beta.settings) == "dkd_T4_alpha1_beta2"
    ls = identify(compose_config([*distill, "distiller.standardize=true"], tmp_path), "t")
    assert method_cell(ls.settings) == "T4_alpha0.9_ls" and ls.id != kd.id


def test_the_fused_grid_trains_kd_cells_only():
    """Another method's grid is the method grid (``experiment=method_grid``): said in one line."""
    with pytest.raises(
        KDLightError, match="the fused T x alpha grid trains KD cells, not distiller=dkd"
    ):
        DistillationGridModule(
            create_model("small_cnn", width=0.25), teacher=create_model("resnet8"), distiller=DKD()
        )
