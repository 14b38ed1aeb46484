"""``kd_loss`` against closed-form values and the properties its docstring promises."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdlight.losses import KDLoss, kd_loss


def softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def closed_form(
    student: list[list[float]],
    teacher: list[list[float]],
    targets: list[int],
    T: float,
    alpha: float,
):
    """The formula written out with plain floats: alpha*T^2*KL(p_T || q_T) + (1-alpha)*CE."""
    kl = ce = 0.0
    for s, t, y in zip(student, teacher, targets, strict=True):
        p, q = softmax(t, T), softmax(s, T)
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
        ce += -math.log(softmax(s, 1.0)[y])
    n = len(targets)
    kd = T * T * kl / n
    return alpha * kd + (1 - alpha) * ce / n, kd, ce / n


@pytest.mark.parametrize(
    ("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.9), (16.0, 0.1), (2.5, 1.0)]
)
def test_matches_closed_form(temperature: float, alpha: float):
    student = [[1.0, -2.0, 0.5, 3.0], [0.0, 0.2, -1.0, 1.5], [2.0, 2.0, -3.0, 0.0]]
    teacher = [[2.0, -1.0, 0.0, 4.0], [-1.0, 0.5, 0.5, 0.0], [0.0, 3.0, -1.0, 1.0]]
    targets = [3, 1, 0]
    parts = kd_loss(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), temperature, alpha
    )
    expected = closed_form(student, teacher, targets, temperature, alpha)
    for key, value in zip(("loss", "kd", "ce"), expected, strict=True):
        assert parts[key].item() == pytest.approx(value, rel=1e-4, abs=1e-6)  # computed in float32


def test_alpha_zero_is_cross_entropy():
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    targets = torch.randint(0, 10, (8,))
    parts = kd_loss(student, teacher, targets, temperature=4.0, alpha=0.0)
    torch.testing.assert_close(parts["loss"], F.cross_entropy(student, targets))


def test_identical_logits_have_zero_kd_term():
    logits = torch.randn(16, 10) * 5
    parts = kd_loss(logits, logits.clone(), torch.randint(0, 10, (16,)), temperature=3.0, alpha=0.7)
    assert abs(parts["kd"].item()) < 1e-5


def soft_term_gradient_norm(temperature: float, scaled: bool = True) -> float:
    torch.manual_seed(0)
    student = torch.randn(64, 10, requires_grad=True)
    teacher = torch.randn(64, 10)
    kd = kd_loss(student, teacher, torch.zeros(64, dtype=torch.long), temperature, alpha=1.0)["kd"]
    (kd if scaled else kd / temperature**2).backward()
    return student.grad.norm().item()


def test_t_squared_keeps_soft_gradient_scale_across_temperatures():
    """d(T^2 KL)/dz = T (q - p) tends to (z_s - z_t)/C as T grows: its scale stays put,
    while the unscaled KL's gradient shrinks as 1/T^2."""
    norms = {T: soft_term_gradient_norm(T) for T in (4.0, 8.0, 16.0)}
    assert max(norms.values()) / min(norms.values()) < 1.3
    unscaled = {T: soft_term_gradient_norm(T, scaled=False) for T in (4.0, 16.0)}
    assert unscaled[4.0] / unscaled[16.0] > 10


def test_float32_under_mixed_precision():
    student, teacher = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = kd_loss(student, teacher, torch.tensor([0, 1, 2, 3]), 4.0, 0.5)
    assert all(value.dtype == torch.float32 for value in parts.values())


def test_module_wraps_the_function():
    student, teacher, targets = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    loss = KDLoss(temperature=2.0, alpha=0.3)
    assert "temperature=2.0" in repr(loss)
    torch.testing.assert_close(
        loss(student, teacher, targets)["loss"],
        kd_loss(student, teacher, targets, 2.0, 0.3)["loss"],
    )


def test_several_students_at_once_equal_one_at_a_time():
    """The grid's form: (K, N, C) logits with one T and alpha per student."""
    torch.manual_seed(0)
    students, teacher = torch.randn(3, 8, 10), torch.randn(8, 10)
    targets = torch.randint(0, 10, (8,))
    temperatures, alphas = torch.tensor([1.0, 4.0, 16.0]), torch.tensor([0.1, 0.5, 0.9])
    together = kd_loss(students, teacher, targets, temperatures, alphas)
    for k in range(3):
        alone = kd_loss(students[k], teacher, targets, float(temperatures[k]), float(alphas[k]))
        for part in ("loss", "kd", "ce"):
            torch.testing.assert_close(together[part][k], alone[part])
