"""Losses with trainable connectors (FitNets, VID, CRD) against their official formulas written
out with plain Python floats (float64), the connectors' shapes and initial values, CRD's
memory banks and the sampling of its negatives."""

import math

import pytest
import torch
from torch import nn

from kdlight.distillers import CRD, VID
from kdlight.errors import KDLightError
from kdlight.losses.contrastive import (
    ContrastMemory,
    Embed,
    NegativeSampler,
    crd_loss,
    sample_contrast_indices,
)
from kdlight.losses.hint import ConvRegressor, VIDRegressor, hint_loss, vid_loss


def fixed(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit_rows(*shape: int, seed: int) -> torch.Tensor:
    rows = fixed(*shape, seed=seed)
    return (rows / rows.norm(dim=1, keepdim=True)).float()


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def elements(nested) -> list[float]:
    """All the numbers of a nested list, in order."""
    if isinstance(nested, list):
        return [x for item in nested for x in elements(item)]
    return [nested]


# --- the formulas, one float at a time -----------------------------------------------------


def reference_hint(student: torch.Tensor, teacher: torch.Tensor) -> float:
    pairs = list(zip(elements(student.tolist()), elements(teacher.tolist()), strict=True))
    return sum((s - t) ** 2 for s, t in pairs) / len(pairs)


def reference_vid(mean: torch.Tensor, variance: list[float], teacher: torch.Tensor) -> float:
    """0.5 * ((mu - t)^2 / var_c + log var_c), averaged over b, c, h, w."""
    terms = []
    for mean_b, teacher_b in zip(mean.tolist(), teacher.tolist(), strict=True):
        for var, mean_c, teacher_c in zip(variance, mean_b, teacher_b, strict=True):
            for mu, t in zip(elements(mean_c), elements(teacher_c), strict=True):
                terms.append(0.5 * ((mu - t) ** 2 / var + math.log(var)))
    return sum(terms) / len(terms)


def reference_crd(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> float:
    """RepDistiller's ContrastLoss: NCE with noise 1/N, positive first, summed / batch."""
    rows = scores.tolist()
    negatives = len(rows[0]) - 1
    noise = negatives / num_data
    total = 0.0
    for positive, *rest in rows:
        total += math.log(positive / (positive + noise + eps))
        total += sum(math.log(noise / (s + noise + eps)) for s in rest)
    return -total / len(rows)


def raw_scores(memory: torch.Tensor, embedding: torch.Tensor, contrast, temperature: float):
    """exp(<memory[j_bk], z_b> / T) for every b, k, as nested lists."""
    bank, rows = memory.tolist(), embedding.tolist()
    return [
        [math.exp(dot(bank[j], row) / temperature) for j in contrast_b]
        for row, contrast_b in zip(rows, contrast.tolist(), strict=True)
    ]


def normalised(row: list[float]) -> list[float]:
    norm = math.sqrt(dot(row, row))
    return [x / norm for x in row]


# --- FitNets -------------------------------------------------------------------------------


def test_hint_loss_matches_formula():
    student, teacher = fixed(2, 3, 4, 4, seed=1), fixed(2, 3, 4, 4, seed=2) * 2
    loss = hint_loss(student, teacher)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_hint(student, teacher), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        hint_loss(fixed(2, 3, 4, 4, seed=1), fixed(2, 3, 2, 2, seed=2))


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "conv", "kernel", "stride"),
    [
        ((8, 16, 16), (12, 8, 8), nn.Conv2d, (3, 3), (2, 2)),  # student twice the size
        ((8, 4, 4), (12, 8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),  # half the size
        ((8, 8, 8), (12, 8, 8), nn.Conv2d, (1, 1), (1, 1)),  # same size
        ((8, 10, 9), (12, 8, 8), nn.Conv2d, (3, 2), (1, 1)),  # a little larger
    ],
)
def test_conv_regressor_maps_the_student_onto_the_teacher_shape(
    student_shape, teacher_shape, conv, kernel, stride
):
    regressor = ConvRegressor(student_shape, teacher_shape)
    assert type(regressor.conv) is conv
    assert regressor.conv.kernel_size == kernel and regressor.conv.stride == stride
    assert regressor.conv.bias is not None
    out = regressor(fixed(3, *student_shape, seed=3).float())
    assert out.shape == (3, *teacher_shape)
    assert (out >= 0).all()  # batch norm then ReLU, the official use_relu=True


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"), [((8, 4, 4), (12, 16, 16)), ((8, 8, 4), (12, 6, 6))]
)
def test_conv_regressor_refuses_shapes_it_cannot_map_in_one_line(student_shape, teacher_shape):
    with pytest.raises(KDLightError) as error:
        ConvRegressor(student_shape, teacher_shape)
    message = str(error.value)
    assert "\n" not in message
    assert str(student_shape) in message and str(teacher_shape) in message


def test_fitnets_gradient_reaches_the_student_and_regressor_but_not_the_teacher():
    regressor = ConvRegressor((4, 8, 8), (6, 4, 4))
    student = fixed(3, 4, 8, 8, seed=4).float().requires_grad_()
    teacher = fixed(3, 6, 4, 4, seed=5).float().requires_grad_()
    hint_loss(regressor(student), teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    for parameter in regressor.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()


# --- VID -----------------------------------------------------------------------------------


def test_vid_loss_matches_formula():
    mean, teacher = fixed(2, 3, 2, 3, seed=6), fixed(2, 3, 2, 3, seed=7)
    variance = [0.5, 2.0, 5.0]
    loss = vid_loss(mean, torch.tensor(variance), teacher)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_vid(mean, variance, teacher), rel=1e-5)


def test_vid_regressor_starts_at_the_initial_variance_with_the_official_layers():
    regressor = VIDRegressor(4, 6, init_pred_var=5.0, eps=1e-5)
    torch.testing.assert_close(regressor.variance(), torch.full((6,), 5.0))
    assert VIDRegressor(4, 6, init_pred_var=0.3).variance()[0].item() == pytest.approx(0.3)
    convs = [m for m in regressor.regressor if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 6), (6, 6), (6, 6)]
    assert all(c.kernel_size == (1, 1) and c.stride == (1, 1) and c.bias is None for c in convs)
    assert [type(m) for m in regressor.regressor].count(nn.ReLU) == 2
    assert VIDRegressor(4, 6, mid_channels=3).regressor[0].out_channels == 3


@pytest.mark.parametrize("larger", ["student", "teacher"])
def test_vid_regressor_pools_the_larger_map_then_takes_the_loss(larger: str):
    torch.manual_seed(0)
    regressor = VIDRegressor(4, 6, init_pred_var=3.0)
    small = {"student": fixed(2, 4, 2, 2, seed=8), "teacher": fixed(2, 6, 2, 2, seed=9)}
    big = {"student": fixed(2, 4, 4, 4, seed=8), "teacher": fixed(2, 6, 4, 4, seed=9)}
    student = (big if larger == "student" else small)["student"].float()
    teacher = (big if larger == "teacher" else small)["teacher"].float()
    # 4x4 -> 2x2 average pooling, written as a mean over 2x2 blocks.
    pooled = {"student": student, "teacher": teacher}
    pooled[larger] = pooled[larger].reshape(2, -1, 2, 2, 2, 2).mean(dim=(3, 5))
    with torch.no_grad():
        loss = regressor(student, teacher)
        mean = regressor.regressor(pooled["student"])
    assert loss.item() == pytest.approx(
        reference_vid(mean.double(), [3.0] * 6, pooled["teacher"].double()), rel=1e-5
    )


def test_vid_gradient_reaches_the_student_and_regressor_but_not_the_teacher():
    regressor = VIDRegressor(4, 6)
    student = fixed(3, 4, 4, 4, seed=10).float().requires_grad_()
    teacher = fixed(3, 6, 8, 8, seed=11).float().requires_grad_()
    regressor(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert regressor.log_scale.grad is not None and regressor.log_scale.grad.abs().sum() > 0
    for parameter in regressor.regressor.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


# --- CRD: embedding, memory, loss ----------------------------------------------------------


def test_embed_is_a_linear_map_to_unit_rows():
    torch.manual_seed(0)
    embed = Embed(2 * 3 * 3, 5)
    assert Embed(7).linear.out_features == 128
    features = fixed(4, 2, 3, 3, seed=12).float()
    out = embed(features)
    linear = features.reshape(4, -1) @ embed.linear.weight.T + embed.linear.bias
    torch.testing.assert_close(out, linear / linear.pow(2).sum(1, keepdim=True).sqrt())
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_crd_loss_matches_formula():
    scores = fixed(3, 6, seed=13).abs().float() * 0.01
    loss = crd_loss(scores, num_data=50)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_crd(scores, 50), rel=1e-5)
    with pytest.raises(ValueError, match="K"):
        crd_loss(scores[:, :1], num_data=50)


def make_memory(dim=5, num_data=12, momentum=0.5, temperature=0.07) -> ContrastMemory:
    torch.manual_seed(0)
    return ContrastMemory(dim, num_data, momentum=momentum, temperature=temperature)


def test_memory_banks_start_uniform_and_are_saved():
    memory = ContrastMemory(dim=48, num_data=200)
    bound = 1 / math.sqrt(48 / 3)
    for bank in (memory.memory_student, memory.memory_teacher):
        assert bank.shape == (200, 48)
        assert bank.min() >= -bound and bank.max() <= bound
        assert bank.min() < -0.9 * bound and bank.max() > 0.9 * bound
    state = memory.state_dict()
    assert {"memory_student", "memory_teacher", "normalizer_student", "normalizer_teacher"} <= set(
        state
    )


def test_memory_scores_match_formula_and_the_constants_stay_fixed():
    memory = make_memory(temperature=0.5)
    num_data = 12
    index = torch.tensor([0, 5, 7])
    contrast = torch.tensor([[0, 3, 4, 9], [5, 0, 11, 2], [7, 7, 1, 6]])
    student, teacher = unit_rows(3, 5, seed=14), unit_rows(3, 5, seed=15)
    old_student_bank = memory.memory_student.clone()
    old_teacher_bank = memory.memory_teacher.clone()

    student_scores, teacher_scores = memory(student, teacher, index, contrast)

    assert student_scores.shape == teacher_scores.shape == (3, 4)
    expected = {}  # the student's embeddings against the teacher bank, and vice versa
    for side, bank, embedding, scores in (
        ("student", old_teacher_bank, student, student_scores),
        ("teacher", old_student_bank, teacher, teacher_scores),
    ):
        raw = raw_scores(bank, embedding, contrast, 0.5)
        constant = sum(elements(raw)) / len(elements(raw)) * num_data
        expected[side] = constant
        assert getattr(memory, f"normalizer_{side}").item() == pytest.approx(constant, rel=1e-5)
        assert elements(scores.tolist()) == pytest.approx(
            [x / constant for x in elements(raw)], rel=1e-5
        )

    # A second batch: new scores, divided by the first batch's constants.
    second_index, second_contrast = torch.tensor([2, 3]), torch.tensor([[2, 8], [3, 10]])
    student2, teacher2 = unit_rows(2, 5, seed=16) * 0.5, unit_rows(2, 5, seed=17)
    teacher_bank = memory.memory_teacher.clone()
    scores2, _ = memory(student2, teacher2, second_index, second_contrast)
    for side in ("student", "teacher"):
        assert getattr(memory, f"normalizer_{side}").item() == pytest.approx(expected[side])
    raw2 = raw_scores(teacher_bank, student2, second_contrast, 0.5)
    assert elements(scores2.tolist()) == pytest.approx(
        [x / expected["student"] for x in elements(raw2)], rel=1e-5
    )


def test_memory_momentum_update_of_the_rows_at_index_only():
    memory = make_memory(momentum=0.3)
    index = torch.tensor([1, 4, 10])
    contrast = torch.stack([index, torch.tensor([0, 0, 0])], dim=1)
    student, teacher = unit_rows(3, 5, seed=18), unit_rows(3, 5, seed=19)
    old = {"student": memory.memory_student.clone(), "teacher": memory.memory_teacher.clone()}
    memory(student, teacher, index, contrast)
    for side, embedding in (("student", student), ("teacher", teacher)):
        bank, before = getattr(memory, f"memory_{side}"), old[side].tolist()
        for row in range(12):
            if row in index.tolist():
                new = embedding[index.tolist().index(row)].tolist()
                mixed = [0.3 * a + 0.7 * b for a, b in zip(before[row], new, strict=True)]
                assert bank[row].tolist() == pytest.approx(normalised(mixed), rel=1e-5)
            else:
                assert bank[row].tolist() == before[row]


def test_crd_gradient_reaches_the_student_and_both_heads_but_not_the_memory():
    torch.manual_seed(0)
    embed_student, embed_teacher = Embed(8, 5), Embed(10, 5)
    memory = ContrastMemory(5, 20)
    student = fixed(4, 8, seed=20).float().requires_grad_()
    with torch.no_grad():
        teacher = fixed(4, 10, seed=21).float()
    index = torch.tensor([0, 6, 12, 18])
    labels = torch.arange(20) % 3
    contrast = sample_contrast_indices(index, labels, 7, generator=torch.Generator().manual_seed(1))
    scores = memory(embed_student(student), embed_teacher(teacher), index, contrast)
    loss = crd_loss(scores[0], 20) + crd_loss(scores[1], 20)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    for head in (embed_student, embed_teacher):
        for parameter in head.parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert not memory.memory_student.requires_grad and not memory.memory_teacher.requires_grad


def test_float32_under_mixed_precision():
    memory = make_memory()
    index, contrast = torch.tensor([0, 1]), torch.tensor([[0, 5, 6], [1, 7, 8]])
    student, teacher = unit_rows(2, 5, seed=22), unit_rows(2, 5, seed=23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = memory(student.bfloat16(), teacher.bfloat16(), index, contrast)
        losses = [
            crd_loss(scores[0].bfloat16(), 12),
            hint_loss(fixed(2, 3, 2, 2, seed=24).bfloat16(), fixed(2, 3, 2, 2, seed=25)),
            vid_loss(
                fixed(2, 3, 2, 2, seed=26).bfloat16(), torch.ones(3), fixed(2, 3, 2, 2, seed=27)
            ),
        ]
    assert all(s.dtype == torch.float32 for s in scores)
    assert all(loss.dtype == torch.float32 for loss in losses)


def test_memory_and_sampler_read_nothing_back_from_the_device(monkeypatch):
    """One step of CRD's bookkeeping reads no tensor value to the host (a GPU sync)."""
    memory, sampler = make_memory(), NegativeSampler(torch.arange(12) % 3, 4)
    index = torch.tensor([0, 5])
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):

        def refuse(*args, name=name, **kwargs):
            raise AssertionError(f"Tensor.{name} called")

        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2):
        contrast = sampler(index)
        memory(unit_rows(2, 5, seed=28), unit_rows(2, 5, seed=29), index, contrast)


# --- CRD: negatives ------------------------------------------------------------------------

#: 30 images of 3 classes of unequal sizes (5, 10, 15), in a shuffled order.
LABELS = torch.tensor([0] * 5 + [1] * 10 + [2] * 15)[
    torch.randperm(30, generator=torch.Generator().manual_seed(0))
]


def test_contrast_indices_start_with_the_anchor_and_avoid_its_class():
    index = torch.arange(30)
    contrast = sample_contrast_indices(
        index, LABELS, 50, generator=torch.Generator().manual_seed(2)
    )
    assert contrast.shape == (30, 51) and contrast.dtype == torch.long
    assert contrast[:, 0].tolist() == index.tolist()
    for anchor, row in zip(index.tolist(), contrast.tolist(), strict=True):
        assert all(LABELS[j] != LABELS[anchor] for j in row[1:])


@pytest.mark.parametrize("anchor_class", [0, 1, 2])
def test_negatives_are_uniform_over_every_image_of_the_other_classes(anchor_class: int):
    anchors = LABELS.eq(anchor_class).nonzero().flatten()
    index = anchors.repeat(400 // len(anchors) + 1)[:400]
    contrast = sample_contrast_indices(
        index, LABELS, 500, generator=torch.Generator().manual_seed(3 + anchor_class)
    )
    counts = torch.bincount(contrast[:, 1:].flatten(), minlength=30).double()
    others = LABELS.ne(anchor_class)
    assert (counts[~others] == 0).all()
    expected = 400 * 500 / int(others.sum())
    assert (counts[others] > 0).all()
    # Each count is binomial: std about sqrt(expected) (1.2% of 8000 for 25 other images).
    assert ((counts[others] - expected).abs() / expected).max() < 0.06
    chi_square = ((counts[others] - expected) ** 2 / expected).sum().item()
    assert chi_square < 3 * int(others.sum())  # about its degrees of freedom when uniform


def test_negatives_are_reproducible_with_a_seeded_generator():
    index = torch.tensor([3, 17, 29])
    first = sample_contrast_indices(index, LABELS, 64, generator=torch.Generator().manual_seed(5))
    again = sample_contrast_indices(index, LABELS, 64, generator=torch.Generator().manual_seed(5))
    other = sample_contrast_indices(index, LABELS, 64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    sampler = NegativeSampler(LABELS, 64)
    assert torch.equal(sampler(index, generator=torch.Generator().manual_seed(5)), first)


def test_sampler_refuses_a_single_class():
    with pytest.raises(KDLightError, match="two classes"):
        NegativeSampler(torch.zeros(10, dtype=torch.long), 4)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CRD(num_negatives=0), "distiller.num_negatives=0 is not allowed: an integer >= 1"),
        (lambda: VID(init_pred_var=0.0), "distiller.init_pred_var=0.0 is not allowed"),
        (lambda: NegativeSampler(LABELS, 0), "num_negatives must be at least 1, got 0"),
        (
            lambda: VIDRegressor(4, 6, init_pred_var=1e-6),
            r"init_pred_var \(1e-06\) must exceed eps",
        ),
    ],
)
def test_a_method_refuses_a_setting_out_of_its_declared_range_in_its_command_line_words(
    build, message
):
    with pytest.raises(KDLightError, match=message):
        build()
