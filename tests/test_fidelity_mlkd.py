"""MLKD as ``kdlight-train experiment=zoo_distill pair=... distiller=mlkd`` runs it equals its
official CIFAR code, step for step.

The official code is the MLKD authors' (Jin et al., CVPR 2023), built on mdistiller:
``mdistiller/distillers/KD_ours.py`` (the loss and ``forward_train``), ``mdistiller/engine/
cfg.py`` (the ``KD`` defaults it reads) and ``engine/trainer.py`` (``AugTrainer``, the step).
Its wiring is written here, never imported (the comments cite its file and line), and run on
the official architectures (:mod:`tests.official.models`, RepDistiller's, of which
mdistiller's are copies) holding the same weights as kdlight's zoo models. A fixed weak and
a fixed strong batch go to both sides: one step on a 3-stage pair (resnet56 -> resnet20) and a
4-stage pair (vgg13 -> vgg8), where each loss part, the total, the gradient of every student
parameter and the student's BatchNorm statistics (the weak view's batch, then the strong
view's) agree. (The strong augmentation itself is compared with the official Pillow code in
tests/test_strong_view.py.)
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlight.models.published import official_state_dict
from tests.official.models import official_copy_of
from tests.test_fidelity_logit import (
    BATCH,
    PAIRS,
    assert_close,
    assert_same_gradients,
    fixed_batch,
    kdlight_module,
    official_gradients,
    zoo_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the official code
#: mdistiller/engine/cfg.py:61-64, read by KD_ours.py:85-87 (configs/cifar100/ours/*.yaml
#: set none of them).
OFFICIAL_KD = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}


def official_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """KD_ours.py:13-22 (``reduce=True``, the only way ``forward_train`` calls it)."""
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature**2


def official_cc_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """KD_ours.py:25-36."""
    _, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    return ((teacher_matrix - student_matrix) ** 2).sum() / class_num


def official_bc_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """KD_ours.py:39-50."""
    batch_size, _ = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    return ((teacher_matrix - student_matrix) ** 2).sum() / batch_size


def official_forward_train(
    student: nn.Module, teacher: nn.Module, image_weak: Tensor, image_strong: Tensor, target: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """KD_ours.forward_train (KD_ours.py:89-255). mdistiller's networks return ``(logits,
    features)``; RepDistiller's, the same networks, return the logits."""
    temperature, w = OFFICIAL_KD["temperature"], OFFICIAL_KD["kd_weight"]
    logits_student_weak = student(image_weak)  # :90-91
    logits_student_strong = student(image_strong)
    with torch.no_grad():  # :92-94
        logits_teacher_weak = teacher(image_weak)
        logits_teacher_strong = teacher(image_strong)
    pred_teacher_weak = F.softmax(logits_teacher_weak.detach(), dim=1)  # :98-104
    confidence, _ = pred_teacher_weak.max(dim=1)
    confidence = confidence.detach()
    conf_thresh = np.percentile(confidence.cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0).detach()  # :106-111
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    loss_ce = OFFICIAL_KD["ce_weight"] * (  # :114
        F.cross_entropy(logits_student_weak, target)
        + F.cross_entropy(logits_student_strong, target)
    )
    weak = (logits_student_weak, logits_teacher_weak)
    strong = (logits_student_strong, logits_teacher_strong)
    temperatures = (temperature, 3.0, 5.0, 2.0, 6.0)  # in each sum's order
    loss_kd_weak = sum(  # :115-140
        w * ((official_kd_loss(*weak, t) * mask).mean()) for t in temperatures
    )
    # :142-162: the terms at 2.0 and 6.0 read the weak view's logits
    loss_kd_strong = sum(w * official_kd_loss(*strong, t) for t in (temperature, 3.0, 5.0))
    loss_kd_strong = loss_kd_strong + sum(w * official_kd_loss(*weak, t) for t in (2.0, 6.0))
    loss_cc_weak = sum(  # :164-185
        w * ((official_cc_loss(*weak, t) * class_conf_mask).mean()) for t in temperatures
    )
    loss_bc_weak = sum(  # :207-227
        w * ((official_bc_loss(*weak, t) * mask).mean()) for t in temperatures
    )
    # :186-206 and :228-248 compute the strong view's cc and bc, which :249-254 leave out
    losses_dict = {
        "loss_ce": loss_ce,
        "loss_kd": loss_kd_weak + loss_kd_strong,
        "loss_cc": loss_cc_weak,
        "loss_bc": loss_bc_weak,
    }
    return logits_student_weak, losses_dict


def strong_batch() -> Tensor:
    """A second fixed batch of normalised images, as the strong view."""
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ the comparison
def compare_one_step(pair: str, tmp_path: Path, *overrides: str) -> None:
    """One kdlight training step of ``distiller=mlkd`` composed for ``pair`` and the official
    step (AugTrainer.train_iter, trainer.py:229-246) on copies of the same weights."""
    teacher_name, student_name, _ = PAIRS[pair]
    module = kdlight_module(zoo_config(pair, "mlkd", tmp_path, *overrides))
    assert not module.teacher.training and module.model.training
    student = official_copy_of(student_name, module.model)
    teacher = official_copy_of(teacher_name, module.teacher).eval()
    images, labels = fixed_batch()
    strong = strong_batch()
    with torch.no_grad():  # the teacher right on half the batch, as a trained one mostly is
        labels[::2] = module.teacher(images).argmax(1)[::2]
    module.model.zero_grad()
    parts = module.training_step((images, labels, strong), 0)
    parts["loss"].backward()
    student.zero_grad()
    preds, losses_dict = official_forward_train(student, teacher, images, strong, labels)
    loss = sum([value.mean() for value in losses_dict.values()])  # trainer.py:244
    loss.backward()
    where = f"{pair} mlkd"
    weight, ce_weight = OFFICIAL_KD["kd_weight"], OFFICIAL_KD["ce_weight"]
    assert_close(ce_weight * parts["ce"], losses_dict["loss_ce"], f"{where}: ce")
    for part in ("kd", "cc", "bc"):
        assert_close(weight * parts[part], losses_dict[f"loss_{part}"], f"{where}: {part}")
    assert_close(parts["loss"], loss, f"{where}: the total")
    assert_same_gradients(official_gradients(student_name, module.model), student, where)
    # the student ran on the weak view, then on the strong one: its BatchNorm statistics
    mine, official = official_state_dict(student_name, module.model), student.state_dict()
    for key in [key for key in official if "running" in key]:
        assert_close(mine[key], official[key], f"{where}: {key}")


@pytest.mark.parametrize("pair", list(PAIRS))
def test_one_mlkd_step_equals_the_official_code(pair: str, tmp_path: Path):
    compare_one_step(pair, tmp_path)


def test_the_comparison_catches_the_papers_strong_view_at_every_temperature(tmp_path: Path):
    """The paper's form (the strong view's KD read on the strong view at 2 and 6 too) is not
    the official code's: the comparison fails."""
    with pytest.raises(AssertionError, match="vgg13_vgg8"):
        compare_one_step("vgg13_vgg8", tmp_path, "distiller.strong_temperatures=[4,3,5,2,6]")


def test_the_comparison_catches_the_views_swapped(tmp_path: Path, monkeypatch):
    """kdlight given the strong view as the weak one and the weak as the strong (the masks,
    the correlations and the BatchNorm statistics read off the wrong view): it fails."""
    from kdlight.lit import DistillationModule

    original = DistillationModule.training_step

    def swapped(module, batch, batch_idx):
        images, labels, strong = batch
        return original(module, (strong, labels, images), batch_idx)

    monkeypatch.setattr(DistillationModule, "training_step", swapped)
    with pytest.raises(AssertionError, match="vgg13_vgg8"):
        compare_one_step("vgg13_vgg8", tmp_path)
