"""TTM and WTTM (Zheng and Yang, ICLR 2024) against the paper's formulas written out in
float64 numpy, one sample at a time, and the methods' sums and settings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlight.config.settings import check
from kdlight.distillers import TTM, WTTM, Outputs
from kdlight.errors import KDLightError
from kdlight.losses import kd_loss, ttm_loss, wttm_loss

STUDENT = [
    [1.0, -2.0, 0.5, 3.0, 0.0],
    [0.0, 0.2, -1.0, 1.5, 2.5],
    [2.0, 2.0, -3.0, 0.0, 1.0],
    [-0.5, 4.0, 1.0, -2.0, 0.3],
]
TEACHER = [
    [2.0, -1.0, 0.0, 4.0, -0.5],
    [-1.0, 0.5, 0.5, 0.0, 3.0],
    [9.0, 1.0, -2.0, 0.0, 0.5],  # confident: U_gamma close to 1
    [0.0, 0.1, 0.0, -0.1, 0.0],  # nearly uniform: U_gamma close to 5^(1 - gamma)
]
TARGETS = [3, 4, 0, 1]


def reference(student, teacher, gamma: float) -> tuple[float, float]:
    """The paper's TTM and WTTM: per sample, p_t = softmax(z_t) raised to gamma, U its sum,
    KL(p_t^gamma / U || softmax(z_s)); TTM the batch mean of the KL, WTTM of U * KL."""
    ttm = wttm = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        s, t = np.asarray(s_row, dtype=np.float64), np.asarray(t_row, dtype=np.float64)
        q = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        p = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
        powered = p**gamma
        norm = powered.sum()
        target = powered / norm
        kl = float(np.sum(target * np.log(target / q)))
        ttm, wttm = ttm + kl, wttm + norm * kl
    return ttm / len(student), wttm / len(student)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0, 2.0])
def test_ttm_and_wttm_match_the_formulas(gamma: float):
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    ttm, wttm = reference(STUDENT, TEACHER, gamma)
    assert ttm_loss(student, teacher, gamma).item() == pytest.approx(ttm, rel=1e-5)
    assert wttm_loss(student, teacher, gamma).item() == pytest.approx(wttm, rel=1e-5)


def test_at_exponent_one_ttm_is_kd_at_t_one_and_wttm_weighs_every_sample_one():
    student, teacher, targets = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)
    kd = kd_loss(student, teacher, targets, temperature=1.0, alpha=1.0)["kd"]
    torch.testing.assert_close(ttm_loss(student, teacher, 1.0), kd)
    torch.testing.assert_close(wttm_loss(student, teacher, 1.0), kd)


def test_a_teacher_probability_that_underflows_keeps_its_power():
    """exp(-120) is 0 in float32, its 0.1th power exp(-12) is not: the loss sees it (the
    official ``pow(softmax)`` would read 0 there) and equals the float64 formula."""
    student = torch.tensor([[0.0, 1.0, -1.0]])
    teacher = torch.tensor([[120.0, 0.0, 0.0]])
    ttm, wttm = reference(student.tolist(), teacher.tolist(), 0.1)
    assert ttm_loss(student, teacher, 0.1).item() == pytest.approx(ttm, rel=1e-5)
    assert wttm_loss(student, teacher, 0.1).item() == pytest.approx(wttm, rel=1e-5)


@pytest.mark.parametrize("loss", [ttm_loss, wttm_loss])
def test_only_the_student_gets_a_gradient_and_the_loss_is_float32(loss):
    student = torch.tensor(STUDENT, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    value = loss(student, teacher, 0.2)
    value.backward()
    assert value.dtype == torch.float32
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


@pytest.mark.parametrize(("method", "term"), [(TTM, ttm_loss), (WTTM, wttm_loss)])
def test_the_method_adds_the_weighted_cross_entropy(method, term):
    student, teacher, targets = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)
    distiller = method(exponent=0.3, weight=7.0, ce_weight=0.5)
    parts = distiller(Outputs(student), Outputs(teacher), targets)
    ce = F.cross_entropy(student, targets)
    matched = term(student, teacher, 0.3)
    assert set(parts) == {"loss", "ce", distiller.name}
    torch.testing.assert_close(parts[distiller.name], matched)
    torch.testing.assert_close(parts["loss"], 0.5 * ce + 7.0 * matched)


def test_defaults_are_the_official_readme_runs():
    """zkxufo/TTM README.md:19-22 (TTM: --ttm_l 0.1 -r 1 -b 45) and 37-42 (WTTM: --ttm_l 0.2,
    weight 4); -r 1 is train_student.py:60's default."""
    assert TTM().settings() == {"exponent": 0.1, "weight": 45.0, "ce_weight": 1.0}
    assert WTTM().settings() == {"exponent": 0.2, "weight": 4.0, "ce_weight": 1.0}


@pytest.mark.parametrize("exponent", [0, -0.5])
def test_the_exponent_is_positive(exponent: float):
    with pytest.raises(KDLightError, match=f"^distiller.exponent={exponent} is not allowed"):
        check("distiller", exponent=exponent)
