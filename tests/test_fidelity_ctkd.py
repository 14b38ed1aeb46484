"""CTKD as ``kdlight-train experiment=zoo_distill pair=... distiller=ctkd`` runs it equals its
official code (zhengli97/CTKD), one training step on a 3-stage pair (resnet56 -> resnet20) and
a 4-stage pair (vgg13 -> vgg8), early in the ramp of the reversed gradient, halfway up it and
after it: each part (the learned temperature included), the total, the gradient of every
student parameter and the reversed gradient of the temperature's parameter.

The official wiring is written here from that code (never imported: the comments cite its
file and line) and run on the official networks (:mod:`tests.official.models`; the CTKD
repository's ``models/`` are RepDistiller's) holding kdlight's weights, with its temperature
module holding kdlight's parameter. The module, batch and comparisons are those of
tests/test_fidelity_logit.py, reused.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.official.models import official_copy_of
from tests.test_fidelity_logit import (
    PAIRS,
    RTOL,
    assert_close,
    assert_same_gradients,
    fixed_batch,
    kdlight_module,
    official_gradients,
    zoo_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: The official CIFAR-100 run, scripts/run_cifar_distill.sh:17-22, as train_student.py
#: names its options: ``gamma`` (``-r``) the CE weight, ``alpha`` (``-a``) the KD weight,
#: ``beta`` (``-b``) that of an extra loss (none: ``--distill kd``, loops.py:144-145);
#: ``t_start``, ``t_end`` the defaults of train_student.py:89-90; the cosine of
#: ``--cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10``.
OFFICIAL = {
    "gamma": 0.1, "alpha": 0.9, "beta": 0.0, "t_start": 1.0, "t_end": 20.0,
    "decay_max": 0.0, "decay_min": -1.0, "decay_loops": 10,
}  # fmt: skip
DECAY = ("decay_max", "decay_min", "decay_loops")  # CosineDecay's arguments, in order


# ------------------------------------------------------------------ the official code
class OfficialGradientReversalFunction(torch.autograd.Function):
    """models/temp_global.py:22-38: the identity, the gradient multiplied by ``lambda_``
    (negative in the official run: the reversal is in the sign of the cosine's value)."""

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads: Tensor) -> tuple[Tensor, None]:
        lambda_ = grads.new_tensor(ctx.lambda_)
        return lambda_ * grads, None


class OfficialGlobalT(nn.Module):
    """models/temp_global.py:9-17 (``Global_T``): one learned number, 1 at the start, through
    the gradient reversal; the inputs are not read."""

    def __init__(self) -> None:
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)

    def forward(self, fake_input1: Tensor, fake_input2: Tensor, lambda_: float) -> Tensor:
        return OfficialGradientReversalFunction.apply(self.global_T, lambda_)


def official_cosine_decay(i: int, max_value: float, min_value: float, num_loops: int) -> float:
    """train_student.py:186-202 (``CosineDecay.get_value``)."""
    i = min(max(i, 0), num_loops)
    value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
    return value * (max_value - min_value) + min_value


def official_distill_kl(y_s: Tensor, y_t: Tensor, temp: Tensor) -> Tensor:
    """distiller_zoo/KD.py:13-20 (``DistillKL.forward``; ``.cuda()`` left out)."""
    T = temp  # noqa: N806
    return (
        nn.KLDivLoss(reduction="batchmean")(
            F.log_softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1)
        )
        * T
        * T
    )


def official_step(
    logit_s: Tensor, logit_t: Tensor, target: Tensor, mlp_net: OfficialGlobalT, epoch: int
) -> dict[str, Tensor]:
    """The losses of one step of helper/loops.py:126-174 (``train_distill`` with
    ``have_mlp`` and ``--distill kd``), at the official ``epoch`` (counted from 1), whose
    gradient weight is the cosine's value of that epoch (train_student.py:401-421)."""
    cos_value = official_cosine_decay(epoch, *[OFFICIAL[key] for key in DECAY])
    temp = mlp_net(logit_t, logit_s, cos_value)  # loops.py:133-134
    temp = OFFICIAL["t_start"] + OFFICIAL["t_end"] * torch.sigmoid(temp)
    loss_cls = F.cross_entropy(logit_s, target)  # criterion_cls, train_student.py:313
    loss_div = official_distill_kl(logit_s, logit_t, temp)
    loss_kd = 0  # loops.py:144-145
    loss = OFFICIAL["gamma"] * loss_cls + OFFICIAL["alpha"] * loss_div + OFFICIAL["beta"] * loss_kd
    return {"loss": loss, "ce": loss_cls, "kd": loss_div, "temperature": temp}


# ------------------------------------------------------------------ the comparison
#: kdlight's epochs (from 0) and the temperature's parameter there: the reversed gradient's
#: weight about 0.024 (the ramp's first epoch, at the official start: tau 15.6), 0.5 (its
#: middle, tau 3.4) and 1 (after it, tau 4.6)
POINTS = [(0, 1.0), (4, -2.0), (12, -1.5)]


def cancelling(parts: dict[str, Tensor], reversal: float) -> float:
    """The size of the two terms that cancel in the temperature parameter's gradient,
    :math:`\lambda \, (d\tau / d\theta) \, (2 \tau \mathrm{KL} + \tau^2 \, d\mathrm{KL} /
    d\tau)`: at a high temperature :math:`\tau^2 \mathrm{KL}` hardly moves with
    :math:`\tau`, and the gradient is a small difference of two large terms (at tau 15.6,
    0.019 of 2.8, measured), which float32 rounds on their scale, not its own: measured in
    float64, kdlight's and the official gradient are off by up to 3e-4 of the gradient but
    3e-6 of these terms. The comparison allows RTOL of them."""
    tau, kd = parts["temperature"].item(), parts["kd"].item()
    slope = (tau - OFFICIAL["t_start"]) * (1.0 - (tau - OFFICIAL["t_start"]) / OFFICIAL["t_end"])
    return abs(reversal) * slope * 2.0 * kd / tau


def compare_one_step(pair: str, tmp_path: Path, *overrides: str) -> None:
    """One kdlight training step of the composed config and the official step on copies of
    the same weights at each of :data:`POINTS`: every part, the total, the gradient of every
    student parameter and that of the temperature's parameter agree."""
    teacher_name, student_name, _ = PAIRS[pair]
    module = kdlight_module(zoo_config(pair, "ctkd", tmp_path, *overrides))
    assert not module.teacher.training
    student = official_copy_of(student_name, module.model)
    teacher = official_copy_of(teacher_name, module.teacher).eval()
    mlp_net = OfficialGlobalT().train()
    images, labels = fixed_batch()
    with torch.no_grad():  # the teacher right on half the batch, as a trained one mostly is
        labels[::2] = module.teacher(images).argmax(1)[::2]
    parameter = module.distiller.raw_temperature
    for epoch, theta in POINTS:
        with torch.no_grad():
            parameter.fill_(theta)
            mlp_net.global_T.fill_(theta)
        module.trainer.fit_loop.epoch_progress.current.completed = epoch
        module.zero_grad()
        parts = module.training_step((images, labels), 0)
        parts["loss"].backward()
        student.zero_grad()
        mlp_net.zero_grad()
        logit_s = student(images)
        with torch.no_grad():  # loops.py:128-130
            logit_t = teacher(images)
        official = official_step(logit_s, logit_t, labels, mlp_net, epoch=epoch + 1)
        official["loss"].backward()
        cos_value = official_cosine_decay(epoch + 1, *[OFFICIAL[k] for k in DECAY])
        where = f"{pair} ctkd epoch {epoch}"
        for part in ("ce", "kd", "temperature"):
            assert_close(parts[part], official[part].reshape(()), f"{where}: {part}")
        assert_close(parts["loss"], official["loss"].reshape(()), f"{where}: the total")
        assert_same_gradients(official_gradients(student_name, module.model), student, where)
        reversed_gradient = mlp_net.global_T.grad.reshape(())
        assert reversed_gradient.abs() > 0, f"{where}: the temperature's gradient is 0"
        rounding = RTOL * cancelling(official, cos_value)
        what = f"{where}: the temperature's gradient"
        assert_close(parameter.grad, reversed_gradient, what, rounding)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_one_step_equals_the_official_code(pair: str, tmp_path: Path):
    compare_one_step(pair, tmp_path)


@pytest.mark.parametrize(
    "wrong",
    [
        "distiller.temperature_range=19.0",  # the temperature kept in [1, 20], not (1, 21)
        "distiller.ramp_epochs=5",  # another ramp: only the temperature's gradient moves
    ],
)
def test_the_comparison_catches_a_setting_that_is_not_the_official_one(wrong: str, tmp_path: Path):
    with pytest.raises(AssertionError, match="vgg13_vgg8"):
        compare_one_step("vgg13_vgg8", tmp_path, wrong)


def test_the_temperature_is_trained_and_saved_with_the_student(tmp_path: Path):
    """The temperature's parameter is in the optimizer, with the student's learning rate and
    weight decay (the official code's one SGD over the student and ``Global_T``,
    train_student.py:309-311,379-382), and in the checkpoint's state."""
    module = kdlight_module(zoo_config("resnet56_resnet20", "ctkd", tmp_path))
    parameter = module.distiller.raw_temperature
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    (group,) = optimizer.param_groups
    assert any(p is parameter for p in group["params"])
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.05, 5e-4, 0.9)
    assert "distiller.raw_temperature" in module.state_dict()
