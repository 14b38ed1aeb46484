"""NST's and KDSVD's losses (kdlight.losses.kernels) against their formulas written out with
plain Python floats, singular vectors from numpy's eigendecomposition (float64); the
methods' connectors and one-line errors."""

import math

import lightning as L
import numpy as np
import pytest
import torch

from kdlight.config.settings import check
from kdlight.distillers import KDSVD, NST
from kdlight.errors import KDLightError
from kdlight.lit import DistillationModule
from kdlight.losses import kdsvd_loss, nst_loss
from kdlight.losses.kernels import _SingularVectors
from kdlight.models import create_model
from tests.test_losses_feature import dot, pool


def maps(shapes: list[tuple[int, ...]], seed: int, relu: bool = True) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    made = [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]
    return [m.clamp(min=0) if relu else m for m in made]


# --- NST --------------------------------------------------------------------------------


def reference_nst(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> float:
    """Per stage and sample: each channel's pooled map flattened and divided by its norm,
    MMD^2 = mean k(t, t') + mean k(s, s') - 2 mean k(s, t), k(x, y) = (x . y)^2; the
    mean over samples, the sum over stages."""

    def channels(sample: list, out_h: int, out_w: int) -> list[list[float]]:
        flat = [[v for row in pool(grid, out_h, out_w) for v in row] for grid in sample]
        return [[v / math.sqrt(dot(c, c)) for v in c] for c in flat]

    def mean_kernel(a: list[list[float]], b: list[list[float]]) -> float:
        return sum(dot(x, y) ** 2 for x in a for y in b) / (len(a) * len(b))

    total = 0.0
    for student, teacher in zip(students, teachers, strict=True):
        out_h = min(student.shape[2], teacher.shape[2])
        out_w = min(student.shape[3], teacher.shape[3])
        per_sample = []
        for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
            cs, ct = channels(s, out_h, out_w), channels(t, out_h, out_w)
            per_sample.append(mean_kernel(ct, ct) + mean_kernel(cs, cs) - 2 * mean_kernel(cs, ct))
        total += sum(per_sample) / len(per_sample)
    return total


def test_nst_is_its_formula_on_maps_of_other_channels_and_sizes():
    # stage 1: the student's 4x4 map pooled to the teacher's 2x2; stage 2: the teacher's
    # 6x6 pooled to the student's 3x3 (bins of 2x2); other channel counts
    students = maps([(3, 5, 4, 4), (3, 4, 3, 3)], seed=0, relu=False)
    teachers = maps([(3, 2, 2, 2), (3, 6, 6, 6)], seed=1, relu=False)
    loss = nst_loss(students, teachers)
    assert loss.dtype == torch.float32  # computed in float32, as every loss
    assert loss.item() == pytest.approx(reference_nst(students, teachers), rel=1e-5)


def test_nst_is_zero_for_the_teachers_maps_and_the_teacher_has_no_gradient():
    teachers = maps([(2, 4, 4, 4)], seed=2)
    student = teachers[0].clone().requires_grad_()
    assert nst_loss([student], teachers).item() == pytest.approx(0.0, abs=1e-6)
    teacher = teachers[0].clone().requires_grad_()
    nst_loss([maps([(2, 3, 4, 4)], seed=3)[0].requires_grad_()], [teacher]).backward()
    assert teacher.grad is None


# --- KDSVD ------------------------------------------------------------------------------


def leading_vectors(matrix: list[list[float]], count: int) -> tuple[list, list]:
    """The ``count`` leading right singular vectors of ``matrix`` (rows: positions) as
    columns ``[channel][m]``, and its ``count`` largest singular values: eigenvectors of
    M^T M by numpy's ``eigh``, signs as it leaves them."""
    m = np.array(matrix)
    values, vectors = np.linalg.eigh(m.T @ m)
    order = np.argsort(values)[::-1][: min(count, *m.shape)]
    singular = [math.sqrt(max(values[i], 0.0)) for i in order]
    return [[vectors[c, i] for i in order] for c in range(m.shape[1])], singular


def reference_kdsvd(students: list[torch.Tensor], teachers: list[torch.Tensor], k: int) -> float:
    """Per sample and stage: each map a (positions x channels) matrix; the teacher's k
    leading right singular vectors (each turned to the sign torch's SVD gives it: the loss
    depends on it, and any routine's choice is arbitrary) and its k values divided by their
    norm; of the student's k + 3, for each teacher vector the one of largest |cosine|,
    times that cosine's sign; both scaled by the teacher's values. Between stages l - 1 and
    l: the sum over i, j, m of (exp(-(s_im - s'_jm)^2 / 8) - exp(-(t_im - t'_jm)^2 / 8))^2;
    the sum over stages and samples, over the batch size."""
    total = 0.0
    batch = students[0].shape[0]
    for b in range(batch):
        previous = None
        for student, teacher in zip(students, teachers, strict=True):
            as_matrix = [  # (positions, channels)
                [
                    list(channel)
                    for channel in zip(*[c.flatten().tolist() for c in x[b]], strict=True)
                ]
                for x in (student, teacher)
            ]
            v_t, values = leading_vectors(as_matrix[1], k)
            routine = torch.linalg.svd(teacher[b].float().flatten(1).T, full_matrices=False)[2]
            for m in range(len(values)):
                column = [v_t[c][m] for c in range(len(v_t))]
                if dot(column, routine[m].tolist()) < 0:
                    for c in range(len(v_t)):
                        v_t[c][m] = -v_t[c][m]
            norm = math.sqrt(sum(v * v for v in values))
            sigma = [v / norm for v in values]
            v_s, _ = leading_vectors(as_matrix[0], k + 3)
            aligned = [[0.0] * len(sigma) for _ in v_t]
            for m in range(len(sigma)):
                teacher_vector = [v_t[c][m] for c in range(len(v_t))]
                cosines = [
                    dot([v_s[c][n] for c in range(len(v_s))], teacher_vector)
                    for n in range(len(v_s[0]))
                ]
                best = max(range(len(cosines)), key=lambda n: abs(cosines[n]))
                for c in range(len(v_s)):
                    aligned[c][m] = math.copysign(1.0, cosines[best]) * v_s[c][best]
            current = (
                [[aligned[c][m] * sigma[m] for m in range(len(sigma))] for c in range(len(v_s))],
                [[v_t[c][m] * sigma[m] for m in range(len(sigma))] for c in range(len(v_t))],
            )
            if previous is not None:
                (s, t), (s0, t0) = current, previous
                for i in range(len(s)):
                    for j in range(len(s0)):
                        for m in range(len(sigma)):
                            ks = math.exp(-((s[i][m] - s0[j][m]) ** 2) / 8)
                            kt = math.exp(-((t[i][m] - t0[j][m]) ** 2) / 8)
                            total += (ks - kt) ** 2
            previous = current
    return total / batch


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_is_its_formula(k: int):
    # as many channels per stage in both, other sizes (nothing is pooled); a (4 x 6) matrix
    # has 4 singular vectors, fewer than the student's k + 3 = 5 candidates at k = 2
    students = maps([(2, 3, 4, 4), (2, 5, 3, 3), (2, 6, 2, 2)], seed=4)
    teachers = maps([(2, 3, 5, 5), (2, 5, 2, 2), (2, 6, 3, 3)], seed=5)
    loss = kdsvd_loss(students, teachers, singular_vectors=k)
    assert loss.dtype == torch.float32
    expected = reference_kdsvd([s.float().double() for s in students], teachers, k)
    assert expected > 0
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_kdsvd_is_zero_for_the_teachers_maps_and_the_teacher_has_no_gradient():
    teachers = maps([(2, 3, 4, 4), (2, 5, 2, 2)], seed=6)
    students = [t.clone().requires_grad_() for t in teachers]
    assert kdsvd_loss(students, teachers).item() == pytest.approx(0.0, abs=1e-6)
    copies = [t.clone().requires_grad_() for t in teachers]
    students = [s.requires_grad_() for s in maps([(2, 3, 4, 4), (2, 5, 2, 2)], seed=7)]
    kdsvd_loss(students, copies).backward()
    assert all(t.grad is None for t in copies)


def test_kdsvd_keeps_the_students_vector_most_aligned_of_its_k_plus_3_leading():
    """Each student map is made with the teacher's leading right singular vector as its own
    fourth (the others the teacher's next, as its first three): the kept vector is it, and
    the loss 0; of 3 candidates only it would not be."""
    generator = torch.Generator().manual_seed(12)
    teachers = [torch.randn(2, 5, 3, 3, generator=generator) for _ in range(2)]
    students = []
    for teacher in teachers:
        made = []
        for sample in teacher:
            vectors = torch.linalg.svd(sample.flatten(1).T, full_matrices=False)[2].T  # (C, C)
            fourth = vectors[:, [1, 2, 3, 0, 4]]
            left = torch.linalg.qr(torch.randn(9, 5, generator=generator))[0]
            values = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
            made.append((left @ torch.diag(values) @ fourth.T).T.reshape(5, 3, 3))
        students.append(torch.stack(made))
    assert kdsvd_loss(students, teachers).item() == pytest.approx(0.0, abs=1e-6)
    expected = reference_kdsvd([s.double() for s in students], teachers, 1)
    assert expected == pytest.approx(0.0, abs=1e-6)


def test_kdsvds_svd_gradient_is_autograds_but_where_that_divides_by_zero():
    generator = torch.Generator().manual_seed(14)
    for shape in ((2, 9, 5), (2, 5, 9)):  # more positions than channels, and fewer
        matrix = torch.randn(*shape, generator=generator, dtype=torch.float64)
        weights = torch.randn(2, shape[2], 3, generator=generator, dtype=torch.float64)
        grads = []
        for decompose in (_SingularVectors.apply, None):
            leaf = matrix.clone().requires_grad_()
            if decompose is None:
                values, right_h = torch.linalg.svd(leaf, full_matrices=False)[1:]
                vectors = right_h.mT
            else:
                values, vectors = decompose(leaf)
            (values.sum() + (vectors[..., :3] * weights).sum()).backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    # two zero columns: two singular values exactly 0, autograd's gradient NaN
    matrix = torch.randn(2, 6, 4, generator=generator)
    matrix[..., 2:] = 0
    for decompose, finite in ((_SingularVectors.apply, True), (None, False)):
        leaf = matrix.clone().requires_grad_()
        if decompose is None:
            vectors = torch.linalg.svd(leaf, full_matrices=False)[2].mT
        else:
            vectors = decompose(leaf)[1]
        vectors[..., :1].sum().backward()
        assert bool(torch.isfinite(leaf.grad).all()) == finite


def test_kdsvd_needs_two_stages_and_the_same_channels():
    two = maps([(2, 3, 4, 4), (2, 5, 2, 2)], seed=8)
    with pytest.raises(ValueError, match="at least 2"):
        kdsvd_loss(two[:1], two[:1])
    with pytest.raises(ValueError, match=r"^stage 1: KDSVD needs the same batch size and"):
        kdsvd_loss(two, [two[0], maps([(2, 4, 2, 2)], seed=9)[0]])


# --- the methods ------------------------------------------------------------------------


def test_kdsvd_maps_a_stage_of_other_channels_with_a_trained_1x1_convolution():
    """kdlight's own addition (the official code needs as many channels): a connector only
    where a stage's channels differ, trained with the student and saved with it, while
    the teacher gets no gradient."""
    method = KDSVD()
    method.build(
        {"a": torch.Size([4, 8, 8]), "b": torch.Size([6, 4, 4])},
        {"a": torch.Size([4, 16, 16]), "b": torch.Size([12, 4, 4])},
    )
    identity, conv = method.connectors
    assert isinstance(identity, torch.nn.Identity) and isinstance(conv, torch.nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (6, 12, (1, 1))
    assert conv.bias is None

    torch.manual_seed(0)  # small_cnn's stages have 8, 16, 32 channels, resnet8's 16, 32, 64
    student, teacher = create_model("small_cnn", width=0.25), create_model("resnet8")
    module = DistillationModule(student, teacher=teacher, distiller=KDSVD())
    connectors = module.distiller.connectors
    assert [(c.in_channels, c.out_channels) for c in connectors] == [(8, 16), (16, 32), (32, 64)]
    module.trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    module.train()
    generator = torch.Generator().manual_seed(13)
    batch = torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3])
    parts = module.training_step(batch, 0)
    assert set(parts) == {"loss", "ce", "kdsvd"} and parts["kdsvd"] > 0
    parts["loss"].backward()
    trained = {id(p) for p in module.trainable_parameters()}
    for connector in connectors:
        assert id(connector.weight) in trained and connector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert {f"distiller.connectors.{i}.weight" for i in range(3)} <= set(module.state_dict())


def test_the_methods_one_line_errors():
    with pytest.raises(KDLightError, match="^distiller=kdsvd relates consecutive stages"):
        KDSVD().build({"a": torch.Size([4, 8, 8])}, {"a": torch.Size([4, 8, 8])})
    message = (
        r"^distiller.singular_vectors=5 is not allowed: the teacher's b of shape \(6, 2, 2\) "
        r"has 4, so it must be in \[1, 4\]$"
    )
    with pytest.raises(KDLightError, match=message):
        KDSVD(singular_vectors=5).build(
            {"a": torch.Size([8, 8, 8]), "b": torch.Size([6, 2, 2])},
            {"a": torch.Size([8, 8, 8]), "b": torch.Size([6, 2, 2])},
        )
    message = "^distiller.singular_vectors=0 is not allowed: an integer >= 1$"
    with pytest.raises(KDLightError, match=message):
        KDSVD(singular_vectors=0)
    with pytest.raises(KDLightError, match=message):
        check("distiller", singular_vectors=0)
    with pytest.raises(KDLightError, match="^distiller.pairing=middle is not allowed"):
        NST(pairing="middle")
