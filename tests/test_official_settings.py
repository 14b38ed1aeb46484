"""Each shipped pair, with the method chosen on the command line, gets the settings of the
official CIFAR-100 code: DKD's per-pair beta (mdistiller's configs/cifar100/dkd/*.yaml) and
FitNet's hint at the official hint_layer 2 of each network's feature list (mdistiller's
FitNet.py and RepDistiller's train_student.py: ``feats[hint_layer]``, ``feats[0]`` the stem's
output). The expected values are written here from those files, not read from kdlight."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from kdlight.distillers import DKD, KD, FitNet
from kdlight.errors import KDLightError
from kdlight.lit import DistillationModule
from kdlight.models import create_model
from tests.conftest import compose_config

#: DKD.BETA of mdistiller's configs/cifar100/dkd/<pair>.yaml; 8.0 where the file sets none
#: (mdistiller/engine/cfg.py: CFG.DKD.BETA = 8.0).
OFFICIAL_DKD_BETA = {
    "resnet56_resnet20": 2.0,  # res56_res20.yaml
    "resnet110_resnet32": 2.0,  # res110_res32.yaml
    "resnet110_resnet20": 8.0,  # no mdistiller DKD config: the default
    "resnet32x4_resnet8x4": 8.0,  # res32x4_res8x4.yaml sets none
    "resnet32x4_shufflev1": 8.0,  # res32x4_shuv1.yaml sets none
    "resnet32x4_shufflev2": 8.0,  # res32x4_shuv2.yaml sets none
    "wrn_40_2_shufflev1": 8.0,  # wrn40_2_shuv1.yaml sets none
    "vgg13_vgg8": 6.0,  # vgg13_vgg8.yaml
    "vgg13_mobilenetv2": 6.0,  # vgg13_mv2.yaml
    "wrn_40_2_wrn_16_2": 6.0,  # wrn40_2_wrn_16_2.yaml
    "wrn_40_2_wrn_40_1": 6.0,  # wrn40_2_wrn_40_1.yaml
}

#: The official hint (feats[2]) of each network for 32x32 inputs, (channels, height, width):
#: resnet8x4/32x4 layer2, vgg block2 after its ReLU, mobile_half blocks[2] (width 0.5).
#: The connector: official ConvReg, a 1x1 convolution for maps of the same size.
OFFICIAL_HINTS = {
    "vgg13_vgg8": ((256, 8, 8), (256, 8, 8)),
    "vgg13_mobilenetv2": ((16, 8, 8), (256, 8, 8)),
    "resnet32x4_resnet8x4": ((128, 16, 16), (128, 16, 16)),
}


def test_the_shipped_pairs_are_the_official_table():
    pairs = Path(__file__).parents[1] / "conf" / "pair"
    assert sorted(p.stem for p in pairs.glob("*.yaml")) == sorted(OFFICIAL_DKD_BETA)


@pytest.mark.parametrize("pair", sorted(OFFICIAL_DKD_BETA))
def test_dkd_on_each_pair_has_the_official_beta(pair: str, tmp_path: Path):
    cfg = compose_config(["experiment=zoo_distill", f"pair={pair}", "distiller=dkd"], tmp_path)
    method = instantiate(cfg.distiller)
    assert isinstance(method, DKD)
    assert (method.beta, method.alpha, method.temperature) == (OFFICIAL_DKD_BETA[pair], 1.0, 4.0)
    assert (method.ce_weight, method.warmup_epochs) == (1.0, 20)


def test_the_pair_setting_reaches_only_its_method_and_the_method_grid(tmp_path: Path):
    """KD on a beta-2 pair is built as before (no beta leaks into it); the method grid with
    a pair gets the pair's beta in its DKD cell; a pair is not needed."""
    kd = compose_config(["experiment=zoo_distill", "pair=resnet56_resnet20"], tmp_path)
    assert isinstance(instantiate(kd.distiller), KD) and "beta" not in kd.distiller
    grid = compose_config(["experiment=method_grid", "+pair=resnet56_resnet20"], tmp_path)
    assert grid.methods.dkd.beta == 2.0 and "beta" not in grid.methods.kd
    plain = compose_config(["experiment=distill", "distiller=dkd"], tmp_path)
    assert plain.distiller.beta == 8.0
    # the command line still has the last word
    chosen = ["experiment=zoo_distill", "pair=vgg13_vgg8", "distiller=dkd", "distiller.beta=3"]
    assert compose_config(chosen, tmp_path).distiller.beta == 3


@pytest.mark.parametrize("pair", sorted(OFFICIAL_HINTS))
def test_fitnet_taps_the_official_hint_layer(pair: str, tmp_path: Path):
    cfg = compose_config(["experiment=zoo_distill", f"pair={pair}", "distiller=fitnet"], tmp_path)
    method = instantiate(cfg.distiller)
    assert isinstance(method, FitNet) and (method.weight, method.ce_weight) == (100.0, 1.0)
    student = instantiate(cfg.model)
    teacher = create_model(cfg.distill.teacher_model, num_classes=cfg.num_classes)
    module = DistillationModule(student, teacher=teacher, distiller=method)
    shapes = {}
    for role, model, names in (
        ("student", module.model, module.slot.student_taps.names),
        ("teacher", module.teacher, module.slot.teacher_names),
    ):
        (name,) = names
        with torch.no_grad():
            captured = {}
            handle = dict(model.named_modules())[name].register_forward_hook(
                lambda m, args, out, captured=captured: captured.setdefault("out", out)
            )
            model.eval()(torch.zeros(2, 3, 32, 32))
            handle.remove()
        shapes[role] = tuple(captured["out"].shape[1:])
    assert (shapes["student"], shapes["teacher"]) == OFFICIAL_HINTS[pair]
    conv = method.regressor.conv
    (s_channels, *_), (t_channels, *_) = OFFICIAL_HINTS[pair]
    assert type(conv) is nn.Conv2d
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (
        s_channels,
        t_channels,
        (1, 1),
    )
    assert conv.stride == (1, 1) and conv.bias is not None
    assert [type(m) for m in method.regressor.children()][1:] == [nn.BatchNorm2d, nn.ReLU]


def test_fitnet_counts_each_network_on_its_own(tmp_path: Path):
    """A 3-stage student and a 4-stage teacher: hint_layer 2 is each network's second stage
    (the official feats[2] of each), not a pairing of the deepest stages."""
    student, teacher = create_model("resnet8x4"), create_model("vgg13")
    module = DistillationModule(student, teacher=teacher, distiller=FitNet(hint_layer=2))
    assert module.slot.student_taps.names == ["layer2"]
    assert module.slot.teacher_names == ["relu2"]
    # kdlight's own count of the paired (deepest) stages stays available
    paired = DistillationModule(
        create_model("resnet8x4"), teacher=create_model("vgg13"), distiller=FitNet(stage=-2)
    )
    assert paired.slot.teacher_names == ["relu3"]
    # a student tap named by hand is its hint as it is; the teacher's is still feats[2]
    named = DistillationModule(
        create_model("resnet8x4"),
        teacher=create_model("vgg13"),
        distiller=FitNet(student_taps=["layer3"]),
    )
    assert (named.slot.student_taps.names, named.slot.teacher_names) == (["layer3"], ["relu2"])


@pytest.mark.parametrize("hint_layer", [0, 4])
def test_a_hint_layer_the_network_does_not_have_is_one_line(hint_layer: int):
    with pytest.raises(KDLightError) as error:
        DistillationModule(
            create_model("resnet8"),
            teacher=create_model("resnet20"),
            distiller=FitNet(hint_layer=hint_layer),
        )
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"distiller.hint_layer={hint_layer}: ")
