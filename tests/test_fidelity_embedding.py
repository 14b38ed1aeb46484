"""The embedding methods (PKT, RKD, CC, CRD) equal the official CIFAR code, step for step,
and CRD's negatives are drawn as the official code draws them.

Each step test composes the command line's config (``experiment=zoo_distill pair=...
distiller=...``), builds kdlight's ``DistillationModule`` from it as ``kdlight-train`` does,
and computes one training step's loss parts and the student's gradients on a fixed batch.
The same step is then computed the official way, written here from RepDistiller
(``helper/loops.py``, ``distiller_zoo/{PKT,RKD,CC}.py``, ``crd/{criterion,memory}.py``,
``scripts/run_cifar_distill.sh``; mdistiller's ``distillers/{PKT,RKD,CRD}.py`` agree), on
the official architectures (:mod:`tests.official.models`) holding the same weights. Nothing
of kdlight's losses is used on the official side.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from kdlight.config.settings import validate_settings
from kdlight.distillers import CC
from kdlight.errors import KDLightError
from kdlight.losses import NegativeSampler, sample_contrast_indices
from kdlight.models import create_model
from kdlight.models.published import official_names
from kdlight.models.registry import build_model
from tests.conftest import compose_config
from tests.official.models import official_copy_of

#: Student and teacher of the shipped pairs: a 3-stage and a 4-stage one.
PAIRS = ["resnet56_resnet20", "vgg13_vgg8"]
BATCH = 8
#: CIFAR-100's training set: the official CRD's ``n_data`` (and its memory banks' rows).
NUM_DATA = 50000
#: rel 1e-4 of each tensor's largest entry (see assert_close_to).
RELATIVE = 1e-4

# The official loss weights (RepDistiller scripts/run_cifar_distill.sh:
# "-a 0 -b 30000" for PKT, "-a 0 -b 1" for RKD, "-a 0 -b 0.8" for CRD, "-a 0 -b 0.02" for
# CC (line 13), and the default "-r 1" of train_student.py:73 for the cross-entropy;
# mdistiller engine/cfg.py:78-79, 116-117, 142-143 agree, and has no CC).
OFFICIAL_BETA = {"pkt": 30000.0, "rkd": 1.0, "crd": 0.8, "cc": 0.02}
OFFICIAL_GAMMA = 1.0  # -r: the cross-entropy's weight
OFFICIAL_ALPHA = 0.0  # -a: the KD term's weight (no KD term in these methods)
OFFICIAL_KD_T = 4  # train_student.py's --kd_T default, for the (zero-weighted) KD term


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close_to(value: Tensor, official: Tensor, what: str, relative: float = RELATIVE):
    """``value`` equals ``official`` within ``relative`` of ``official``'s largest entry (a
    gradient's entries near 0 are judged on the tensor's scale, not their own)."""
    # the official ContrastLoss returns a (1,) tensor where kdlight returns a scalar
    assert value.numel() == official.numel(), what
    official = official.reshape(value.shape)
    scale = official.detach().abs().max().clamp(min=1e-30)
    error = ((value.detach() - official.detach()).abs().max() / scale).item()
    assert error <= relative, f"{what}: relative difference {error:.2e} > {relative:.0e}"


# ------------------------------------------------------------------ kdlight's side
def kdlight_system(pair: str, method: str, tmp_path, overrides: tuple[str, ...] = ()):
    """The composed config, and the ``DistillationModule`` ``kdlight-train`` builds from it
    (``kdlight.train.build_module``), given the teacher it would restore."""
    cfg = compose_config(
        ["experiment=zoo_distill", f"pair={pair}", f"distiller={method}", *overrides], tmp_path
    )
    torch.manual_seed(0)
    student = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    teacher = as_if_trained(create_model(cfg.distill.teacher_model, num_classes=cfg.num_classes))
    module = instantiate(
        cfg.module,
        _convert_="partial",
        model=student,
        teacher=teacher,
        optimizer=None,
        scheduler=None,
    )
    return cfg, module.train()  # the teacher stays in eval mode (DistillationSystem.train)


def images_of(generator: torch.Generator, count: int = BATCH) -> Tensor:
    """CIFAR-sized images, each with a colour cast of its own: the pooled features of plain
    pixel noise hardly differ between images (the pooling averages the noise away), which
    would leave the relational losses at float32 rounding."""
    cast = torch.randn(count, 3, 1, 1, generator=generator) * 1.5
    return cast + torch.randn(count, 3, 32, 32, generator=generator)


@torch.no_grad()
def as_if_trained(teacher: nn.Module) -> nn.Module:
    """The teacher with BatchNorm statistics of images (those of a batch), as a trained
    teacher has: with the initial ones (mean 0, variance 1) a deep teacher's eval-mode
    activations grow with depth (resnet56's logits reach about 900) and its pooled
    features are nearly parallel."""
    norms = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the running statistics are the batch's
    teacher.train()(images_of(torch.Generator().manual_seed(7)))
    for norm in norms:
        norm.momentum = 0.1
    return teacher.eval()


def fixed_batch(num_data: int = NUM_DATA) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seeded CIFAR-sized images, their indices in a CIFAR-100-sized training set, their
    labels (the set's), and the set's labels."""
    generator = torch.Generator().manual_seed(19)
    train_labels = torch.randperm(num_data, generator=generator) % 100
    images = images_of(generator)
    index = torch.randperm(num_data, generator=generator)[:BATCH]
    return images, train_labels[index], index, train_labels


def kdlight_step(module, images: Tensor, labels: Tensor, index: Tensor) -> dict[str, Tensor]:
    """One training step's parts, the gradients left in the student and the method: what
    ``DistillationModule.training_step`` computes, without a Trainer to log to."""
    teacher = module.frozen.outputs(images, [index])
    _, parts = module.slot.step(module.fast_model, images, labels, teacher, 0, index)
    parts["loss"].backward()
    return parts


def official_gradients(official: nn.Module, name: str, kdlight_model: nn.Module) -> dict:
    """The official copy's gradients under kdlight's parameter names."""
    by_official = dict(official.named_parameters())
    names = official_names(name, kdlight_model)
    return {key: by_official[names[key]].grad for key, _ in kdlight_model.named_parameters()}


def assert_student_gradients_equal(module, official_student: nn.Module, name: str) -> None:
    """Every student parameter's gradient equals the official one (rel 1e-4), or both are
    float32 noise where the exact gradient is 0."""
    official = official_gradients(official_student, name, module.model)
    largest = max(gradient.abs().max() for gradient in official.values())
    for key, parameter in module.model.named_parameters():
        assert parameter.grad is not None and official[key] is not None, key
        if official[key].abs().max() <= 1e-6 * largest:
            # 0 in exact arithmetic: a convolution's bias before a train-mode BatchNorm,
            # whose mean subtraction removes it (vgg). Each side leaves float32 noise of
            # about 1e-7 of the largest gradient there, which no relative test can compare.
            assert parameter.grad.abs().max() <= 1e-6 * largest, key
        else:
            assert_close_to(parameter.grad, official[key], f"student gradient {key}")


def official_networks(cfg, module):
    """Official copies of the student (train mode) and the teacher (eval mode, as
    RepDistiller helper/loops.py:74 and mdistiller distillers/_base.py:17 put it)."""
    assert module.model.training and not module.teacher.training
    student = official_copy_of(cfg.model.name, module.model).train()
    teacher = official_copy_of(cfg.distill.teacher_model, module.teacher).eval()
    return student, teacher


def official_forward(student: nn.Module, teacher: nn.Module, images: Tensor):
    """RepDistiller helper/loops.py:114-117: both networks' feature lists, the teacher's
    without gradient."""
    feat_s, logit_s = student(images, is_feat=True, preact=False)
    with torch.no_grad():
        feat_t, logit_t = teacher(images, is_feat=True, preact=False)
        feat_t = [f.detach() for f in feat_t]
    return feat_s, logit_s, feat_t, logit_t


def official_total(logit_s: Tensor, logit_t: Tensor, labels: Tensor, beta: float, loss_kd):
    """RepDistiller helper/loops.py:120-121, 184: ``gamma * CE + alpha * KD + beta *
    loss_kd`` with the distiller_zoo/KD.py DistillKL at T 4. Returns the total, the CE and
    the KD term (weighted 0 here: returned to show that a KD term would be seen)."""
    loss_cls = F.cross_entropy(logit_s, labels)
    p_s = F.log_softmax(logit_s / OFFICIAL_KD_T, dim=1)
    p_t = F.softmax(logit_t / OFFICIAL_KD_T, dim=1)
    loss_div = F.kl_div(p_s, p_t, reduction="sum") * OFFICIAL_KD_T**2 / logit_s.shape[0]
    loss = OFFICIAL_GAMMA * loss_cls + OFFICIAL_ALPHA * loss_div + beta * loss_kd
    return loss, loss_cls, loss_div


# ------------------------------------------------------------ the official losses
def official_pkt(output_net: Tensor, target_net: Tensor, eps: float = 0.0000001) -> Tensor:
    """RepDistiller distiller_zoo/PKT.py:17-42 (``PKT.cosine_similarity_loss``)."""
    output_net_norm = torch.sqrt(torch.sum(output_net**2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0
    target_net_norm = torch.sqrt(torch.sum(target_net**2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(
        target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps))
    )


def official_pdist(e: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """RepDistiller distiller_zoo/RKD.py:47-57 (``RKDLoss.pdist``)."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def official_rkd(f_s: Tensor, f_t: Tensor, w_d: float = 25, w_a: float = 50):
    """RepDistiller distiller_zoo/RKD.py:8-45 (``RKDLoss(w_d=25, w_a=50)``), returning its
    total and its two terms (``loss_d``, ``loss_a``, before their weights)."""
    student = f_s.view(f_s.shape[0], -1)
    teacher = f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = official_pdist(teacher, squared=False)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = official_pdist(student, squared=False)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a, loss_d, loss_a


class OfficialEmbed(nn.Module):
    """RepDistiller crd/criterion.py:79-104 (``Embed`` with ``Normalize(2)``)."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
        return x.div(norm)


class OfficialContrastMemory(nn.Module):
    """RepDistiller crd/memory.py:6-79 (``ContrastMemory``), given the contrast indices as
    the "exact" mode's data loader gives them (``idx``; the alias sampler of lines 11-13
    and 34-36 is only used without them)."""

    def __init__(self, input_size: int, output_size: int, K: int, T: float, momentum: float):
        super().__init__()
        self.K = K
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1.0 / math.sqrt(input_size / 3)
        self.register_buffer(
            "memory_v1", torch.rand(output_size, input_size).mul_(2 * stdv).add_(-stdv)
        )
        self.register_buffer(
            "memory_v2", torch.rand(output_size, input_size).mul_(2 * stdv).add_(-stdv)
        )

    def forward(self, v1: Tensor, v2: Tensor, y: Tensor, idx: Tensor):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_v1 = self.params[2].item()
        Z_v2 = self.params[3].item()
        momentum = self.params[4].item()
        batch_size = v1.size(0)
        output_size = self.memory_v1.size(0)
        input_size = self.memory_v1.size(1)
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        weight_v1 = weight_v1.view(batch_size, K + 1, input_size)
        out_v2 = torch.bmm(weight_v1, v2.view(batch_size, input_size, 1))
        out_v2 = torch.exp(torch.div(out_v2, T))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        weight_v2 = weight_v2.view(batch_size, K + 1, input_size)
        out_v1 = torch.bmm(weight_v2, v1.view(batch_size, input_size, 1))
        out_v1 = torch.exp(torch.div(out_v1, T))
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * output_size
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * output_size
            Z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()
        with torch.no_grad():
            l_pos = torch.index_select(self.memory_v1, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(v1, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            self.memory_v1.index_copy_(0, y, l_pos.div(l_norm))
            ab_pos = torch.index_select(self.memory_v2, 0, y.view(-1))
            ab_pos.mul_(momentum)
            ab_pos.add_(torch.mul(v2, 1 - momentum))
            ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            self.memory_v2.index_copy_(0, y, ab_pos.div(ab_norm))
        return out_v1, out_v2


def official_contrast_loss(x: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """RepDistiller crd/criterion.py:51-76 (``ContrastLoss``)."""
    bsz = x.shape[0]
    m = x.size(1) - 1
    Pn = 1 / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


# ------------------------------------------------------------------------ PKT, RKD
@pytest.mark.parametrize("pair", PAIRS)
def test_pkt_step_equals_the_official_code(pair: str, tmp_path):
    cfg, module = kdlight_system(pair, "pkt", tmp_path)
    official_student, official_teacher = official_networks(cfg, module)
    images, labels, index, _ = fixed_batch()
    parts = kdlight_step(module, images, labels, index)

    feat_s, logit_s, feat_t, logit_t = official_forward(official_student, official_teacher, images)
    loss_kd = official_pkt(feat_s[-1], feat_t[-1])  # helper/loops.py:153-156: the pooled ones
    loss, loss_cls, _ = official_total(logit_s, logit_t, labels, OFFICIAL_BETA["pkt"], loss_kd)
    loss.backward()

    assert set(parts) == {"loss", "ce", "pkt"}
    assert_close_to(parts["ce"], loss_cls, "ce")
    # The KL divergence of two near-equal row distributions is a sum of terms p log(p/q)
    # of the first order in p - q whose first orders cancel: float32 rounding of each
    # p ~ 1/B (6e-9) is a few 1e-4 of the second-order sum. On resnet56_resnet20 the
    # official float32 value is 1.8e-4 from the same formula in float64 on the same
    # features, kdlight's 0.5e-4, and the two 2.3e-4 apart. The total (weight 30000 on it)
    # and the gradients are held to 1e-4.
    assert_close_to(parts["pkt"], loss_kd, "pkt", relative=1e-3)
    assert_close_to(parts["loss"], loss, "total")
    assert_student_gradients_equal(module, official_student, cfg.model.name)


@pytest.mark.parametrize("pair", PAIRS)
def test_rkd_step_equals_the_official_code(pair: str, tmp_path):
    cfg, module = kdlight_system(pair, "rkd", tmp_path)
    official_student, official_teacher = official_networks(cfg, module)
    images, labels, index, _ = fixed_batch()
    parts = kdlight_step(module, images, labels, index)

    feat_s, logit_s, feat_t, logit_t = official_forward(official_student, official_teacher, images)
    loss_kd, loss_d, loss_a = official_rkd(feat_s[-1], feat_t[-1])  # helper/loops.py:149-152
    loss, loss_cls, _ = official_total(logit_s, logit_t, labels, OFFICIAL_BETA["rkd"], loss_kd)
    loss.backward()

    assert set(parts) == {"loss", "ce", "distance", "angle"}
    assert_close_to(parts["ce"], loss_cls, "ce")
    assert_close_to(parts["distance"], loss_d, "distance")
    assert_close_to(parts["angle"], loss_a, "angle")
    assert_close_to(parts["loss"], loss, "total")
    assert_student_gradients_equal(module, official_student, cfg.model.name)


# ------------------------------------------------------------------------------ CRD
@pytest.mark.parametrize("pair", PAIRS)
def test_crd_step_equals_the_official_code(pair: str, tmp_path):
    cfg, module = kdlight_system(pair, "crd", tmp_path)
    crd = module.distiller
    images, labels, index, train_labels = fixed_batch()
    crd.attach_data(train_labels)  # what DistillationModule.setup("fit") gives it
    official_student, official_teacher = official_networks(cfg, module)

    # The official modules, with kdlight's initial embedding weights and banks copied in.
    s_dim, t_dim = crd.embed_student.linear.in_features, crd.embed_teacher.linear.in_features
    embed_s, embed_t = OfficialEmbed(s_dim, 128), OfficialEmbed(t_dim, 128)
    embed_s.load_state_dict(crd.embed_student.state_dict())
    embed_t.load_state_dict(crd.embed_teacher.state_dict())
    # train_student.py:82-85 defaults: --feat_dim 128 --nce_k 16384 --nce_t 0.07 --nce_m 0.5
    contrast = OfficialContrastMemory(128, NUM_DATA, 16384, 0.07, 0.5)
    stdv = 1.0 / math.sqrt(128 / 3)  # crd/memory.py:19: the banks start uniform in +-stdv
    for bank in (crd.memory.memory_student, crd.memory.memory_teacher):
        assert bank.abs().max() <= stdv and bank.abs().max() > 0.99 * stdv
        assert bank.mean().abs() < 0.01 * stdv
    contrast.memory_v1.copy_(crd.memory.memory_student)  # v1: the student's bank
    contrast.memory_v2.copy_(crd.memory.memory_teacher)

    # The contrast indices kdlight drew for this step, fed to the official memory as the
    # "exact" data loader's contrast_idx.
    seen = {}
    hook = crd.memory.register_forward_pre_hook(lambda _, args: seen.update(indices=args[3]))
    parts = kdlight_step(module, images, labels, index)
    hook.remove()
    contrast_idx = seen["indices"]
    assert contrast_idx.shape == (BATCH, 16384 + 1)
    assert torch.equal(contrast_idx[:, 0], index)  # "exact" mode: the positive is the image
    for row, label in zip(contrast_idx, labels, strict=True):
        assert row[1:].unique().numel() == 16384  # without replacement, as official
        assert (train_labels[row[1:]] != label).all()

    feat_s, logit_s, feat_t, logit_t = official_forward(official_student, official_teacher, images)
    # crd/criterion.py:31-48 (CRDLoss.forward) on helper/loops.py:130-133's pooled features
    f_s, f_t = embed_s(feat_s[-1]), embed_t(feat_t[-1])
    out_s, out_t = contrast(f_s, f_t, index, contrast_idx)
    # The official sum of 8 x 16385 logarithms of quotients near 1, evaluated in float64
    # on the official float32 scores: in float32 its rounding alone is about 1e-4 of it
    # (7e-5 from float64 on random scores; 1.3e-4 from kdlight's float32 value here before
    # kdlight took log1p), the tolerance itself.
    loss_kd = official_contrast_loss(out_s.double(), NUM_DATA) + official_contrast_loss(
        out_t.double(), NUM_DATA
    )
    loss, loss_cls, loss_div = official_total(
        logit_s, logit_t, labels, OFFICIAL_BETA["crd"], loss_kd
    )
    loss.backward()

    # The composition from the composed config: CE + 0.8 x CRD, no KD term.
    assert set(parts) == {"loss", "ce", "crd"}
    assert cfg.distiller.weight == 0.8 and cfg.distiller.ce_weight == 1.0
    assert_close_to(parts["loss"], parts["ce"] + 0.8 * parts["crd"], "CE + 0.8 x CRD")
    # ...which a KD term (the zoo's T 4, alpha 0.9) would move by over 3 times the tolerance
    assert 0.9 * loss_div > 3 * RELATIVE * loss.abs()

    # exp(x / 0.07) turns the float32 rounding of a dot product (about 1e-7 of 1) into
    # about 1e-7 / 0.07 = 1.4e-6 of a score: still far inside 1e-4.
    assert_close_to(parts["ce"], loss_cls, "ce")
    assert_close_to(parts["crd"], loss_kd, "crd")
    assert_close_to(parts["loss"], loss, "total")
    assert_student_gradients_equal(module, official_student, cfg.model.name)
    for ours, theirs, side in (
        (crd.embed_student, embed_s, "student"),
        (crd.embed_teacher, embed_t, "teacher"),
    ):
        for key, parameter in ours.named_parameters():
            official = dict(theirs.named_parameters())[key].grad
            assert_close_to(parameter.grad, official, f"{side} embedding gradient {key}")
    # the normalising constants, fixed on this first batch, and the banks after the update
    assert_close_to(crd.memory.normalizer_student, contrast.params[2], "Z of the student")
    assert_close_to(crd.memory.normalizer_teacher, contrast.params[3], "Z of the teacher")
    assert_close_to(crd.memory.memory_student, contrast.memory_v1, "student bank")
    assert_close_to(crd.memory.memory_teacher, contrast.memory_v2, "teacher bank")


# ------------------------------------------------------------------------------- CC
class OfficialLinearEmbed(nn.Module):
    """RepDistiller models/util.py:185-194 (``LinearEmbed``: no normalisation)."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        return x


def official_correlation(f_s: Tensor, f_t: Tensor) -> Tensor:
    """RepDistiller distiller_zoo/CC.py:14-17 (``Correlation.forward``)."""
    delta = torch.abs(f_s - f_t)
    loss = torch.mean((delta[:-1] * delta[1:]).sum(1))
    return loss


def copy_linear(kdlight: nn.Module, official: OfficialLinearEmbed, what: str) -> None:
    """kdlight's connector into the official one, after checking it is the same layer."""
    shapes = {key: tuple(value.shape) for key, value in kdlight.state_dict().items()}
    theirs = {key: tuple(value.shape) for key, value in official.linear.state_dict().items()}
    assert type(kdlight) is nn.Linear and shapes == theirs, (
        f"{what}: kdlight's {type(kdlight).__name__} {shapes} is not the official {theirs}"
    )
    official.linear.load_state_dict(kdlight.state_dict())


def compare_cc_with_official(pair: str, tmp_path, overrides: tuple[str, ...] = ()) -> None:
    """One CC step of kdlight and of the official wiring, on copies of the same weights (the
    connectors kdlight's): each part, the total, every student gradient and both connectors'
    gradients agree."""
    cfg, module = kdlight_system(pair, "cc", tmp_path, overrides)
    cc = module.distiller
    official_student, official_teacher = official_networks(cfg, module)
    images, labels, index, _ = fixed_batch()

    feat_s, logit_s, feat_t, logit_t = official_forward(official_student, official_teacher, images)
    # train_student.py:211-218: a LinearEmbed of each network's feat[-1] to --feat_dim 128
    # (train_student.py:81), both in trainable_list
    embed_s = OfficialLinearEmbed(feat_s[-1].shape[1], 128)
    embed_t = OfficialLinearEmbed(feat_t[-1].shape[1], 128)
    copy_linear(cc.embed_student, embed_s, "student connector")
    copy_linear(cc.embed_teacher, embed_t, "teacher connector")
    # helper/loops.py:162-165: module_list[1] and [2], the two embeddings
    loss_kd = official_correlation(embed_s(feat_s[-1]), embed_t(feat_t[-1]))
    loss, loss_cls, _ = official_total(logit_s, logit_t, labels, OFFICIAL_BETA["cc"], loss_kd)
    loss.backward()
    parts = kdlight_step(module, images, labels, index)

    assert set(parts) == {"loss", "ce", "cc"}
    assert_close_to(parts["ce"], loss_cls, "ce")
    assert_close_to(parts["cc"], loss_kd, "cc")
    assert_close_to(parts["loss"], loss, "total")
    assert_student_gradients_equal(module, official_student, cfg.model.name)
    for ours, theirs, side in ((cc.embed_student, embed_s, "student"),
                               (cc.embed_teacher, embed_t, "teacher")):  # fmt: skip
        for key, parameter in ours.named_parameters():
            official = theirs.linear.get_parameter(key).grad
            assert parameter.grad is not None, f"{side} connector gradient {key}: none"
            assert_close_to(parameter.grad, official, f"{side} connector gradient {key}")


@pytest.mark.parametrize("pair", PAIRS)
def test_cc_step_equals_the_official_code(pair: str, tmp_path):
    compare_cc_with_official(pair, tmp_path)


#: Wrong wirings the CC step test must catch: (pair, overrides, the comparison that fails).
CC_BREAKS = [
    ("resnet56_resnet20", ("distiller.weight=0.2",), "total"),  # not the official 0.02
    ("vgg13_vgg8", ("distiller.teacher_taps=[classifier]",), "teacher connector"),  # logits
]


@pytest.mark.parametrize("pair, overrides, caught_by", CC_BREAKS, ids=["weight", "tap"])
def test_the_cc_step_test_catches_a_wrong_wiring(pair, overrides, caught_by, tmp_path):
    with pytest.raises(AssertionError, match=f"^{caught_by}"):
        compare_cc_with_official(pair, tmp_path, overrides)


def test_a_cc_embedding_size_below_1_is_one_line_at_construction():
    """nn.Linear would take 0 outputs, and CC would be 0 without a word."""
    with pytest.raises(KDLightError, match=r"^distiller.dim=0 is not allowed: an integer >= 1"):
        CC(dim=0)


# ---------------------------------------------------------------- CRD's negatives
def unequal_classes(sizes: list[int], seed: int = 0) -> Tensor:
    """Labels of a training set with classes of the given sizes, in a shuffled order."""
    labels = torch.cat([torch.full((size,), c) for c, size in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_negatives_are_distinct_images_of_other_classes_after_the_anchor():
    """RepDistiller dataset/cifar100.py:166-168: ``np.random.choice(cls_negative[target],
    k, replace=False)`` where the anchor's class has at least k negatives."""
    labels = unequal_classes([300, 200, 500, 100, 900])  # 2000 images
    index = torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:64]
    contrast = sample_contrast_indices(
        index, labels, 1000, generator=torch.Generator().manual_seed(2)
    )
    assert contrast.shape == (64, 1001) and contrast.dtype == torch.long
    assert torch.equal(contrast[:, 0], index)
    for anchor, row in zip(index, contrast, strict=True):
        assert row[1:].unique().numel() == 1000  # no image twice in a row
        assert (labels[row[1:]] != labels[anchor]).all()


def test_each_image_of_the_other_classes_is_drawn_equally_often():
    """Without replacement, each of an anchor's ``m`` negatives is in its row with
    probability ``K / m``: over ``R`` rows a count is binomial(R, K / m), of variance
    ``R p (1 - p)``. With replacement the counts would vary ``1 / (1 - p)`` = 3 times as
    much here, which the chi-square bound tells apart."""
    labels = unequal_classes([50, 100, 150])
    rows, k = 2000, 100
    for anchor_class in range(3):
        anchors = labels.eq(anchor_class).nonzero().flatten()
        index = anchors.repeat(rows // len(anchors) + 1)[:rows]
        contrast = NegativeSampler(labels, k)(
            index, generator=torch.Generator().manual_seed(3 + anchor_class)
        )
        counts = torch.bincount(contrast[:, 1:].flatten(), minlength=300).double()
        others = labels.ne(anchor_class)
        assert (counts[~others] == 0).all()
        p = k / int(others.sum())
        expected, variance = rows * p, rows * p * (1 - p)
        chi_square = ((counts[others] - expected) ** 2 / variance).sum().item()
        degrees = int(others.sum()) - 1  # the counts sum to rows * k exactly
        # chi-square of `degrees` degrees of freedom: mean degrees, std sqrt(2 degrees)
        assert abs(chi_square - degrees) < 5 * math.sqrt(2 * degrees), chi_square


def test_an_anchor_whose_class_has_fewer_than_k_negatives_draws_with_replacement():
    """The official ``replace = k > len(cls_negative[target])``: an anchor of the 90-image
    class has 10 negatives for K = 20 (with replacement, each of them drawn), one of the
    10-image class has 90 (without)."""
    labels = unequal_classes([90, 10])
    big, small = labels.eq(0).nonzero().flatten(), labels.eq(1).nonzero().flatten()
    index = torch.stack([big[0], small[0], big[1], small[1]])
    contrast = sample_contrast_indices(
        index, labels, 20, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(contrast[:, 0], index)
    for anchor, row in zip(index, contrast, strict=True):
        assert (labels[row[1:]] != labels[anchor]).all()
    for row in contrast[[0, 2]]:  # 20 draws of the 10 images of class 1
        assert set(row[1:].tolist()) <= set(small.tolist()) and row[1:].unique().numel() < 20
    for row in contrast[[1, 3]]:
        assert row[1:].unique().numel() == 20
    # more negatives than images: every row with replacement
    everyone = sample_contrast_indices(index, labels, 150, generator=torch.Generator())
    assert everyone.shape == (4, 151)
    assert all((labels[row[1:]] != labels[a]).all() for a, row in zip(index, everyone, strict=True))


def test_replacement_true_is_the_former_draw():
    """``distiller.replacement=true``: every row with replacement (repeats at K close to the
    number of negatives), reproducible with the same generator."""
    labels = unequal_classes([300, 200, 500, 100, 900])
    index = torch.arange(16)
    first, again = (
        NegativeSampler(labels, 1000, replacement=True)(
            index, generator=torch.Generator().manual_seed(5)
        )
        for _ in range(2)
    )
    assert torch.equal(first, again)
    assert all(row[1:].unique().numel() < 1000 for row in first)


def test_the_setting_is_a_bool_and_false_by_default(tmp_path):
    """``distiller.replacement`` composes as the official draw and is checked before any
    work: a value that is not a bool is one line."""
    cfg = compose_config(["experiment=zoo_distill", "pair=vgg13_vgg8", "distiller=crd"], tmp_path)
    assert cfg.distiller.replacement is False
    assert instantiate(cfg.distiller).settings()["replacement"] is False
    wrong = compose_config(
        ["experiment=zoo_distill", "distiller=crd", "distiller.replacement=maybe"], tmp_path
    )
    with pytest.raises(KDLightError, match=r"^distiller.replacement=maybe is not allowed: true"):
        validate_settings(wrong)
