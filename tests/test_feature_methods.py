"""Feature methods through DistillationModule: taps by module name (kdlight.models.taps), each
method's wiring to its loss, connectors trained and saved but not exported, and a frozen
teacher (weights and BatchNorm statistics) under every method."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from kdlight import load_model
from kdlight.distillers import AT, CC, CRD, KD, MLKD, PKT, RKD, SP, VID, FitNet, Outputs
from kdlight.errors import KDLightError
from kdlight.lit import DistillationGridModule, DistillationModule
from kdlight.losses import at_loss, cc_loss, hint_loss, pkt_loss, rkd_loss, sp_loss
from kdlight.models import create_model
from kdlight.models.taps import FeatureTaps, probe_shapes
from tests.conftest import cpu_trainer, synthetic_datamodule

METHODS = {"fitnet": FitNet, "at": AT, "sp": SP, "vid": VID, "pkt": PKT, "rkd": RKD, "crd": CRD}
METHODS["cc"] = CC


def student() -> nn.Module:
    return create_model("small_cnn", width=0.25)


def teacher() -> nn.Module:
    """A four-stage teacher (the reference teacher's shape, narrower) for a 3-stage student."""
    return create_model("resnet18", width=0.125)


def images(seed: int = 0, n: int = 8) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- taps
def test_taps_read_the_named_modules_outputs_only_while_capturing():
    model = create_model("resnet8").eval()
    taps = FeatureTaps(model, ["stages.1", "pool"])
    x = images()
    with taps.capture() as features:
        logits = model(x)
    assert list(features) == ["stages.1", "pool"]
    expected = model.stages[:2](model.stem(x))
    torch.testing.assert_close(features["stages.1"], expected)
    torch.testing.assert_close(model.fc(features["pool"].flatten(1)), logits)
    model(x)  # outside capture nothing is kept
    assert taps._captured is None
    assert probe_shapes(model, taps) == {
        "stages.1": torch.Size([32, 16, 16]),
        "pool": torch.Size([64, 1, 1]),
    }


def test_a_tap_that_does_not_exist_is_one_line_listing_the_valid_names():
    with pytest.raises(KDLightError) as error:
        DistillationModule(student(), teacher=teacher(), distiller=AT(student_taps=["layer9"]))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("the student (SmallCNN) has no module 'layer9' to tap; valid names:")
    assert "features.13" in message and "head.1" in message


def test_a_model_without_default_taps_is_told_how_to_name_them():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10))  # fmt: skip
    with pytest.raises(KDLightError, match=r"names no default embedding taps: set distiller"):
        DistillationModule(plain, teacher=teacher(), distiller=PKT())
    # named by hand, any nn.Module works
    module = DistillationModule(plain, teacher=teacher(), distiller=PKT(student_taps=["3"]))
    assert module.slot.student_taps.names == ["3"] and module.slot.teacher_names == ["pool"]


def test_default_taps_pair_the_deepest_stages():
    taps = {
        name: DistillationModule(student(), teacher=teacher(), distiller=method())
        for name, method in METHODS.items()
    }
    three = ["features.6", "features.13", "features.20"]
    assert taps["at"].slot.student_taps.names == three == taps["vid"].slot.student_taps.names
    assert taps["at"].slot.teacher_names == ["stages.3", "stages.5", "stages.7"]  # not stage 1
    # FitNet: the official hint_layer 2, each network's second stage (not a paired one)
    assert taps["fitnet"].slot.student_taps.names == ["features.13"]
    assert taps["fitnet"].slot.teacher_names == ["stages.3"]
    assert (taps["sp"].slot.student_taps.names, taps["sp"].slot.teacher_names) == (
        ["features.20"],
        ["stages.7"],
    )
    for name in ("pkt", "rkd", "cc", "crd"):
        assert (taps[name].slot.student_taps.names, taps[name].slot.teacher_names) == (
            ["head.1"],
            ["pool"],
        )


# ------------------------------------------------------------------- the methods' wiring
def outputs(module: DistillationModule, x: Tensor) -> tuple[Outputs, Outputs]:
    with torch.no_grad(), module.frozen.taps.capture() as features:
        t = Outputs(module.teacher(x), features)
    with module.slot.student_taps.capture() as features:
        s = Outputs(module.model(x), features)
    return s, t


@pytest.mark.parametrize(
    "method, weight, term",
    [
        (FitNet(), 100.0, lambda m, s, t: hint_loss(m.regressor(s[0]), t[0])),
        (AT(), 1000.0, lambda m, s, t: at_loss(s, t, p=2)),
        (SP(), 3000.0, lambda m, s, t: sp_loss(s, t)),
        (PKT(), 30000.0, lambda m, s, t: pkt_loss(s[0], t[0].flatten(1))),
        (RKD(), 1.0, lambda m, s, t: rkd_loss(s[0], t[0].flatten(1), 25.0, 50.0)["loss"]),
        (
            CC(),
            0.02,
            lambda m, s, t: cc_loss(m.embed_student(s[0]), m.embed_teacher(t[0].flatten(1))),
        ),
        (
            VID(),
            1.0,
            lambda m, s, t: sum(r(a, b) for r, a, b in zip(m.regressors, s, t, strict=True)),
        ),
    ],
    ids=lambda v: getattr(v, "name", None) if isinstance(v, nn.Module) else "",
)
def test_each_method_is_ce_plus_its_official_weight_times_its_loss(method, weight, term):
    module = DistillationModule(student(), teacher=teacher(), distiller=method)
    x, y = images(), torch.arange(8) % 10
    s, t = outputs(module, x)
    parts = method(s, t, y)
    expected_term = term(method, list(s.features.values()), list(t.features.values()))
    expected = nn.functional.cross_entropy(s.logits, y) + weight * expected_term
    torch.testing.assert_close(parts["loss"], expected)
    assert method.weight == weight and method.ce_weight == 1.0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradients_reach_the_student_and_the_method_never_the_teacher(name: str):
    """A training step under every method: the student and the method's connectors get
    gradients, the teacher none, and its weights and BatchNorm statistics do not change."""
    L.seed_everything(0)
    frozen = teacher()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    module = DistillationModule(student(), teacher=frozen, distiller=METHODS[name]())
    trainer = cpu_trainer(Path("/tmp") / f"kdlight-grad-{name}", epochs=1, limit_train_batches=2)
    data = synthetic_datamodule(train=200, test=50, val=50, batch=50)
    seen: dict[str, bool] = {}

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for key, parameter in pl_module.named_parameters():
                seen[key] = seen.get(key, False) or parameter.grad is not None

    trainer.callbacks.append(Grads())
    trainer.fit(module, datamodule=data)
    assert all(seen[k] for k in seen if k.startswith("model."))
    own = [k for k in seen if k.startswith("distiller.")]
    assert bool(own) == (name in ("fitnet", "vid", "crd", "cc"))
    assert all(seen[k] for k in own), [k for k in own if not seen[k]]
    assert not any(seen[k] for k in seen if k.startswith("teacher."))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in frozen.parameters()}  # not even in the optimizer
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics too


def test_connectors_are_saved_restored_and_not_exported(tmp_path: Path):
    L.seed_everything(0)
    module = DistillationModule(student(), teacher=teacher(), distiller=FitNet())
    trainer = cpu_trainer(tmp_path, epochs=1, limit_train_batches=2)
    data = synthetic_datamodule(train=200, test=50, val=50, batch=50)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "fitnet.ckpt")
    state = torch.load(tmp_path / "fitnet.ckpt", weights_only=False)["state_dict"]
    regressor = {k: v for k, v in state.items() if k.startswith("distiller.regressor.")}
    assert regressor and not any(k.startswith("teacher.") for k in state)

    restored = DistillationModule(student(), teacher=teacher(), distiller=FitNet())
    restored.load_state_dict(
        state | {f"teacher.{k}": v for k, v in restored.teacher.state_dict().items()}
    )
    for key, value in regressor.items():
        torch.testing.assert_close(restored.state_dict()[key], value)
    exported = load_model(tmp_path / "fitnet.ckpt")
    assert set(exported.state_dict()) == set(student().state_dict())

    trainer.test(module, datamodule=data, verbose=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["distiller"] == "fitnet"
    assert metrics["distiller_settings"] == {"weight": 100.0, "ce_weight": 1.0, "hint_layer": 2}
    assert metrics["taps"] == {"student": ["features.13"], "teacher": ["stages.3"]}


def test_a_stage_outside_the_pairs_is_one_line():
    with pytest.raises(KDLightError, match=r"^distiller.stage=5: fitnet pairs 3 stages"):
        DistillationModule(student(), teacher=teacher(), distiller=FitNet(stage=5))


# ---------------------------------------------------------------------------- the grid
def fit(module: L.LightningModule, root: Path) -> L.LightningModule:
    L.seed_everything(0)
    trainer = cpu_trainer(root, epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=synthetic_datamodule(train=300, test=50, val=50, batch=50))
    return module


def test_a_grid_of_methods_trains_each_cell_as_its_separate_run(tmp_path: Path):
    """KD, FitNet (a connector), CRD (a connector, memory banks, indices and random
    negatives) and MLKD (a strong view of each image, with random draws of its own) in one
    process, one teacher forward: each cell's student and connectors end equal to its
    separate DistillationModule run with the same seed."""
    frozen = teacher()
    methods = {
        "kd": lambda: KD(4.0, 0.9),
        "fitnet": FitNet,
        "crd": lambda: CRD(num_negatives=64),
        "mlkd": MLKD,
    }
    L.seed_everything(0)
    grid = DistillationGridModule(
        student(), teacher=frozen, methods={name: make() for name, make in methods.items()}
    )
    fit(grid, tmp_path / "grid")
    for index, (name, make) in enumerate(methods.items()):
        L.seed_everything(0)
        alone = fit(
            DistillationModule(student(), teacher=frozen, distiller=make()), tmp_path / name
        )
        for key, value in alone.model.state_dict().items():
            torch.testing.assert_close(grid.students[index].state_dict()[key], value, msg=key)
        for key, value in alone.distiller.state_dict().items():
            torch.testing.assert_close(grid.methods[index].state_dict()[key], value, msg=key)
    assert grid.names == ["kd", "fitnet", "crd", "mlkd"] and not grid.fused_kd
    assert grid.frozen.taps.names == ["stages.3", "pool"]  # each read once, for all cells
