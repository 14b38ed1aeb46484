"""The stage methods (FitNet, AT, SP, VID, NST, KDSVD) as a command-line user gets them
equal the official CIFAR code, step for step.

Each step test composes the real config (``experiment=zoo_distill pair=<pair>
distiller=<method>``), builds kdlight's ``DistillationModule`` from it as ``kdlight-train``
does, and runs one training step on a fixed batch. The same step is then computed the
official way, written here from RepDistiller (``train_student.py``, ``helper/loops.py``,
``distiller_zoo/*.py``, ``models/util.py``; mdistiller's
``distillers/{FitNet,AT,SP,VID,NST}.py`` agree, its ``KDSVD.py`` decomposes other matrices) on the official networks (``tests/official/models.py``) holding the same weights,
with the official connectors given kdlight's initial connector weights. Each loss part, the
total, and the gradient of every student and connector parameter must agree.

The other tests settle how the stages of two networks are paired (kdlight pairs the
deepest, the official code ``zip``s from the shallowest): the same pairs on every shipped
pair, and what each pairing reads where the depths differ.
"""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from kdlight.config.settings import validate_settings
from kdlight.distillers import AT, VID, resolve_taps
from kdlight.errors import KDLightError
from kdlight.lit import DistillationModule
from kdlight.models import build_model, create_model
from kdlight.models.published import official_names
from kdlight.models.taps import FeatureTaps, default_taps
from tests.conftest import compose_config
from tests.official.models import official_copy_of, randomise_

#: The relative tolerance of every comparison. Both sides compute in float32 with the same
#: operations, in orders that may differ (convolution algorithms, sums); float32 needs no
#: more than 1e-4 here: measured (CPU), at most 2.2e-6 of a tensor's largest entry
#: (resnet56_resnet20's student gradients; the residual sums are grouped differently), and
#: vgg13_vgg8 equal to the bit.
RTOL = 1e-4
#: A gradient that is zero but for rounding, such as that of a convolution's bias just before
#: a train-mode BatchNorm (vgg's), is rounding noise on both sides, at most NOISE of the
#: student's largest gradient entry; it is checked to stay noise rather than to be equal.
#: Needed where kdlight sums in another order than the official code (NST's kernels as
#: matrix products): vgg13_vgg8's pre-BN biases measured at most 5.5e-7 of it (CPU).
NOISE = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------- the official wiring
#: RepDistiller's ``--distill`` name and ``-b`` (the weight of the method's term) of each
#: method, from scripts/run_cifar_distill.sh (lines 7, 9, 11, 15), which also pass ``-a 0``
#: (no KD term) and leave ``-r`` (gamma, the CE weight) at 1 (train_student.py:73).
OFFICIAL = {
    "fitnet": ("hint", 100.0),
    "at": ("attention", 1000.0),
    "sp": ("similarity", 3000.0),
    "vid": ("vid", 1.0),
    "nst": ("nst", 50.0),
    # no KDSVD line in run_cifar_distill.sh (and -b has no default, train_student.py:75):
    # mdistiller's weight, engine/cfg.py:97 (KDSVD.LOSS.FEAT_WEIGHT)
    "kdsvd": ("kdsvd", 1.0),
}
GAMMA, ALPHA = 1.0, 0.0  # -r, -a of run_cifar_distill.sh
KD_T = 4.0  # train_student.py:78, --kd_T: DistillKL's temperature (weighted by ALPHA = 0)
HINT_LAYER = 2  # train_student.py:88, --hint_layer default
INIT_PRED_VAR, EPS = 5.0, 1e-5  # distiller_zoo/VID.py:16-17, VIDLoss defaults
KDSVD_K = 1  # distiller_zoo/KDSVD.py:13, KDSVD(k=1) as train_student.py:210 builds it
#: NST's official kernels multiply out B x C x C x H*W products (vgg13_vgg8: 33M floats a
#: kernel at 8 images, most of the test's time); its loss is a mean over samples, so 4 do
BATCH_SIZE = {"nst": 4}


class ConvReg(nn.Module):
    """FitNet's connector, RepDistiller models/util.py:131-154 (use_relu=True)."""

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size) -> None:
        super().__init__()
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise NotImplementedError(f"student size {s_h}, teacher size {t_h}")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def attention(g_s: list[Tensor], g_t: list[Tensor], p: float = 2) -> list[Tensor]:
    """RepDistiller distiller_zoo/AT.py:15-29: one loss per zipped pair of maps."""

    def at(f: Tensor) -> Tensor:
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    losses = []
    for f_s, f_t in zip(g_s, g_t, strict=False):  # the official zip: to the shorter
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        losses.append((at(f_s) - at(f_t)).pow(2).mean())
    return losses


def similarity(g_s: list[Tensor], g_t: list[Tensor]) -> list[Tensor]:
    """RepDistiller distiller_zoo/SP.py:13-30: one ``(1,)`` loss per zipped pair."""
    losses = []
    for f_s, f_t in zip(g_s, g_t, strict=False):  # the official zip: to the shorter
        bsz = f_s.shape[0]
        f_s, f_t = f_s.view(bsz, -1), f_t.view(bsz, -1)
        g_s_ = F.normalize(torch.mm(f_s, torch.t(f_s)))
        g_t_ = F.normalize(torch.mm(f_t, torch.t(f_t)))
        g_diff = g_t_ - g_s_
        losses.append((g_diff * g_diff).view(-1, 1).sum(0) / (bsz * bsz))
    return losses


def nst(g_s: list[Tensor], g_t: list[Tensor]) -> list[Tensor]:
    """RepDistiller distiller_zoo/NST.py:13-42 (full_loss=True): one loss per zipped pair."""

    def poly_kernel(a: Tensor, b: Tensor) -> Tensor:
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    losses = []
    for f_s, f_t in zip(g_s, g_t, strict=False):  # the official zip: to the shorter
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
        losses.append(
            poly_kernel(f_t, f_t).mean().detach()
            + poly_kernel(f_s, f_s).mean()
            - 2 * poly_kernel(f_s, f_t).mean()
        )
    return losses


def kdsvd(g_s: list[Tensor], g_t: list[Tensor], k: int = KDSVD_K) -> list[Tensor]:
    """RepDistiller distiller_zoo/KDSVD.py:17-75: one loss per consecutive pair of stages."""

    def removenan(x: Tensor) -> Tensor:
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

    def svd(feat: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
        size = feat.shape
        x = feat.view(-1, size[1], size[2] * size[2]).transpose(-2, -1)
        u, s, v = torch.svd(x)
        u, s, v = removenan(u), removenan(s), removenan(v)
        if n > 0:
            u = F.normalize(u[:, :, :n], dim=1)
            s = F.normalize(s[:, :n], dim=1)
            v = F.normalize(v[:, :, :n], dim=1)
        return u, s, v

    def align_rsv(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        cosine = torch.matmul(a.transpose(-2, -1), b)
        max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
        mask = torch.where(
            torch.eq(max_abs_cosine, torch.abs(cosine)),
            torch.sign(cosine),
            torch.zeros_like(cosine),
        )
        return torch.matmul(a, mask), b

    v_sb = v_tb = None
    losses = []
    for i, f_s, f_t in zip(range(len(g_s)), g_s, g_t, strict=False):
        _, s_t, v_t = svd(f_t, k)
        _, _, v_s = svd(f_s, k + 3)
        v_s, v_t = align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t = v_t * s_t
        v_s = v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2loss = (s_rbf - t_rbf.detach()).pow(2)
            l2loss = torch.where(torch.isfinite(l2loss), l2loss, torch.zeros_like(l2loss))
            losses.append(l2loss.sum())
        v_tb, v_sb = v_t, v_s
    bsz = g_s[0].shape[0]
    return [loss / bsz for loss in losses]


class VIDLoss(nn.Module):
    """RepDistiller distiller_zoo/VID.py:9-54, built as train_student.py:219-226 builds it:
    ``VIDLoss(s, t, t)``, the middle width the teacher's."""

    def __init__(self, s_c: int, mid_c: int, t_c: int) -> None:
        super().__init__()

        def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False, stride=1)

        self.regressor = nn.Sequential(
            conv1x1(s_c, mid_c), nn.ReLU(), conv1x1(mid_c, mid_c), nn.ReLU(), conv1x1(mid_c, t_c)
        )
        # VID.py:33-35 (numpy's log and exp there, in float64 too)
        start = math.log(math.exp(INIT_PRED_VAR - EPS) - 1.0)
        self.log_scale = nn.Parameter(start * torch.ones(t_c))
        self.eps = EPS

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        s_h, t_h = input.shape[2], target.shape[2]
        if s_h > t_h:
            input = F.adaptive_avg_pool2d(input, (t_h, t_h))
        elif s_h < t_h:
            target = F.adaptive_avg_pool2d(target, (s_h, s_h))
        pred_mean = self.regressor(input)
        pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
        return torch.mean(neg_log_prob)


def distill_kl(y_s: Tensor, y_t: Tensor, temperature: float) -> Tensor:
    """RepDistiller distiller_zoo/KD.py:13-17 (criterion_div; weighted by ALPHA = 0)."""
    p_s = F.log_softmax(y_s / temperature, dim=1)
    p_t = F.softmax(y_t / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * temperature**2 / y_s.shape[0]


def official_connector(distill: str, model_s: nn.Module, model_t: nn.Module) -> nn.Module | None:
    """The trainable module the official code adds for ``distill``, sized as
    train_student.py:170-226 sizes it: from the feature lists of two random images, both
    networks in eval mode (their modes are put back; the training loop sets them anyway)."""
    modes = model_s.training, model_t.training
    data = torch.randn(2, 3, 32, 32)
    model_t.eval()
    model_s.eval()
    feat_t, _ = model_t(data, is_feat=True)
    feat_s, _ = model_s(data, is_feat=True)
    model_s.train(modes[0])
    model_t.train(modes[1])
    if distill == "hint":
        return ConvReg(feat_s[HINT_LAYER].shape, feat_t[HINT_LAYER].shape)
    if distill == "vid":
        s_n = [f.shape[1] for f in feat_s[1:-1]]
        t_n = [f.shape[1] for f in feat_t[1:-1]]
        return nn.ModuleList([VIDLoss(s, t, t) for s, t in zip(s_n, t_n, strict=False)])
    return None


def official_step(
    distill: str,
    beta: float,
    model_s: nn.Module,
    model_t: nn.Module,
    connector: nn.Module | None,
    images: Tensor,
    labels: Tensor,
) -> dict[str, Tensor]:
    """One step of RepDistiller's train_distill (helper/loops.py:68-188) up to
    ``loss.backward()``: the loss parts, before their weights, and the total."""
    model_s.train()  # loops.py:71-74: every module in module_list train(), the teacher eval()
    if connector is not None:
        connector.train()
    model_t.eval()
    feat_s, logit_s = model_s(images, is_feat=True, preact=False)  # loops.py:111-117
    with torch.no_grad():
        feat_t, logit_t = model_t(images, is_feat=True, preact=False)
        feat_t = [f.detach() for f in feat_t]
    loss_cls = F.cross_entropy(logit_s, labels)  # criterion_cls, train_student.py:181
    loss_div = distill_kl(logit_s, logit_t, KD_T)
    if distill == "hint":  # loops.py:126-129
        loss_kd = F.mse_loss(connector(feat_s[HINT_LAYER]), feat_t[HINT_LAYER])
    elif distill == "attention":  # loops.py:134-138
        loss_kd = sum(attention(feat_s[1:-1], feat_t[1:-1]))
    elif distill == "similarity":  # loops.py:144-148
        loss_kd = sum(similarity([feat_s[-2]], [feat_t[-2]]))
    elif distill == "nst":  # loops.py:139-143
        loss_kd = sum(nst(feat_s[1:-1], feat_t[1:-1]))
    elif distill == "kdsvd":  # loops.py:157-161
        loss_kd = sum(kdsvd(feat_s[1:-1], feat_t[1:-1]))
    else:  # vid, loops.py:166-170
        pairs = zip(feat_s[1:-1], feat_t[1:-1], connector, strict=False)
        loss_kd = sum(c(f_s, f_t) for f_s, f_t, c in pairs)
    loss = GAMMA * loss_cls + ALPHA * loss_div + beta * loss_kd  # loops.py:184
    loss.backward()
    return {"ce": loss_cls, "kd": loss_kd.reshape(()), "loss": loss.reshape(())}


# ------------------------------------------------------------------ kdlight's step
def command_line_system(
    overrides: list[str], tmp_path: Path
) -> tuple[DistillationModule, str, str]:
    """kdlight's system for the composed config, built as ``kdlight-train`` builds it (its
    student from ``cfg.model``, ``cfg.module`` instantiated with the method of
    ``cfg.distiller``), with a teacher of random weights and BN statistics (so that its
    eval-mode forward differs from a train-mode one) in place of a trained checkpoint; and
    the student's and the teacher's zoo names."""
    cfg = compose_config(["experiment=zoo_distill", *overrides], tmp_path)
    torch.manual_seed(0)
    student = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    teacher = create_model(cfg.distill.teacher_model, num_classes=cfg.num_classes)
    randomise_(teacher, seed=1)
    module = instantiate(cfg.module, _convert_="partial", model=student, teacher=teacher)
    return module, cfg.model.name, cfg.distill.teacher_model


def kdlight_step(
    module: DistillationModule, images: Tensor, labels: Tensor, teacher_in_train_mode: bool
) -> dict[str, Tensor]:
    """One ``training_step`` of ``module`` (on a Trainer that only carries the step's
    counters), then ``backward`` of its loss: the parts it returns.
    ``teacher_in_train_mode``: a deliberate break, after ``train()`` has frozen it again."""
    module.trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    module.train()
    if teacher_in_train_mode:
        module.teacher.train()
    parts = module.training_step((images, labels), 0)
    parts["loss"].backward()
    return parts


def fixed_batch(classes: int = 100, size: int = 8) -> tuple[Tensor, Tensor]:
    """CIFAR-sized random images and their labels, the same in every test."""
    generator = torch.Generator().manual_seed(2024)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    return images, torch.randint(0, classes, (size,), generator=generator)


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """``actual`` within RTOL of ``expected``, relative to ``expected``'s largest entry: a
    sum's rounding error scales with its terms, so an entry near 0 (a gradient that nearly
    cancels) carries an absolute error of the tensor's scale, not its own."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= RTOL * scale, f"{what}: differs by {error:.3g} (largest entry {scale:.3g})"


def copy_connector(kdlight: nn.Module, official: nn.Module, what: str) -> None:
    """kdlight's connector weights (and BN statistics) into the official connector, after
    checking they are the same layers."""
    ours, theirs = kdlight.state_dict(), official.state_dict()
    shapes = {key: tuple(value.shape) for key, value in ours.items()}
    assert shapes == {key: tuple(value.shape) for key, value in theirs.items()}, (
        f"{what}: kdlight's connector {shapes} is not the official one"
    )
    kinds = [type(m) for m in kdlight.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert kinds == [
        type(m) for m in official.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ], f"{what}: other convolutions"
    official.load_state_dict({key: value.clone() for key, value in ours.items()})


def compare_with_official(
    overrides: list[str], tmp_path: Path, teacher_in_train_mode: bool = False
) -> DistillationModule:
    """Build kdlight's system for ``overrides``, run its step and the official step on
    copies of the same weights, and assert each part, the total and every gradient agree.
    ``teacher_in_train_mode``: a deliberate break (the official teacher is in eval mode)."""
    module, student_name, teacher_name = command_line_system(overrides, tmp_path)
    method = module.distiller
    distill, beta = OFFICIAL[method.name]
    assert not module.teacher.training, "kdlight's teacher must run in eval mode"
    model_s = official_copy_of(student_name, module.student.train())
    model_t = official_copy_of(teacher_name, module.teacher)
    connector = official_connector(distill, model_s, model_t)
    kdlight_connector = {"hint": "regressor", "vid": "regressors"}.get(distill)
    if kdlight_connector is not None:
        ours = getattr(method, kdlight_connector)
        if distill == "vid":  # the official initial variance, before kdlight's is copied
            assert len(ours) == len(connector), "VID: another number of paired stages"
            for index, (mine, theirs) in enumerate(zip(ours, connector, strict=True)):
                assert_close(mine.log_scale, theirs.log_scale, f"log_scale {index} at start")
        copy_connector(ours, connector, f"{method.name}'s connector")

    images, labels = fixed_batch(size=BATCH_SIZE.get(method.name, 8))
    parts = kdlight_step(module, images, labels, teacher_in_train_mode)
    expected = official_step(distill, beta, model_s, model_t, connector, images, labels)

    assert set(parts) == {"loss", "ce", method.name}
    for part, theirs in (("ce", "ce"), (method.name, "kd"), ("loss", "loss")):
        assert_close(parts[part], expected[theirs], f"part {part!r}")
    names = official_names(student_name, module.student)
    official_parameters = dict(model_s.named_parameters())
    assert sorted(names[key] for key, _ in module.student.named_parameters()) == sorted(
        official_parameters
    )
    largest = max(p.grad.abs().max().item() for p in official_parameters.values())
    for key, parameter in module.student.named_parameters():
        theirs = official_parameters[names[key]].grad
        if theirs.abs().max().item() <= NOISE * largest:  # zero but for rounding
            noise = parameter.grad.abs().max().item()
            assert noise <= NOISE * largest, f"student {key}: {noise:.3g}, not rounding noise"
        else:
            assert_close(parameter.grad, theirs, f"student {key}")
    if kdlight_connector is not None:
        theirs = dict(connector.named_parameters())
        for key, parameter in getattr(method, kdlight_connector).named_parameters():
            assert_close(parameter.grad, theirs[key].grad, f"connector {key}")
    return module


PAIRS = ["resnet56_resnet20", "vgg13_vgg8"]  # 3 and 4 stages


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("method", sorted(OFFICIAL))
def test_a_step_equals_the_official_step(pair: str, method: str, tmp_path: Path):
    module = compare_with_official([f"pair={pair}", f"distiller={method}"], tmp_path)
    if method == "vid":
        # the variances are trained, as in RepDistiller (not mdistiller): in the optimizer,
        # with a gradient from the step
        trained = {id(p) for p in module.trainable_parameters()}
        for regressor in module.distiller.regressors:
            assert id(regressor.log_scale) in trained
            assert regressor.log_scale.grad.abs().sum() > 0
    if method == "kdsvd":  # as many channels at every stage: no connector of kdlight's own
        assert list(module.distiller.connectors.parameters()) == []


#: Wrong wirings the step test must catch: (pair, method, overrides, what is wrong, the
#: comparison that catches it).
BREAKS = [
    ("vgg13_vgg8", "fitnet", ["distiller.stage=-2"], "the old FitNet hint: vgg's relu3",
     "fitnet's connector"),
    ("resnet56_resnet20", "at", ["distiller.weight=100"], "a weight not the official (FitNet's)",
     "part 'loss'"),
    ("resnet56_resnet20", "vid", ["distiller.init_pred_var=4"], "another initial variance",
     "log_scale 0 at start"),
    ("vgg13_vgg8", "at", ["distiller.student_taps=[block1,block2,block3,block4]",
                          "distiller.teacher_taps=[block1,block2,block3,block4]"],
     "the stages before their ReLU", "part 'at'"),
    ("resnet56_resnet20", "sp", ["distiller.student_taps=[stages.5]",
                                 "distiller.teacher_taps=[layer2]"],
     "SP one stage short of the deepest", "part 'sp'"),
    ("resnet56_resnet20", "nst", ["distiller.student_taps=[stages.1,stages.4,stages.7]"],
     "NST on each stage's second-last block", "part 'nst'"),
    ("resnet56_resnet20", "kdsvd", ["distiller.singular_vectors=2"],
     "KDSVD with k 2, not the official 1", "part 'kdsvd'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "pair, method, overrides, wrong, caught_by", BREAKS, ids=[b[3] for b in BREAKS]
)
def test_the_step_test_catches_a_wrong_wiring(
    pair: str, method: str, overrides: list[str], wrong: str, caught_by: str, tmp_path: Path
):
    with pytest.raises(AssertionError, match=f"^{caught_by}"):
        compare_with_official([f"pair={pair}", f"distiller={method}", *overrides], tmp_path)


def test_the_step_test_catches_a_teacher_in_train_mode(tmp_path: Path):
    overrides = ["pair=resnet56_resnet20", "distiller=at"]
    with pytest.raises(AssertionError, match="^part 'at'"):
        compare_with_official(overrides, tmp_path, teacher_in_train_mode=True)


# ------------------------------------------------------------------- pairing the stages
#: How many stage maps each official CIFAR network returns, ``len(feat[1:-1])``: RepDistiller
#: models/resnet.py:196-200, vgg.py:94-98, wrn.py:117-122, ShuffleNetv1.py:109-113,
#: ShuffleNetv2.py:155-159, mobilenetv2.py:157-158 (mdistiller's ``feats[1:]``, the same).
OFFICIAL_STAGES = {"resnet": 3, "vgg": 4, "wrn": 3, "shufflev1": 3, "shufflev2": 3}
OFFICIAL_STAGES["mobilenetv2"] = 4
PAIR_CONFIGS = Path(__file__).parents[1] / "conf" / "pair"
SHIPPED_PAIRS = sorted(path.stem for path in PAIR_CONFIGS.glob("*.yaml"))


def official_stage_count(name: str) -> int:
    return next(count for family, count in OFFICIAL_STAGES.items() if name.startswith(family))


def official_zip(student: list[str], teacher: list[str]) -> tuple[list[str], list[str]]:
    """The stages ``zip(feat_s[1:-1], feat_t[1:-1])`` pairs (helper/loops.py:135-136, 167-169)."""
    pairs = list(zip(student, teacher, strict=False))  # to the shorter list
    return [s for s, _ in pairs], [t for _, t in pairs]


def test_on_every_shipped_pair_kdlight_pairs_the_stages_the_official_code_pairs(tmp_path: Path):
    for pair in SHIPPED_PAIRS:
        cfg = compose_config(["experiment=zoo_distill", f"pair={pair}", "distiller=at"], tmp_path)
        student = build_model(OmegaConf.to_container(cfg.model, resolve=True))
        teacher = create_model(cfg.distill.teacher_model, num_classes=cfg.num_classes)
        stages = default_taps(student, "stages"), default_taps(teacher, "stages")
        counts = [
            official_stage_count(name) for name in (cfg.model.name, cfg.distill.teacher_model)
        ]
        assert [len(names) for names in stages] == counts, pair
        assert counts[0] == counts[1], f"{pair}: the networks' depths differ"
        for method in (instantiate(cfg.distiller), VID()):  # VID's config sets no taps either
            assert resolve_taps(method, student, teacher) == official_zip(*stages), pair


def test_where_depths_differ_the_deepest_stages_line_up_and_the_official_zip_pools(
    tmp_path: Path,
):
    """kdlight's CIFAR-10 pair, a 4-stage resnet18_half teacher and the 3-stage small_cnn:
    by default the deepest stages (maps of the same size), with ``pairing=shallowest`` the
    official zip (each teacher map twice the student's height, pooled down as the official
    losses pool it, the teacher's deepest stage unread), where AT's and VID's terms equal the
    official code's on those maps."""
    cfg = compose_config(["experiment=distill"], tmp_path)
    torch.manual_seed(0)
    student = build_model(OmegaConf.to_container(cfg.model, resolve=True)).eval()
    teacher = randomise_(create_model(cfg.distill.teacher_model), seed=1).eval()
    stages_s, stages_t = default_taps(student, "stages"), default_taps(teacher, "stages")
    assert (len(stages_s), len(stages_t)) == (3, 4)
    images, _ = fixed_batch(classes=10)
    maps = {}
    for model, names, role in ((student, stages_s, "student"), (teacher, stages_t, "teacher")):
        taps = FeatureTaps(model, names)
        with torch.no_grad(), taps.capture() as features:
            model(images)
        maps[role] = features
        taps.remove()
    assert [maps["student"][name].shape[2] for name in stages_s] == [16, 8, 4]
    assert [maps["teacher"][name].shape[2] for name in stages_t] == [32, 16, 8, 4]

    for pairing in ("deepest", "shallowest"):
        for method in ("at", "vid"):
            choice = f"distiller.pairing={pairing}"
            cfg = compose_config(["experiment=distill", f"distiller={method}", choice], tmp_path)
            validate_settings(cfg)
            module = instantiate(cfg.module, _convert_="partial", model=student, teacher=teacher)
            assert module.distiller.settings()["pairing"] == pairing
            chosen = module.slot.student_taps.names, module.slot.teacher_names
            official = official_zip(stages_s, stages_t)
            assert chosen == (official if pairing == "shallowest" else (stages_s, stages_t[1:]))
            g_s = [maps["student"][name] for name in chosen[0]]
            g_t = [maps["teacher"][name] for name in chosen[1]]
            sizes = [f.shape[2] for f in g_t]
            assert sizes == ([16, 8, 4] if pairing == "deepest" else [32, 16, 8])

            term = module.distiller.feature_loss(g_s, g_t)
            if method == "at":
                expected = sum(attention(g_s, g_t))
            else:  # the official VIDLoss of each zipped pair, with kdlight's weights
                expected = 0
                for ours, f_s, f_t in zip(module.distiller.regressors, g_s, g_t, strict=True):
                    theirs = VIDLoss(f_s.shape[1], f_t.shape[1], f_t.shape[1])
                    copy_connector(ours, theirs, "VID's regressor")
                    expected = expected + theirs(f_s, f_t)
            assert_close(term, expected, f"{method} with pairing={pairing}")


def test_a_pairing_that_is_not_one_is_one_line(tmp_path: Path):
    cfg = compose_config(
        ["experiment=distill", "distiller=vid", "distiller.pairing=middle"], tmp_path
    )
    message = "distiller.pairing=middle is not allowed: one of deepest, shallowest"
    with pytest.raises(KDLightError, match=f"^{message}$"):
        validate_settings(cfg)
    with pytest.raises(KDLightError, match=f"^{message}$"):
        AT(pairing="middle")
