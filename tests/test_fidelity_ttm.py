"""TTM and WTTM as ``kdlight-train experiment=zoo_distill pair=... distiller=ttm|wttm`` run
them equal their official code (zkxufo/TTM), one training step on a 3-stage pair (resnet56 ->
resnet20) and a 4-stage pair (vgg13 -> vgg8): each part, the total and the gradient of every
student parameter.

The official wiring is written here from that code (never imported: the comments cite its
file and line) and run on the official networks (:mod:`tests.official.models`; the TTM
repository's ``models/`` are RepDistiller's, file for file) holding kdlight's weights. The
module, batch and comparisons are those of tests/test_fidelity_logit.py, reused.
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

#: The official runs (README.md:19-22 for TTM, ``--ttm_l 0.1 -r 1 -b 45 -a 0``; WTTM's
#: ``--ttm_l 0.2`` with weight 4, README.md:37-42), as train_student.py names them: ``gamma``
#: (``-r``) the CE weight, ``beta`` (``-b``) the method's, ``alpha`` (``-a``) that of the
#: extra ``--add`` loss, KD at ``kd_T`` 4 by default (train_student.py:56, 65).
OFFICIAL = {
    "ttm": {"ttm_l": 0.1, "gamma": 1.0, "beta": 45.0, "alpha": 0.0, "kd_T": 4.0},
    "wttm": {"ttm_l": 0.2, "gamma": 1.0, "beta": 4.0, "alpha": 0.0, "kd_T": 4.0},
}


# ------------------------------------------------------------------ the official code
def official_ttm(y_s: Tensor, y_t: Tensor, l: float, weighted: bool) -> Tensor:  # noqa: E741
    """distiller_zoo/ttm.py:13-20 (TTM.forward); ``weighted``: wttm.py:13-20 (WTTM.forward,
    the same but ``torch.mean(norm*KL)``)."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    KL = torch.sum(F.kl_div(p_s, p_t, reduction="none"), dim=1)  # noqa: N806
    return torch.mean(norm * KL) if weighted else torch.mean(KL)


def official_kd(y_s: Tensor, y_t: Tensor, T: float) -> Tensor:  # noqa: N803
    """distiller_zoo/kd.py:12-17 (DistillKL.forward), the ``--add kd`` loss: ``reduction=
    "sum"`` is the spelling of its deprecated ``size_average=False``."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


def official_step(
    method: str, logit_s: Tensor, logit_t: Tensor, target: Tensor, weighted: bool
) -> dict[str, Tensor]:
    """helper/loops.py:57-83 of train_distill for ``--distill ttm`` (``weighted=False``) or
    ``wttm`` at ``method``'s official settings: the CE (``criterion_cls``,
    train_student.py:188), the extra loss (``criterion_div``, KD by default,
    train_student.py:190-191) and the method's (``criterion_kd``, 201-204), summed with their
    weights at loops.py:83."""
    opt = OFFICIAL[method]
    loss_cls = F.cross_entropy(logit_s, target)
    loss_div = official_kd(logit_s, logit_t, opt["kd_T"])
    loss_kd = official_ttm(logit_s, logit_t, opt["ttm_l"], weighted)
    loss = opt["gamma"] * loss_cls + opt["alpha"] * loss_div + opt["beta"] * loss_kd
    return {"ce": loss_cls, method: loss_kd, "loss": loss}


def compare_one_step(
    pair: str, method: str, tmp_path: Path, *overrides: str, weighted: bool | None = None
) -> None:
    """One kdlight training step of the composed config and the official step on copies of
    the same weights (the official loss weighted as WTTM's unless ``weighted`` says
    otherwise): the CE, the method's term, the total and every student gradient agree."""
    teacher_name, student_name, _ = PAIRS[pair]
    module = kdlight_module(zoo_config(pair, method, tmp_path, *overrides))
    # loops.py:14-17: every module in train mode, then the teacher in eval mode
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
    logit_s = student(images)
    with torch.no_grad():  # loops.py:53-55
        logit_t = teacher(images)
    weighted = method == "wttm" if weighted is None else weighted
    expected = official_step(method, logit_s, logit_t, labels, weighted)
    expected["loss"].backward()
    where = f"{pair} {method}"
    assert_close(parts["ce"], expected["ce"], f"{where}: ce")
    assert_close(parts[method], expected[method], f"{where}: {method}")
    assert_close(parts["loss"], expected["loss"], f"{where}: the total")
    assert_same_gradients(official_gradients(student_name, module.model), student, where)


@pytest.mark.parametrize("method", ["ttm", "wttm"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_one_step_equals_the_official_code(pair: str, method: str, tmp_path: Path):
    compare_one_step(pair, method, tmp_path)


@pytest.mark.parametrize(
    ("method", "wrong", "weighted"),
    [
        ("ttm", ["distiller.exponent=1.0"], False),  # train_student.py:68's --ttm_l: KD at T 1
        ("wttm", [], False),  # WTTM's settings, but the official TTM's unweighted KL
    ],
)
def test_the_comparison_catches_a_wrong_setting_or_loss(
    method: str, wrong: list[str], weighted: bool, tmp_path: Path
):
    with pytest.raises(AssertionError, match="vgg13_vgg8"):
        compare_one_step("vgg13_vgg8", method, tmp_path, *wrong, weighted=weighted)
