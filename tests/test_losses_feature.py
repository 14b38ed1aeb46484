"""Feature and relational losses (AT, SP, PKT, RKD, CC) against their formulas written out with
plain Python floats (float64), and the properties their docstrings promise."""

import math

import pytest
import torch

from kdlight.losses.attention import at_loss, sp_loss
from kdlight.losses.relational import cc_loss, pkt_loss, rkd_loss


def fixed(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the formulas, one float at a time -----------------------------------------------------


def pool(grid: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Adaptive average pooling of one H x W grid: bin i covers [floor(iH/h), ceil((i+1)H/h))."""
    height, width = len(grid), len(grid[0])
    pooled = []
    for i in range(out_h):
        rows = range(i * height // out_h, math.ceil((i + 1) * height / out_h))
        pooled_row = []
        for j in range(out_w):
            cols = range(j * width // out_w, math.ceil((j + 1) * width / out_w))
            values = [grid[r][c] for r in rows for c in cols]
            pooled_row.append(sum(values) / len(values))
        pooled.append(pooled_row)
    return pooled


def attention(sample: list, p: float, out_h: int, out_w: int) -> list[float]:
    """One sample's (C, H, W) map: pooled per channel, then vec(mean_c |f|^p) / its L2 norm."""
    channels = [pool(grid, out_h, out_w) for grid in sample]
    flat = [
        sum(abs(channel[h][w]) ** p for channel in channels) / len(channels)
        for h in range(out_h)
        for w in range(out_w)
    ]
    norm = math.sqrt(sum(v * v for v in flat))
    return [v / norm for v in flat]


def reference_at(students: list[torch.Tensor], teachers: list[torch.Tensor], p: float) -> float:
    total = 0.0
    for student, teacher in zip(students, teachers, strict=True):
        out_h = min(student.shape[2], teacher.shape[2])
        out_w = min(student.shape[3], teacher.shape[3])
        squares = []
        for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
            qs, qt = attention(s, p, out_h, out_w), attention(t, p, out_h, out_w)
            squares += [(a - b) ** 2 for a, b in zip(qs, qt, strict=True)]
        total += sum(squares) / len(squares)  # mean over batch and positions
    return total


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def reference_sp(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> float:
    def similarity(features: torch.Tensor) -> list[list[float]]:
        rows = features.flatten(1).tolist()
        gram = [[dot(a, b) for b in rows] for a in rows]
        return [[g / math.sqrt(sum(x * x for x in row)) for g in row] for row in gram]

    total = 0.0
    for student, teacher in zip(students, teachers, strict=True):
        gs, gt = similarity(student), similarity(teacher)
        batch = len(gs)
        total += (
            sum((gs[i][j] - gt[i][j]) ** 2 for i in range(batch) for j in range(batch)) / batch**2
        )
    return total


def reference_pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> float:
    def probabilities(embeddings: torch.Tensor) -> list[list[float]]:
        rows = embeddings.tolist()
        units = [[x / (math.sqrt(dot(row, row)) + eps) for x in row] for row in rows]
        kernel = [[(dot(a, b) + 1) / 2 for b in units] for a in units]
        return [[k / sum(row) for k in row] for row in kernel]

    q, p = probabilities(student), probabilities(teacher)
    batch = len(p)
    total = sum(
        p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps))
        for i in range(batch)
        for j in range(batch)
    )
    return total / batch**2


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def reference_rkd(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """(distance term, angle term); degenerate pairs and triples count with value 0."""

    def distances(rows: list[list[float]]) -> list[list[float]]:
        batch = len(rows)
        d = [[math.dist(rows[i], rows[j]) for j in range(batch)] for i in range(batch)]
        mean = sum(d[i][j] for i in range(batch) for j in range(batch) if i != j) / (
            batch * (batch - 1)
        )
        return [[x / mean for x in row] for row in d]

    def cosine(rows: list[list[float]], i: int, j: int, k: int) -> float:
        """Cosine of the angle at e_j between e_i and e_k."""
        if i == j or k == j:
            return 0.0
        u = [a - b for a, b in zip(rows[i], rows[j], strict=True)]
        v = [a - b for a, b in zip(rows[k], rows[j], strict=True)]
        return dot(u, v) / math.sqrt(dot(u, u) * dot(v, v))

    s, t = student.tolist(), teacher.tolist()
    batch = len(s)
    ds, dt = distances(s), distances(t)
    distance = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(batch) for j in range(batch)) / (
        batch**2
    )
    triples = [(i, j, k) for i in range(batch) for j in range(batch) for k in range(batch)]
    angle = sum(smooth_l1(cosine(s, *ijk) - cosine(t, *ijk)) for ijk in triples) / len(triples)
    return distance, angle


def reference_cc(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean over consecutive samples (i, i + 1) of sum_k |s_ik - t_ik| |s_i+1,k - t_i+1,k|."""
    delta = [[abs(a - b) for a, b in zip(s, t, strict=True)]
             for s, t in zip(student.tolist(), teacher.tolist(), strict=True)]  # fmt: skip
    pairs = [dot(delta[i], delta[i + 1]) for i in range(len(delta) - 1)]
    return sum(pairs) / len(pairs)


# --- against the formulas ------------------------------------------------------------------


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_matches_formula_across_spatial_sizes_and_channels(p: float):
    """Stages: 8x8 student on a 4x4 teacher, 4x4 on 8x8, 6x6 on 4x4 (overlapping bins),
    a non-square 6x4 on 3x8; channels differ at every stage."""
    students = [fixed(2, 3, 8, 8, seed=1), fixed(2, 4, 4, 4, seed=2)]
    students += [fixed(2, 2, 6, 6, seed=3), fixed(2, 3, 6, 4, seed=4)]
    teachers = [fixed(2, 5, 4, 4, seed=11), fixed(2, 6, 8, 8, seed=12)]
    teachers += [fixed(2, 3, 4, 4, seed=13), fixed(2, 2, 3, 8, seed=14)]
    loss = at_loss(students, teachers, p=p)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_at(students, teachers, p), rel=1e-5)


def test_at_one_stage_per_term():
    students, teachers = [fixed(3, 2, 8, 8, seed=5)], [fixed(3, 4, 4, 4, seed=6)]
    both = at_loss(students * 2, teachers * 2)
    torch.testing.assert_close(both, 2 * at_loss(students, teachers))
    assert at_loss(students, teachers).item() == pytest.approx(
        reference_at(students, teachers, 2.0), rel=1e-5
    )


def test_sp_matches_formula_with_different_channels_and_sizes():
    students = [fixed(4, 3, 2, 2, seed=21), fixed(4, 6, seed=22)]
    teachers = [fixed(4, 5, 3, 3, seed=31), fixed(4, 2, 2, 2, seed=32)]
    loss = sp_loss(students, teachers)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_sp(students, teachers), rel=1e-5)


def test_pkt_matches_formula():
    student, teacher = fixed(5, 4, seed=41), fixed(5, 7, seed=42) * 3
    loss = pkt_loss(student, teacher)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_pkt(student, teacher), rel=1e-4)


def test_rkd_matches_formula():
    student, teacher = fixed(5, 3, seed=51), fixed(5, 6, seed=52) * 4
    parts = rkd_loss(student, teacher)
    distance, angle = reference_rkd(student, teacher)
    assert parts["distance"].item() == pytest.approx(distance, rel=1e-5)
    assert parts["angle"].item() == pytest.approx(angle, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(25 * distance + 50 * angle, rel=1e-5)
    weighted = rkd_loss(student, teacher, distance_weight=2.0, angle_weight=0.5)["loss"]
    assert weighted.item() == pytest.approx(2 * distance + 0.5 * angle, rel=1e-5)


def test_cc_matches_formula():
    student, teacher = fixed(5, 4, seed=55), fixed(5, 4, seed=56) * 2
    loss = cc_loss(student, teacher)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_cc(student, teacher), rel=1e-5)
    # consecutive samples in batch order: another order is another loss
    order = torch.tensor([0, 2, 1, 4, 3])
    assert cc_loss(student[order], teacher[order]).item() == pytest.approx(
        reference_cc(student[order], teacher[order]), rel=1e-5
    )
    assert abs(cc_loss(student[order], teacher[order]).item() - loss.item()) > 1e-3


def test_cc_trains_both_embeddings_and_a_single_sample_has_no_pair():
    """The teacher's embedding is a connector's output, which the loss trains (as the official
    code does); one sample has no consecutive pair: 0, not the official mean of nothing."""
    student = fixed(3, 4, seed=57).float().requires_grad_()
    teacher = fixed(3, 4, seed=58).float().requires_grad_()
    cc_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0
    assert cc_loss(student[:1], teacher[:1]).item() == 0.0
    with pytest.raises(ValueError, match="embedding shapes differ"):
        cc_loss(fixed(4, 3, seed=1), fixed(4, 5, seed=2))


def test_cc_is_zero_on_equal_embeddings_and_float32_under_mixed_precision():
    embeddings = fixed(6, 5, seed=59)
    assert cc_loss(embeddings, embeddings.clone()).item() == 0.0
    student, teacher = fixed(4, 8, seed=60).bfloat16(), fixed(4, 8, seed=61).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = cc_loss(student, teacher)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, cc_loss(student.float(), teacher.float()))


# --- properties ----------------------------------------------------------------------------


def test_zero_when_student_equals_teacher():
    maps = [fixed(3, 4, 4, 4, seed=61), fixed(3, 2, 2, 2, seed=62)]
    embeddings = fixed(6, 5, seed=63)
    assert at_loss(maps, [m.clone() for m in maps]).item() == 0.0
    assert sp_loss(maps, [m.clone() for m in maps]).item() == 0.0
    assert pkt_loss(embeddings, embeddings.clone()).item() == pytest.approx(0.0, abs=1e-9)
    for value in rkd_loss(embeddings, embeddings.clone()).values():
        assert value.item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("scale", [0.01, 7.5])
def test_rkd_ignores_a_common_scaling_of_one_side(scale: float):
    student, teacher = fixed(6, 4, seed=71), fixed(6, 8, seed=72)
    base = rkd_loss(student, teacher)
    for parts in (rkd_loss(student * scale, teacher), rkd_loss(student, teacher * scale)):
        for key in ("loss", "distance", "angle"):
            torch.testing.assert_close(parts[key], base[key], rtol=1e-5, atol=1e-7)


LOSSES = {
    "at": lambda s, t: at_loss([s], [t]),
    "sp": lambda s, t: sp_loss([s], [t]),
    "pkt": lambda s, t: pkt_loss(s.flatten(1), t.flatten(1)),
    "rkd": lambda s, t: rkd_loss(s.flatten(1), t.flatten(1))["loss"],
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_reaches_only_the_student(name: str):
    student = fixed(4, 3, 4, 4, seed=81).float().requires_grad_()
    teacher = fixed(4, 5, 2, 2, seed=82).float().requires_grad_()
    LOSSES[name](student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_under_mixed_precision(name: str):
    student = fixed(4, 3, 4, 4, seed=91).bfloat16()
    teacher = fixed(4, 5, 2, 2, seed=92).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = LOSSES[name](student, teacher)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, LOSSES[name](student.float(), teacher.float()))


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="stages"):
        at_loss([fixed(2, 3, 4, 4, seed=1)], [])
    with pytest.raises(ValueError, match="stages"):
        sp_loss([fixed(2, 3, 4, 4, seed=1)] * 2, [fixed(2, 3, 4, 4, seed=2)])
    with pytest.raises(ValueError, match="batch sizes"):
        sp_loss([fixed(2, 3, 4, 4, seed=1)], [fixed(3, 3, 4, 4, seed=2)])
    with pytest.raises(ValueError, match="batch sizes"):
        rkd_loss(fixed(4, 3, seed=1), fixed(5, 3, seed=2))
