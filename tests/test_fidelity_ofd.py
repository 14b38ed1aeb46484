"""OFD as a command-line user gets it equals mdistiller's OFD, step for step, and the zoo's
pre-activation taps are the official ``preact`` feats.

The step test composes the real config (``experiment=zoo_distill pair=<pair>
distiller=ofd``), builds kdlight's ``DistillationModule`` from it as ``kdlight-train`` does,
and runs one training step on a fixed batch. The same step is then computed the official
way, written here from mdistiller (``mdistiller/distillers/OFD.py``, ``engine/cfg.py``, the
models' ``get_bn_before_relu``), on the official networks (``tests/official/models.py``, whose
``preact=True`` feats are mdistiller's ``preact_feats``) holding the same weights, with the
official connectors given kdlight's initial connector weights. Each loss part, the total,
and the gradient of every student and connector parameter must agree.

The one departure, kdlight's by design: mdistiller's ``OFD.train`` (OFD.py:114-121) puts the
teacher in train mode with the student; kdlight's teacher is frozen in eval mode for every
method, so the official step here runs the teacher in eval mode.
"""

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from kdlight.errors import KDLightError
from kdlight.lit import DistillationModule
from kdlight.models import build_model, create_model
from kdlight.models.published import official_names
from kdlight.models.taps import FeatureTaps, default_taps
from tests.conftest import compose_config
from tests.official.models import official_copy_of, randomise_
from tests.test_fidelity_stages import assert_close, fixed_batch, kdlight_step

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------- the official wiring
#: mdistiller mdistiller/engine/cfg.py:102-105 (configs/cifar100/ofd.yaml sets none).
CE_WEIGHT, FEAT_WEIGHT, KERNEL_SIZE = 1.0, 0.001, 1


def feat_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """mdistiller distillers/OFD.py:11-19."""
    margin = margin.to(source)
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return torch.abs(loss).mean(dim=0).sum()


def connector(s_channel: int, t_channel: int, kernel_size: int) -> nn.Sequential:
    """mdistiller OFD.py:41-60, ``_build_feature_connector``."""
    conv = nn.Conv2d(
        s_channel, t_channel, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False
    )
    n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    conv.weight.data.normal_(0, math.sqrt(2.0 / n))
    bn = nn.BatchNorm2d(t_channel)
    bn.weight.data.fill_(1)
    bn.bias.data.zero_()
    return nn.Sequential(conv, bn)


def norm_cdf(x: float) -> float:
    """scipy.stats.norm.cdf, which OFD.py:98 calls."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def margins(bn_before_relu: list[nn.BatchNorm2d]) -> list[Tensor]:
    """mdistiller OFD.py:90-109, one ``(1, C, 1, 1)`` margin per BN."""
    result = []
    for bn in bn_before_relu:
        margin = []
        for s, m in zip(bn.weight.data, bn.bias.data, strict=True):
            s, m = abs(s.item()), m.item()
            if norm_cdf(-m / s) > 0.001:
                margin.append(
                    -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm_cdf(-m / s)
                    + m
                )
            else:
                margin.append(-3 * s)
        result.append(torch.FloatTensor(margin).unsqueeze(1).unsqueeze(2).unsqueeze(0))
    return result


def get_bn_before_relu(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The official networks' ``get_bn_before_relu``: mdistiller models/cifar/resnet.py:167-179
    (BasicBlock: each stage's last ``bn2``) and vgg.py:61-66 (each block's last module)."""
    if hasattr(model, "layer1"):
        return [model.layer1[-1].bn2, model.layer2[-1].bn2, model.layer3[-1].bn2]
    return [model.block1[-1], model.block2[-1], model.block3[-1], model.block4[-1]]


def get_stage_channels(feats: list[Tensor]) -> list[int]:
    """The channels of each preact feat (mdistiller's ``get_stage_channels()[1:]``)."""
    return [f.shape[1] for f in feats]


def align(*lists: list) -> list[list]:
    """mdistiller OFD.py:163-165, ``_align_list``: the last ``min_len`` of each."""
    min_len = min(len(items) for items in lists)
    return [items[-min_len:] for items in lists]


def official_connectors(model_s: nn.Module, model_t: nn.Module) -> nn.ModuleList:
    """OFD.py:75-88: one connector per aligned stage, from the stage channels."""
    probe = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats_s, _ = model_s.eval()(probe, is_feat=True, preact=True)
        feats_t, _ = model_t.eval()(probe, is_feat=True, preact=True)
    t_channels, s_channels = align(
        get_stage_channels(feats_t[1:-1]), get_stage_channels(feats_s[1:-1])
    )
    pairs = zip(s_channels, t_channels, strict=True)
    return nn.ModuleList(connector(s, t, KERNEL_SIZE) for s, t in pairs)


def official_step(
    model_s: nn.Module,
    model_t: nn.Module,
    connectors: nn.ModuleList,
    teacher_margins: list[Tensor],
    images: Tensor,
    labels: Tensor,
) -> dict[str, Tensor]:
    """One step of mdistiller's OFD.forward_train (OFD.py:129-161) and the trainer's sum
    of its losses, up to ``backward``: the parts before their weights, and the total. The
    teacher in eval mode (kdlight's; OFD.train, OFD.py:114-121, would train it)."""
    model_s.train()
    connectors.train()
    model_t.eval()
    feats_s, logits_student = model_s(images, is_feat=True, preact=True)
    with torch.no_grad():
        feats_t, _ = model_t(images, is_feat=True, preact=True)
    # preact_feats[1:]: the stem's output is entry 0, the pooled feature the last of feats
    feature_student, feature_teacher = align(feats_s[1:-1], feats_t[1:-1])
    feature_student = [connectors[idx](feat) for idx, feat in enumerate(feature_student)]
    loss_distill = 0
    feat_num = len(feature_student)
    for i in range(feat_num):
        loss_distill = loss_distill + feat_loss(
            feature_student[i],
            F.adaptive_avg_pool2d(feature_teacher[i], feature_student[i].shape[-2:]).detach(),
            teacher_margins[i],
        ) / 2 ** (feat_num - i - 1)
    loss_ce = F.cross_entropy(logits_student, labels)
    loss = CE_WEIGHT * loss_ce + FEAT_WEIGHT * loss_distill
    loss.backward()
    return {"ce": loss_ce, "ofd": loss_distill, "loss": loss}


# ------------------------------------------------------------------ kdlight's step
def command_line_system(
    overrides: list[str], tmp_path: Path, change_teacher: Callable[[nn.Module], None] | None
) -> tuple[DistillationModule, str, str]:
    """kdlight's system for the composed config, as ``kdlight-train`` builds it, with a
    teacher of random weights and BN terms (so that every channel has its own margin);
    ``change_teacher``: a deliberate break, applied to the teacher before the system reads
    it."""
    cfg = compose_config(["experiment=zoo_distill", *overrides], tmp_path)
    torch.manual_seed(0)
    student = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    teacher = randomise_(create_model(cfg.distill.teacher_model, num_classes=cfg.num_classes), 1)
    if change_teacher is not None:
        change_teacher(teacher)
    module = instantiate(cfg.module, _convert_="partial", model=student, teacher=teacher)
    return module, cfg.model.name, cfg.distill.teacher_model


def compare_with_official(
    overrides: list[str],
    tmp_path: Path,
    change_teacher: Callable[[nn.Module], None] | None = None,
) -> DistillationModule:
    """Build kdlight's OFD system for ``overrides``, run its step and mdistiller's on copies
    of the same weights, and assert each part, the total and every gradient agree."""
    module, student_name, teacher_name = command_line_system(
        ["distiller=ofd", *overrides], tmp_path, change_teacher
    )
    method = module.distiller
    assert not module.teacher.training, "kdlight's teacher must run in eval mode"
    model_s = official_copy_of(student_name, module.student.train())
    model_t = official_copy_of(teacher_name, module.teacher)
    theirs = official_connectors(model_s, model_t)
    teacher_margins = align(margins(get_bn_before_relu(model_t)))[0]
    for index, (mine, expected) in enumerate(zip(method.margins(), teacher_margins, strict=True)):
        assert_close(mine.view(1, -1, 1, 1), expected, f"margin {index}")
    ours = method.connectors.state_dict()
    shapes = [tuple(value.shape) for value in ours.values()]
    assert shapes == [tuple(value.shape) for value in theirs.state_dict().values()], (
        f"connector: kdlight's {shapes} is not the official one"
    )
    theirs.load_state_dict(
        dict(zip(theirs.state_dict(), [value.clone() for value in ours.values()], strict=True))
    )

    images, labels = fixed_batch()
    parts = kdlight_step(module, images, labels, teacher_in_train_mode=False)
    expected = official_step(model_s, model_t, theirs, teacher_margins, images, labels)

    assert set(parts) == {"loss", "ce", "ofd"}
    for part in ("ce", "ofd", "loss"):
        assert_close(parts[part], expected[part], f"part {part!r}")
    names = official_names(student_name, module.student)
    official_parameters = dict(model_s.named_parameters())
    for key, parameter in module.student.named_parameters():
        assert_close(parameter.grad, official_parameters[names[key]].grad, f"student {key}")
    for (key, parameter), other in zip(
        method.connectors.named_parameters(), theirs.parameters(), strict=True
    ):
        assert_close(parameter.grad, other.grad, f"connector {key}")
    return module


PAIRS = ["resnet56_resnet20", "vgg13_vgg8"]  # 3 and 4 stages


@pytest.mark.parametrize("pair", PAIRS)
def test_a_step_equals_the_official_step(pair: str, tmp_path: Path):
    module = compare_with_official([f"pair={pair}"], tmp_path)
    assert module.distiller.settings() == {
        "weight": FEAT_WEIGHT, "ce_weight": CE_WEIGHT, "connector_kernel_size": KERNEL_SIZE
    }  # fmt: skip
    trained = {id(p) for p in module.trainable_parameters()}
    assert all(id(p) in trained for p in module.distiller.connectors.parameters())
    # the margins are the frozen teacher's: not saved with the student's checkpoint
    assert not [key for key in module.distiller.state_dict() if "margin" in key]


def wrong_margins(teacher: nn.Module) -> None:
    """Each margin from the last block's first BN (bn1), not the one before the ReLU."""
    teacher.bn_before_relu = {
        tap: norm.replace("bn2", "bn1") for tap, norm in teacher.bn_before_relu.items()
    }


#: Wrong wirings the step test must catch: (pair, overrides, a change to the teacher, what
#: is wrong, the comparison that catches it).
BREAKS = [
    ("resnet56_resnet20", ["distiller.weight=0.01"], None, "another weight", "part 'loss'"),
    ("vgg13_vgg8", ["distiller.student_taps=[relu1,relu2,relu3,relu4]"], None,
     "the student's stages after their ReLU", "part 'ofd'"),
    ("resnet56_resnet20", ["distiller.connector_kernel_size=3"], None,
     "a 3x3 connector", "connector"),
    ("resnet56_resnet20", [], wrong_margins, "the margins of another BN", "margin 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    "pair, overrides, change_teacher, wrong, caught_by", BREAKS, ids=[b[3] for b in BREAKS]
)
def test_the_step_test_catches_a_wrong_wiring(
    pair: str, overrides: list[str], change_teacher, wrong: str, caught_by: str, tmp_path: Path
):
    with pytest.raises(AssertionError, match=f"^{caught_by}"):
        compare_with_official([f"pair={pair}", *overrides], tmp_path, change_teacher)


# ---------------------------------------------------------- the pre-activation taps
#: One network of each zoo family with pre-activation feats in the official code (each
#: family's taps are named by one class), and MobileNetV2, whose official network returns
#: no ``preact_feats`` (mdistiller models/cifar/mobilenetv2.py:137-163).
FAMILIES = ["resnet8", "resnet14", "vgg8", "wrn_16_1", "shufflev1", "shufflev2"]


def test_the_preact_taps_are_the_official_preact_feats():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in FAMILIES:
        model = randomise_(create_model(name, num_classes=100), seed=1).eval()
        official = official_copy_of(name, model)
        names = default_taps(model, "preact_stages")
        taps = FeatureTaps(model, names)
        with torch.no_grad(), taps.capture() as features:
            logits = model(images)
        with torch.no_grad():
            feats, expected_logits = official(images, is_feat=True, preact=True)
        assert len(names) == len(feats) - 2, name
        for tap, expected in zip(names, feats[1:-1], strict=True):
            assert_close(features[tap], expected, f"{name} {tap}")
        assert_close(logits, expected_logits, f"{name}'s logits with the taps on")
        if name.startswith("shuffle"):  # mdistiller refuses them as OFD teachers
            assert not hasattr(model, "bn_before_relu"), name
            continue
        norms = [model.get_submodule(model.bn_before_relu[tap]) for tap in names]
        assert [type(bn) for bn in norms] == [nn.BatchNorm2d] * len(names), name
        # the official get_bn_before_relu's BNs, in order: the same (random) weights
        for bn, theirs in zip(norms, official_bn_before_relu(official), strict=True):
            assert torch.equal(bn.weight, theirs.weight) and torch.equal(bn.bias, theirs.bias)
    with pytest.raises(KDLightError, match="names no default preact_stages taps"):
        default_taps(create_model("mobilenetv2"), "preact_stages")


def official_bn_before_relu(model: nn.Module) -> list[nn.BatchNorm2d]:
    """``get_bn_before_relu`` of mdistiller's networks: resnet.py:167-179, vgg.py:61-66,
    wrn.py:116-121."""
    if hasattr(model, "block1") and hasattr(model, "bn1"):  # WideResNet
        return [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
    return get_bn_before_relu(model)
