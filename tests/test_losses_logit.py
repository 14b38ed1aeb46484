"""Logit losses against the papers' formulas written out in float64 numpy: ``kd_loss``
(Hinton et al., 2015; plain and with the logit standardization of Sun et al., 2024) and
``dkd_loss`` (Zhao et al., 2022)."""

import numpy as np
import pytest
import torch

from kdlight.distillers import DIST, Outputs
from kdlight.distillers.logit import CTKD
from kdlight.losses import KDLoss, dist_loss, kd_loss
from kdlight.losses.ctkd import ctkd_loss
from kdlight.losses.dkd import dkd_loss
from kdlight.losses.kd import standardize_logits

STUDENT = [
    [1.0, -2.0, 0.5, 3.0, 0.0],
    [0.0, 0.2, -1.0, 1.5, 2.5],
    [2.0, 2.0, -3.0, 0.0, 1.0],
    [-0.5, 4.0, 1.0, -2.0, 0.3],
]
TEACHER = [
    [2.0, -1.0, 0.0, 4.0, -0.5],
    [-1.0, 0.5, 0.5, 0.0, 3.0],
    [9.0, 1.0, -2.0, 0.0, 0.5],  # confident: p_t close to 1 at T = 1
    [0.0, 1.0, 3.0, -1.0, 0.0],  # the teacher is wrong here (argmax 2, target 1)
]
TARGETS = [3, 4, 0, 1]


def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)


# --- the formulas, one sample at a time, in float64 ---------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def np_standardize(z: np.ndarray) -> np.ndarray:
    """Z-score with the sample standard deviation (n - 1), as in the paper's code."""
    return (z - z.mean()) / (1e-7 + z.std(ddof=1))


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def soft_inputs(student, teacher, standardize):
    s, t = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    return (np_standardize(s), np_standardize(t)) if standardize else (s, t)


def reference_kd(student, teacher, targets, T, alpha, standardize):
    kd = ce = 0.0
    for s_row, t_row, y in zip(student, teacher, targets, strict=True):
        s, t = soft_inputs(s_row, t_row, standardize)
        kd += T * T * np_kl(np_softmax(t / T), np_softmax(s / T))
        ce += -np.log(np_softmax(np.asarray(s_row, dtype=np.float64))[y])  # raw logits
    n = len(targets)
    return {"loss": alpha * kd / n + (1 - alpha) * ce / n, "kd": kd / n, "ce": ce / n}


def reference_tckd_nckd(student_row, teacher_row, y, T, standardize):
    """TCKD and NCKD of one sample as the DKD paper defines them (no T^2)."""
    s, t = soft_inputs(student_row, teacher_row, standardize)
    p, q = np_softmax(t / T), np_softmax(s / T)
    others = np.arange(len(p)) != y
    p_rest, q_rest = p[others].sum(), q[others].sum()  # 1 - p_t without 1 - (1 - tiny)
    tckd = np_kl(np.array([p[y], p_rest]), np.array([q[y], q_rest]))
    nckd = np_kl(p[others] / p_rest, q[others] / q_rest)
    return tckd, nckd, p[y]


def reference_dkd(student, teacher, targets, T, alpha, beta, standardize):
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student, teacher, targets, strict=True):
        t_part, n_part, _ = reference_tckd_nckd(s_row, t_row, y, T, standardize)
        tckd, nckd = tckd + T * T * t_part, nckd + T * T * n_part
    n = len(targets)
    return {"loss": (alpha * tckd + beta * nckd) / n, "tckd": tckd / n, "nckd": nckd / n}


def assert_parts_close(parts: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert parts.keys() == expected.keys()
    for key, value in expected.items():
        assert parts[key].item() == pytest.approx(value, rel=1e-4, abs=1e-6), key  # float32


# --- kd_loss, plain and with logit standardization ------------------------------------


def reference_kd_gradient(student, teacher, targets, T, alpha):
    """d loss / d student logits of the KD loss, in closed form: each sample's soft term
    alpha T^2 KL(p || q) has gradient alpha T (q - p), its CE (1 - alpha)(softmax(z_s) - y),
    both divided by the batch size (Hinton et al., 2015, section 2.1)."""
    grad = np.zeros((len(targets), len(student[0])))
    for i, (s_row, t_row, y) in enumerate(zip(student, teacher, targets, strict=True)):
        s, t = np.asarray(s_row, dtype=np.float64), np.asarray(t_row, dtype=np.float64)
        one_hot = np.eye(len(s))[y]
        soft = alpha * T * (np_softmax(s / T) - np_softmax(t / T))
        grad[i] = soft + (1 - alpha) * (np_softmax(s) - one_hot)
    return grad / len(targets)


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.9), (16.0, 0.1)])
def test_kd_without_standardize_matches_the_formula_and_its_gradient(temperature, alpha):
    """The plain (not standardized) path against the float64 formula: its parts, the alpha
    and 1 - alpha weighting, the T^2 factor, and the gradient on the student's logits."""
    student, teacher, targets = tensors()
    student.requires_grad_(True)
    parts = kd_loss(student, teacher, targets, temperature, alpha)
    assert_parts_close(parts, reference_kd(STUDENT, TEACHER, TARGETS, temperature, alpha, False))
    parts["loss"].backward()
    expected = reference_kd_gradient(STUDENT, TEACHER, TARGETS, temperature, alpha)
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-4, atol=1e-7)  # float32


def test_kd_without_standardize_for_several_students_matches_the_formula():
    """(K, N, C) logits with a (K,) temperature and alpha: student k's parts and gradient are
    the formula's at its own T and alpha."""
    torch.manual_seed(0)
    student = (torch.randn(3, 8, 10) * 3).requires_grad_(True)
    teacher, targets = torch.randn(8, 10) * 3, torch.randint(0, 10, (8,))
    temperatures, alphas = [1.0, 4.0, 16.0], [0.1, 0.5, 0.9]
    parts = kd_loss(student, teacher, targets, torch.tensor(temperatures), torch.tensor(alphas))
    parts["loss"].sum().backward()
    rows = (student.detach().tolist(), teacher.tolist(), targets.tolist())
    for k, (T, alpha) in enumerate(zip(temperatures, alphas, strict=True)):
        expected = reference_kd(rows[0][k], rows[1], rows[2], T, alpha, False)
        assert_parts_close({key: value[k] for key, value in parts.items()}, expected)
        gradient = reference_kd_gradient(rows[0][k], rows[1], rows[2], T, alpha)
        np.testing.assert_allclose(student.grad[k].numpy(), gradient, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (2.0, 0.9), (4.0, 1.0)])
def test_kd_standardized_matches_the_formula(temperature: float, alpha: float):
    parts = kd_loss(*tensors(), temperature, alpha, standardize=True)
    assert_parts_close(parts, reference_kd(STUDENT, TEACHER, TARGETS, temperature, alpha, True))
    plain = kd_loss(*tensors(), temperature, alpha)
    assert torch.equal(parts["ce"], plain["ce"])  # CE sees the raw student logits
    assert not torch.allclose(parts["kd"], plain["kd"])


def test_standardize_is_a_z_score_with_the_sample_std():
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sample_std = (5.0 / 3.0) ** 0.5  # sqrt(sum((z - 2.5)^2) / (4 - 1))
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / (1e-7 + sample_std)
    torch.testing.assert_close(standardize_logits(z), expected)


@pytest.mark.parametrize(("scale", "shift"), [(3.0, 0.0), (0.25, -7.0), (1.0, 100.0)])
def test_standardization_ignores_shift_and_positive_scale(scale: float, shift: float):
    student, teacher, targets = tensors()
    moved_student, moved_teacher = scale * student + shift, 2.0 * teacher - 3.0
    close = {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(
        standardize_logits(moved_student), standardize_logits(student), **close
    )
    torch.testing.assert_close(
        kd_loss(moved_student, moved_teacher, targets, 4.0, 1.0, standardize=True)["kd"],
        kd_loss(student, teacher, targets, 4.0, 1.0, standardize=True)["kd"],
        **close,
    )
    torch.testing.assert_close(
        dkd_loss(moved_student, moved_teacher, targets, 4.0, standardize=True)["loss"],
        dkd_loss(student, teacher, targets, 4.0, standardize=True)["loss"],
        **close,
    )
    # without standardization the teacher's logit scale matters
    assert not torch.allclose(
        kd_loss(student, moved_teacher, targets, 4.0, 1.0)["kd"],
        kd_loss(student, teacher, targets, 4.0, 1.0)["kd"],
    )


def test_kd_module_passes_standardize_on():
    loss = KDLoss(temperature=2.0, alpha=0.3, standardize=True)
    assert "standardize=True" in repr(loss)
    torch.testing.assert_close(
        loss(*tensors())["loss"], kd_loss(*tensors(), 2.0, 0.3, standardize=True)["loss"]
    )


# --- dkd_loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "alpha", "beta", "standardize"),
    [(1.0, 1.0, 1.0, False), (4.0, 1.0, 8.0, False), (2.0, 0.5, 2.0, True), (4.0, 1.0, 8.0, True)],
)
def test_dkd_matches_the_formula(temperature, alpha, beta, standardize):
    parts = dkd_loss(*tensors(), temperature, alpha, beta, standardize=standardize)
    expected = reference_dkd(STUDENT, TEACHER, TARGETS, temperature, alpha, beta, standardize)
    assert_parts_close(parts, expected)


def test_dkd_defaults_are_mdistillers_cifar100_settings():
    torch.testing.assert_close(dkd_loss(*tensors()), dkd_loss(*tensors(), 4.0, 1.0, 8.0, False))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposes_kl_per_sample(temperature: float):
    """KL(p || q) = TCKD + (1 - p_t) NCKD (Zhao et al., eq. 3), one sample at a time."""
    student, teacher, targets = tensors()
    for i, y in enumerate(TARGETS):
        one = (student[i : i + 1], teacher[i : i + 1], targets[i : i + 1])
        parts = dkd_loss(*one, temperature, alpha=1.0, beta=1.0)
        tckd, nckd = (parts[k].item() / temperature**2 for k in ("tckd", "nckd"))
        assert parts["loss"].item() == pytest.approx(temperature**2 * (tckd + nckd), rel=1e-6)
        p = np_softmax(np.asarray(TEACHER[i], dtype=np.float64) / temperature)
        q = np_softmax(np.asarray(STUDENT[i], dtype=np.float64) / temperature)
        kl = np_kl(p, q)
        assert tckd + (1 - p[y]) * nckd == pytest.approx(kl, rel=1e-4, abs=1e-7)
        # the float64 reference satisfies it to rounding, and kd_loss computes the same KL
        ref_tckd, ref_nckd, p_t = reference_tckd_nckd(STUDENT[i], TEACHER[i], y, temperature, False)
        assert ref_tckd + (1 - p_t) * ref_nckd == pytest.approx(kl, rel=1e-12, abs=1e-15)
        kd = kd_loss(*one, temperature, alpha=1.0)["kd"].item() / temperature**2
        assert kd == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_dkd_confident_logits():
    """1 - p_t below float32's resolution, then below its smallest number: TCKD stays right,
    then finite (log(1 - p_t) comes from a log-sum-exp, not the log of a sum that underflows)."""
    student = torch.tensor([[30.0, 0.0, -1.0], [0.0, 1.0, 2.0]])
    teacher = torch.tensor([[20.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    targets = torch.tensor([0, 2])
    parts = dkd_loss(student, teacher, targets, temperature=1.0, alpha=1.0, beta=1.0)
    args = (student.tolist(), teacher.tolist(), targets.tolist(), 1.0, 1.0, 1.0, False)
    assert_parts_close(parts, reference_dkd(*args))
    parts = dkd_loss(student * 10, teacher * 10, targets, temperature=1.0)
    assert all(torch.isfinite(value) for value in parts.values())


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("loss", ["kd", "dkd"])
def test_gradients_reach_only_the_student(loss: str, standardize: bool):
    student, teacher, targets = (t.clone() for t in tensors())
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    if loss == "kd":
        parts = kd_loss(student, teacher, targets, 4.0, 0.9, standardize=standardize)
    else:
        parts = dkd_loss(student, teacher, targets, standardize=standardize)
    parts["loss"].backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_dkd_float32_under_mixed_precision():
    student, teacher, targets = (t.bfloat16() if t.is_floating_point() else t for t in tensors())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = dkd_loss(student, teacher, targets, standardize=True)
    assert all(value.dtype == torch.float32 for value in parts.values())


@pytest.mark.parametrize("standardize", [False, True])
def test_several_students_at_once_equal_one_at_a_time(standardize: bool):
    torch.manual_seed(0)
    students, teacher = torch.randn(3, 8, 10) * 3, torch.randn(8, 10) * 3
    targets = torch.randint(0, 10, (8,))
    temperatures, alphas, betas = (
        torch.tensor([1.0, 4.0, 8.0]),
        torch.tensor([0.1, 0.5, 1.0]),
        torch.tensor([1.0, 2.0, 8.0]),
    )
    kd_all = kd_loss(students, teacher, targets, temperatures, alphas, standardize)
    dkd_all = dkd_loss(students, teacher, targets, temperatures, alphas, betas, standardize)
    for k in range(3):
        T, alpha, beta = float(temperatures[k]), float(alphas[k]), float(betas[k])
        kd_one = kd_loss(students[k], teacher, targets, T, alpha, standardize)
        dkd_one = dkd_loss(students[k], teacher, targets, T, alpha, beta, standardize)
        for together, alone in ((kd_all, kd_one), (dkd_all, dkd_one)):
            for part in alone:
                torch.testing.assert_close(together[part][k], alone[part])


# --- dist_loss (Huang et al., 2022) ----------------------------------------------------------


def np_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of two vectors, with the official code's 1e-8 in the
    denominator (DIST_KD ``dist_kd.py``: ``cosine_similarity(..., eps=1e-8)``)."""
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.sqrt(a @ a) * np.sqrt(b @ b) + 1e-8))


def reference_dist(student, teacher, T, beta, gamma, standardize):
    """DIST's two terms as the paper writes them: T^2 (1 - mean correlation) over the rows
    of the (N, C) probabilities (inter-class, each sample) and over the columns
    (intra-class, each class across the batch)."""
    rows = [soft_inputs(s, t, standardize) for s, t in zip(student, teacher, strict=True)]
    p_s = np.stack([np_softmax(s / T) for s, _ in rows])
    p_t = np.stack([np_softmax(t / T) for _, t in rows])
    n, c = p_s.shape
    inter = T * T * (1 - sum(np_pearson(p_s[i], p_t[i]) for i in range(n)) / n)
    intra = T * T * (1 - sum(np_pearson(p_s[:, j], p_t[:, j]) for j in range(c)) / c)
    return {"loss": beta * inter + gamma * intra, "inter": inter, "intra": intra}


@pytest.mark.parametrize(
    ("temperature", "beta", "gamma", "standardize"),
    [(1.0, 1.0, 1.0, False), (4.0, 1.0, 1.0, False), (2.0, 0.5, 3.0, True)],
)
def test_dist_matches_the_formula(temperature, beta, gamma, standardize):
    student, teacher, _ = tensors()
    parts = dist_loss(student, teacher, temperature, beta, gamma, standardize=standardize)
    expected = reference_dist(STUDENT, TEACHER, temperature, beta, gamma, standardize)
    assert_parts_close(parts, expected)


def test_dist_is_zero_where_the_student_ranks_as_the_teacher_and_two_where_reversed():
    """Probabilities equal to the teacher's correlate at 1 (both terms 0); with two classes
    the student's probabilities that mirror the teacher's correlate at -1 in every sample
    and every class (each term 2 T^2)."""
    _, teacher, _ = tensors()
    parts = dist_loss(teacher.clone(), teacher, temperature=4.0)
    assert parts["inter"].item() == pytest.approx(0.0, abs=1e-4)
    assert parts["intra"].item() == pytest.approx(0.0, abs=1e-4)
    two = torch.tensor([[1.0, -1.0], [0.0, 2.0], [3.0, 0.5]])
    parts = dist_loss(two.flip(1), two, temperature=1.0)
    assert parts["inter"].item() == pytest.approx(2.0, rel=1e-5)
    assert parts["intra"].item() == pytest.approx(2.0, rel=1e-5)


def test_dist_method_adds_the_weighted_cross_entropy_and_its_defaults_are_the_official():
    """DIST = ce_weight * CE + weight * dist_loss; the defaults of its official CIFAR code
    (image_classification_sota configs/strategies/distill/dist_cifar.yaml: CE 1, DIST 2,
    dist_t4; beta = gamma = 1)."""
    student, teacher, targets = tensors()
    assert DIST().settings() == {
        "temperature": 4.0, "beta": 1.0, "gamma": 1.0, "weight": 2.0, "ce_weight": 1.0,
        "standardize": False,
    }  # fmt: skip
    method = DIST(temperature=2.0, beta=0.5, gamma=3.0, weight=1.5, ce_weight=0.25)
    parts = method(Outputs(student), Outputs(teacher), targets)
    expected = reference_dist(STUDENT, TEACHER, 2.0, 0.5, 3.0, False)
    ce = reference_kd(STUDENT, TEACHER, TARGETS, 1.0, 0.0, False)["ce"]
    expected |= {"loss": 0.25 * ce + 1.5 * expected["loss"], "ce": ce}
    assert_parts_close(parts, expected)


# --- ctkd_loss (Li et al., 2023): KD at a learned temperature ---------------------------------


def ctkd_temperature(theta: float, low: float = 1.0, span: float = 20.0) -> float:
    return low + span / (1.0 + np.exp(-theta))


@pytest.mark.parametrize(
    ("theta", "reversal", "standardize"),
    [(1.0, 0.5, False), (-2.0, 1.0, False), (-2.5, 1.0, True)],  # tau 15.6, 3.4, 2.5
)
def test_ctkd_matches_the_formula_and_reverses_the_temperatures_gradient(
    theta: float, reversal: float, standardize: bool
):
    """The KD term at tau = 1 + 20 sigmoid(theta) (the float64 KD formula above at that T),
    the student's gradient that of KD at tau, and theta's the KD term's slope in theta
    (a central difference of the formula), times -reversal."""
    student, teacher, _ = tensors()
    student.requires_grad_(True)
    parameter = torch.tensor(theta, requires_grad=True)
    parts = ctkd_loss(student, teacher, parameter, reversal, 1.0, 20.0, standardize)
    tau = ctkd_temperature(theta)

    def term(t: float) -> float:
        return reference_kd(STUDENT, TEACHER, TARGETS, t, 1.0, standardize)["kd"]

    assert parts.keys() == {"loss", "temperature"}
    assert parts["temperature"].item() == pytest.approx(tau, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(term(tau), rel=1e-4)
    parts["loss"].backward()
    step = 1e-4
    slope = (term(ctkd_temperature(theta + step)) - term(ctkd_temperature(theta - step))) / (
        2 * step
    )
    assert parameter.grad.item() == pytest.approx(-reversal * slope, rel=1e-3)
    if not standardize:
        expected = reference_kd_gradient(STUDENT, TEACHER, TARGETS, tau, 1.0)
        np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_ctkd_temperature_stays_within_its_range():
    student, teacher, _ = tensors()
    for theta, expected in ((-50.0, 2.0), (50.0, 7.0)):
        parts = ctkd_loss(student, teacher, torch.tensor(theta), 1.0, 2.0, 5.0)
        assert parts["temperature"].item() == pytest.approx(expected)


def test_ctkd_method_adds_the_weighted_cross_entropy_and_ramps_the_reversal_by_a_cosine():
    """CTKD = ce_weight * CE + alpha * the KD term; the reversed gradient's weight rises as
    (1 - cos(pi * (e + 1) / 10)) / 2 over the first 10 epochs (counted from 0), then stays
    at `reversal`; the defaults are the official CIFAR script's (CE 0.1, KD 0.9, tau in
    (1, 21), the parameter at 1)."""
    assert CTKD().settings() == {
        "alpha": 0.9, "ce_weight": 0.1, "min_temperature": 1.0, "temperature_range": 20.0,
        "reversal": 1.0, "ramp_epochs": 10, "standardize": False,
    }  # fmt: skip
    assert CTKD().raw_temperature.item() == 1.0
    for epoch in (0, 4, 9, 30):
        expected = (1 - np.cos(np.pi * min(epoch + 1, 10) / 10)) / 2
        assert CTKD().reversal_at(epoch) == pytest.approx(expected)
    assert CTKD(reversal=0.5, ramp_epochs=0).reversal_at(0) == 0.5
    student, teacher, targets = tensors()
    method = CTKD(alpha=2.0, ce_weight=0.25, min_temperature=2.0, temperature_range=4.0)
    with torch.no_grad():
        method.raw_temperature.fill_(-1.0)
    parts = method(Outputs(student), Outputs(teacher), targets, epoch=4)
    tau = ctkd_temperature(-1.0, 2.0, 4.0)
    reference = reference_kd(STUDENT, TEACHER, TARGETS, tau, 1.0, False)
    expected = {"loss": 0.25 * reference["ce"] + 2.0 * reference["kd"], "ce": reference["ce"]}
    assert_parts_close(parts, expected | {"kd": reference["kd"], "temperature": tau})
    parts["loss"].backward()
    step = 1e-4  # theta's gradient at epoch 4: the slope of alpha times the term, times -1/2

    def term(theta: float) -> float:
        t = ctkd_temperature(theta, 2.0, 4.0)
        return reference_kd(STUDENT, TEACHER, TARGETS, t, 1.0, False)["kd"]

    slope = (term(-1.0 + step) - term(-1.0 - step)) / (2 * step)
    assert method.raw_temperature.grad.item() == pytest.approx(-0.5 * 2.0 * slope, rel=1e-3)
