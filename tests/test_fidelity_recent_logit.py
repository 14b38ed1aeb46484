"""DIST as ``kdlight-train experiment=zoo_distill pair=... distiller=dist`` runs it equals its
official CIFAR code, step for step.

The official code is the DIST authors' own CIFAR-100 code, the one the DIST_KD README's
CIFAR-100 numbers come from (hunto/image_classification_sota at 6f7a70a:
``configs/strategies/distill/dist_cifar.yaml``, ``lib/models/losses/kd_loss.py`` and
``dist_kd.py``, ``tools/train.py``). Its wiring is written here, never imported (the comments
cite its file and line), and run on the official architectures (:mod:`tests.official.models`,
RepDistiller's, of which that code's ``lib/models/cifar/resnet.py`` and ``vgg.py`` are copies)
holding the same weights as kdlight's zoo models. One step on a 3-stage pair (resnet56 ->
resnet20) and a 4-stage pair (vgg13 -> vgg8): each loss part, the total and the gradient of
every student parameter agree. (TTM's RepDistiller-based ``distiller_zoo/dist.py`` is the
same loss, line for line.)
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.official.models import official_copy_of
from tests.test_fidelity_logit import (
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
#: configs/strategies/distill/dist_cifar.yaml:34-36 (ori_loss_weight 1, kd_loss_weight 2,
#: kd: dist_t4), read by lib/models/losses/kd_loss.py:69-71: DIST(beta=1, gamma=1, tau=4).
OFFICIAL_DIST = {"ce_weight": 1.0, "kd_weight": 2.0, "beta": 1.0, "gamma": 1.0, "tau": 4.0}


def official_cosine_similarity(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """lib/models/losses/dist_kd.py:4-5."""
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def official_pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """dist_kd.py:8-10."""
    return official_cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)


def official_inter_class_relation(y_s: Tensor, y_t: Tensor) -> Tensor:
    """dist_kd.py:13-14."""
    return 1 - official_pearson_correlation(y_s, y_t).mean()


def official_intra_class_relation(y_s: Tensor, y_t: Tensor) -> Tensor:
    """dist_kd.py:17-18."""
    return official_inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


def official_step(logits_student: Tensor, logits_teacher: Tensor, target: Tensor) -> dict:
    """What ``KDLoss.__call__`` returns (kd_loss.py:123-167) for ``kd: dist_t4``, with the
    parts before their weights beside it: the CE of the student's logits (``ori_loss``,
    ``nn.CrossEntropyLoss()`` for ``smoothing: 0.0``, tools/train.py:71-72), DIST's
    ``forward`` (dist_kd.py:28-34) on the logits the forward hooks keep (kd_loss.py:63-64,
    181-185: the models' outputs), ``ori_loss * ori_loss_weight + kd_loss *
    kd_loss_weight`` (kd_loss.py:167)."""
    tau = OFFICIAL_DIST["tau"]
    ce = F.cross_entropy(logits_student, target)
    y_s = (logits_student / tau).softmax(dim=1)
    y_t = (logits_teacher / tau).softmax(dim=1)
    inter = tau**2 * official_inter_class_relation(y_s, y_t)
    intra = tau**2 * official_intra_class_relation(y_s, y_t)
    kd = OFFICIAL_DIST["beta"] * inter + OFFICIAL_DIST["gamma"] * intra
    total = ce * OFFICIAL_DIST["ce_weight"] + kd * OFFICIAL_DIST["kd_weight"]
    return {"loss": total, "ce": ce, "inter": inter, "intra": intra}


# ------------------------------------------------------------------ the comparison
def compare_one_step(pair: str, tmp_path: Path, *overrides: str) -> None:
    """One kdlight training step of ``distiller=dist`` composed for ``pair`` and the official
    step on copies of the same weights: every part, the total and the gradient of every
    student parameter agree."""
    teacher_name, student_name, _ = PAIRS[pair]
    module = kdlight_module(zoo_config(pair, "dist", tmp_path, *overrides))
    # the official code puts the teacher in eval mode once (kd_loss.py:120) and the student
    # in train mode at each epoch (tools/train.py:277)
    assert not module.teacher.training and module.model.training
    student = official_copy_of(student_name, module.model)
    teacher = official_copy_of(teacher_name, module.teacher).eval()
    images, labels = fixed_batch()
    with torch.no_grad():  # the teacher right on half the batch, as a trained one mostly is
        labels[::2] = module.teacher(images).argmax(1)[::2]
    module.model.zero_grad()
    parts = module.training_step((images, labels), 0)
    parts["loss"].backward()
    student.zero_grad()
    with torch.no_grad():  # kd_loss.py:124-125
        logits_teacher = teacher(images)
    official = official_step(student(images), logits_teacher, labels)
    official["loss"].backward()
    where = f"{pair} dist"
    for part in ("ce", "inter", "intra"):
        assert_close(parts[part], official[part], f"{where}: {part}")
    assert_close(parts["loss"], official["loss"], f"{where}: the total")
    assert_same_gradients(official_gradients(student_name, module.model), student, where)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_one_dist_step_equals_the_official_code(pair: str, tmp_path: Path):
    compare_one_step(pair, tmp_path)


@pytest.mark.parametrize(
    "wrong",
    [
        "distiller.temperature=1",  # the paper's ImageNet tau (kd: 'dist'), not CIFAR's 4
        "distiller.weight=1",  # DIST's term at the CE's weight, not kd_loss_weight 2
    ],
)
def test_the_comparison_catches_a_setting_that_is_not_the_official_one(wrong: str, tmp_path: Path):
    with pytest.raises(AssertionError, match="vgg13_vgg8"):
        compare_one_step("vgg13_vgg8", tmp_path, wrong)
