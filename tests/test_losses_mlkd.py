"""MLKD's loss (kdlight.losses.mlkd_loss) against its formula written out here: every
probability, KL divergence, Gram matrix and median computed in float64 numpy, sample by
sample and class by class."""

import numpy as np
import pytest
import torch

from kdlight.losses import mlkd_loss


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    """T^2 times the batch's mean KL(p_t || p_s) at T."""
    p_s, p_t = softmax(s, temp), softmax(t, temp)
    return temp**2 * np.mean([np.sum(p_t[i] * np.log(p_t[i] / p_s[i])) for i in range(len(s))])


def gram_gap(s: np.ndarray, t: np.ndarray, temp: float, over_classes: bool) -> float:
    """Squared Frobenius distance of the teacher's and the student's Gram matrices at T
    (classes x classes, or samples x samples), over C (classes) or N (samples)."""
    p_s, p_t = softmax(s, temp), softmax(t, temp)
    if over_classes:
        p_s, p_t = p_s.T, p_t.T
    n = len(p_s)
    total = sum((p_t[a] @ p_t[b] - p_s[a] @ p_s[b]) ** 2 for a in range(n) for b in range(n))
    return total / n


def share(values: np.ndarray) -> float:
    """The fraction of ``values`` at most their median (numpy's, linear interpolation)."""
    return float(np.mean(values <= np.percentile(values, 50)))


@pytest.mark.parametrize("batch", [6, 7])  # the median of an even and of an odd count
def test_mlkd_loss_is_its_formula(batch):
    generator = torch.Generator().manual_seed(batch)
    logits = [torch.randn(batch, 5, generator=generator, dtype=torch.float64) * 3 for _ in range(4)]
    s_w, t_w, s_s, t_s = (x.numpy() for x in logits)
    temps, strong = (4.0, 3.0, 5.0, 2.0, 6.0), (4.0, 3.0, 5.0)
    p_t = softmax(t_w, 1.0)
    m = share(p_t.max(axis=1))  # the samples the teacher is least sure of, on the weak view
    m_c = share(p_t.sum(axis=0))  # the classes it gives least probability over the batch
    expected_kd = m * sum(kd(s_w, t_w, t) for t in temps)
    # the strong view's KD terms: at 2 and 6 the official code reads the weak view
    expected_kd += sum(kd(s_s, t_s, t) if t in strong else kd(s_w, t_w, t) for t in temps)
    expected_cc = m_c * sum(gram_gap(s_w, t_w, t, over_classes=True) for t in temps)
    expected_bc = m * sum(gram_gap(s_w, t_w, t, over_classes=False) for t in temps)
    parts = mlkd_loss(*(x.float() for x in logits))
    for name, value in (("kd", expected_kd), ("cc", expected_cc), ("bc", expected_bc)):
        assert parts[name].item() == pytest.approx(value, rel=1e-5), name
    assert parts["loss"].item() == pytest.approx(expected_kd + expected_cc + expected_bc, rel=1e-5)
    assert 0 < m < 1 and 0 < m_c < 1  # the masks scale the terms, as the official code does


def test_the_strong_view_at_every_temperature_and_a_teacher_copy():
    """``strong_temperatures`` equal to ``temperatures``: every strong-view KD term reads the
    strong view (the paper's form); a student equal to the teacher has a loss of 0."""
    generator = torch.Generator().manual_seed(0)
    s_w, t_w, s_s, t_s = (torch.randn(8, 10, generator=generator) for _ in range(4))
    temps = (2.0, 4.0)
    parts = mlkd_loss(s_w, t_w, s_s, t_s, temps, temps)
    m = share(softmax(t_w.double().numpy(), 1.0).max(axis=1))
    expected = sum(
        m * kd(s_w.double().numpy(), t_w.double().numpy(), t)
        + kd(s_s.double().numpy(), t_s.double().numpy(), t)
        for t in temps
    )
    assert parts["kd"].item() == pytest.approx(expected, rel=1e-5)
    same = mlkd_loss(t_w, t_w, t_s, t_s)
    assert all(abs(v.item()) < 1e-6 for v in same.values())
