"""OFD's losses (the margins, the partial L2 distance, the sum over stages and the connector)
against their formulas written out with plain Python floats (float64), as the paper states
them (Heo et al., 2019, Eq. 2-4: the margin is E[x | x < 0] of the BN's output, the target
max(t, m), no loss where the student is below a non-positive target)."""

import math

import pytest
import torch

from kdlight.losses import OFDConnector, ofd_loss, ofd_margins, partial_l2


def fixed(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pool(grid: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Adaptive average pooling of one H x W grid: bin i covers [floor(iH/h), ceil((i+1)H/h))."""
    height, width = len(grid), len(grid[0])
    return [
        [
            sum(values := [grid[r][c] for r in rows for c in cols]) / len(values)
            for cols in (range(j * width // out_w, math.ceil((j + 1) * width / out_w))
                         for j in range(out_w))
        ]
        for rows in (range(i * height // out_h, math.ceil((i + 1) * height / out_h))
                     for i in range(out_h))
    ]  # fmt: skip


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def margin_of(gamma: float, beta: float) -> float:
    """E[x | x < 0] for x ~ N(beta, gamma^2), by integrating the density numerically (not
    the closed form), or -3|gamma| where P(x < 0) <= 0.001 (the official cut-off)."""
    sigma = abs(gamma)
    if normal_cdf(-beta / sigma) <= 1e-3:
        return -3 * sigma
    steps, low = 20000, beta - 12 * sigma
    width = (0.0 - low) / steps
    mass = moment = 0.0
    for i in range(steps):
        x = low + (i + 0.5) * width
        density = math.exp(-((x - beta) ** 2) / (2 * sigma**2))
        mass += density
        moment += x * density
    return moment / mass


def distance(s: float, t: float, m: float) -> float:
    """The paper's partial L2 of one entry, with the margin ReLU's target max(t, m)."""
    target = max(t, m)
    if s <= target <= 0:
        return 0.0
    return (s - target) ** 2


def reference_partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: list) -> float:
    total = 0.0
    for s_b, t_b in zip(student.tolist(), teacher.tolist(), strict=True):
        for s_c, t_c, m in zip(s_b, t_b, margin, strict=True):
            for s_row, t_row in zip(s_c, t_c, strict=True):
                total += sum(distance(s, t, m) for s, t in zip(s_row, t_row, strict=True))
    return total / len(student)  # summed per sample, averaged over the batch


def test_the_margins_are_the_mean_of_the_negative_part():
    gamma = [1.0, -0.5, 2.0, 0.3, 0.2]  # the sign of gamma does not matter: |gamma|
    beta = [0.0, 0.3, -1.0, 2.0, 0.5]  # (0.3, 2.0): P(x < 0) = 1.3e-11, so -3 |gamma|
    got = ofd_margins(torch.tensor(gamma), torch.tensor(beta))
    assert got.dtype == torch.float32
    expected = [margin_of(g, b) for g, b in zip(gamma, beta, strict=True)]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)
    assert got[3].item() == pytest.approx(-0.9)


def test_the_partial_l2_of_one_stage_is_its_formula():
    student, teacher = fixed(3, 4, 5, 5, seed=1), fixed(3, 4, 5, 5, seed=2)
    margin = [-0.8, -0.3, -1.5, -0.05]
    got = partial_l2(student.float(), teacher.float(), torch.tensor(margin))
    expected = reference_partial_l2(student.float().double(), teacher.float().double(), margin)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # every case of the distance occurs in these maps
    target = torch.maximum(teacher, torch.tensor(margin, dtype=torch.float64).view(1, -1, 1, 1))
    assert ((student <= target) & (target <= 0)).any() and (target > 0).any()
    assert ((student > target) & (target <= 0)).any()


def test_the_sum_over_stages_pools_the_teacher_and_halves_each_shallower_stage():
    students = [fixed(2, 3, 8, 8, seed=3), fixed(2, 2, 4, 4, seed=4), fixed(2, 2, 2, 2, seed=5)]
    teachers = [fixed(2, 3, 16, 16, seed=6), fixed(2, 2, 4, 4, seed=7), fixed(2, 2, 4, 4, seed=8)]
    margins = [[-0.5, -1.0, -0.2], [-0.7, -0.1], [-0.4, -0.9]]
    got = ofd_loss(
        [s.float() for s in students],
        [t.float() for t in teachers],
        [torch.tensor(m) for m in margins],
    )
    expected = 0.0
    for index, (s, t, m) in enumerate(zip(students, teachers, margins, strict=True)):
        pooled = [[pool(grid, s.shape[2], s.shape[3]) for grid in sample] for sample in t.tolist()]
        term = reference_partial_l2(s.float().double(), torch.tensor(pooled), m)
        expected += term * 0.5 ** (len(students) - 1 - index)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_only_the_student_gets_a_gradient_and_it_is_the_formulas():
    student = fixed(2, 2, 3, 3, seed=9).float().requires_grad_()
    teacher = fixed(2, 2, 3, 3, seed=10).float().requires_grad_()
    margin = torch.tensor([-0.5, -0.2])
    partial_l2(student, teacher, margin).backward()
    assert teacher.grad is None
    target = torch.maximum(teacher.detach(), margin.view(1, -1, 1, 1))
    counted = (student.detach() > target) | (target > 0)
    expected = 2 * (student.detach() - target) * counted / 2  # d/ds of the sum, / B
    assert torch.allclose(student.grad, expected)


def test_the_connector_keeps_the_size_and_starts_as_the_official():
    torch.manual_seed(0)
    connector = OFDConnector(16, 64, kernel_size=3)
    x = torch.randn(4, 16, 8, 8)
    assert connector(x).shape == (4, 64, 8, 8)
    weight = connector.conv.weight
    assert connector.conv.bias is None and weight.shape == (64, 16, 3, 3)
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (3 * 3 * 64)), rel=0.05)
    assert connector.bn.weight.eq(1).all() and connector.bn.bias.eq(0).all()


def test_mismatched_stages_are_refused():
    with pytest.raises(ValueError, match="teacher map's shape"):
        partial_l2(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="as many student maps"):
        ofd_loss([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 3, 3)], [])
