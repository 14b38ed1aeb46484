"""Any teacher: a torchvision model named by a model config with ``_target_`` and a plain
state dict, a Lightning checkpoint of another LightningModule, a teacher file laid out as
RepDistiller and mdistiller publish them; and one-line errors that say what a file holds
against what was expected."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlight.errors import KDLightError
from kdlight.lit import load_teacher
from kdlight.models import create_model
from kdlight.models.published import official_state_dict
from tests.conftest import finish, run_cli, start_cli

TINY = [
    "trainer=cpu", "data=synthetic", "data.synthetic_train_size=200",
    "data.synthetic_test_size=100", "data.val_size=50", "data.batch_size=50",
    "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
    "model.width=0.25",
]  # fmt: skip
TORCHVISION = {"_target_": "torchvision.models.resnet18", "num_classes": 10}


def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def same_outputs(a: nn.Module, b: nn.Module) -> bool:
    return torch.equal(a.eval()(images()), b.eval()(images()))


def test_a_torchvision_teacher_from_a_model_config_and_a_plain_state_dict(tmp_path: Path):
    import torchvision

    original = torchvision.models.resnet18(num_classes=10)
    torch.save(original.state_dict(), tmp_path / "resnet18.pt")
    teacher = load_teacher(tmp_path / "resnet18.pt", TORCHVISION, num_classes=10)
    assert same_outputs(teacher, original)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.spec == TORCHVISION  # how to rebuild it


def test_a_lightning_checkpoint_of_another_module(tmp_path: Path):
    """A user's LightningModule keeps its network as ``self.net``: the ``net.`` prefix is
    found and removed."""
    original = create_model("resnet8")
    state = {f"net.{k}": v for k, v in original.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "user.ckpt")
    assert same_outputs(load_teacher(tmp_path / "user.ckpt", "resnet8", 10), original)


def test_a_teacher_as_the_kd_zoo_publishes_it(tmp_path: Path):
    """``ckpt_epoch_240.pth``: the weights under ``model`` with RepDistiller's names
    (``conv1``, ``layer1.0``, ``downsample``), which kdlight's resnet8 names otherwise."""
    original = create_model("resnet8", num_classes=100)
    published = {"model": official_state_dict("resnet8", original), "epoch": 240}
    assert "layer1.0.conv1.weight" in published["model"]
    torch.save(published, tmp_path / "ckpt_epoch_240.pth")
    teacher = load_teacher(tmp_path / "ckpt_epoch_240.pth", "resnet8", num_classes=100)
    assert same_outputs(teacher, original)


def test_a_file_that_does_not_fit_says_what_was_expected_and_found(tmp_path: Path):
    torch.save(create_model("resnet8").state_dict(), tmp_path / "plain.pt")
    with pytest.raises(KDLightError) as unnamed:
        load_teacher(tmp_path / "plain.pt")
    assert str(unnamed.value) == (
        f"teacher checkpoint {tmp_path / 'plain.pt'} is a state dict that does not record its "
        "model: name the architecture with distill.teacher_model=NAME (or a model config with "
        "_target_)"
    )
    with pytest.raises(KDLightError) as wrong:
        load_teacher(tmp_path / "plain.pt", "resnet8", num_classes=100)
    message = str(wrong.value)
    assert "\n" not in message and "train one first" not in message
    assert "does not fit resnet8: fc.weight is torch.Size([10, 64]) in the file, " in message
    assert "torch.Size([100, 64]) in the model" in message
    with pytest.raises(KDLightError, match=r"does not fit resnet20: missing stages\.3\.conv1"):
        load_teacher(tmp_path / "plain.pt", "resnet20")


@pytest.mark.slow
def test_the_cli_distils_from_a_torchvision_teacher(tmp_path: Path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "tv.pt")
    teacher = "{_target_: torchvision.models.resnet18, num_classes: 10}"
    args = ["experiment=distill", f"distill.teacher_model={teacher}", *TINY]
    training = start_cli([*args, f"distill.teacher_checkpoint={tmp_path / 'tv.pt'}"], tmp_path)
    # without the weights, in a folder of its own: it starts up while the other trains
    (tmp_path / "missing").mkdir()
    missing = finish(start_cli(args, tmp_path / "missing"))
    result = finish(training)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (tmp_path / "outputs").rglob("metrics.json")
    record = json.loads(metrics.read_text())
    assert record["teacher_model"] == "ResNet" and record["accuracy"] is not None

    assert missing.returncode == 2
    assert (
        "error: distill.teacher_model is a model config: name its weights with " in missing.stderr
    )


@pytest.mark.slow
def test_a_users_own_model_trains_from_the_cli_and_is_rebuilt_from_its_checkpoint(tmp_path: Path):
    """``model=`` any config with ``_target_`` (here torchvision's ResNet-18): its
    checkpoints record that config, so ``load_model`` and ``load_teacher`` rebuild it when
    its target is trusted (``trusted_targets``)."""
    from kdlight import load_model

    user = ["model._target_=torchvision.models.resnet18", "~model.name"]
    args = ["experiment=teacher", *[a for a in TINY if a != "model.width=0.25"], *user]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (last,) = (tmp_path / "outputs").rglob("checkpoints/last.ckpt")
    trusted = ["torchvision.models.resnet18"]
    rebuilt = load_model(last, trusted_targets=trusted)
    assert type(rebuilt).__module__ == "torchvision.models.resnet"
    assert rebuilt.spec == {"_target_": "torchvision.models.resnet18", "num_classes": 10}
    assert same_outputs(load_teacher(last, trusted_targets=trusted), rebuilt)
