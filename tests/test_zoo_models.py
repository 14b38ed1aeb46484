"""The knowledge-distillation zoo's CIFAR models (RepDistiller, mdistiller): each builds,
trains, has the zoo's exact size and feature taps, and computes what the official network
does (tests/official/models.py, written as the official code is) with the official weights,
loaded from a file as the zoo publishes them, or copied across (``official_copy_of``)."""

import argparse
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdlight.errors import KDLightError
from kdlight.models import (
    PUBLISHED_MODELS,
    count_parameters,
    create_model,
    list_models,
    load_published,
    official_state_dict,
)
from kdlight.models.taps import FeatureTaps
from tests.official.models import OFFICIAL_MODELS, official_copy_of, official_model, randomise_

#: Parameters for (100, 10) classes, counted on RepDistiller's own definitions.
PARAMETERS = {
    "resnet8": (83_892, 78_042),
    "resnet14": (181_108, 175_258),
    "resnet20": (278_324, 272_474),
    "resnet32": (472_756, 466_906),
    "resnet44": (667_188, 661_338),
    "resnet56": (861_620, 855_770),
    "resnet110": (1_736_564, 1_730_714),
    "resnet8x4": (1_233_540, 1_210_410),
    "resnet32x4": (7_433_860, 7_410_730),
    "wrn_16_1": (180_916, 175_066),
    "wrn_16_2": (703_284, 691_674),
    "wrn_40_1": (569_780, 563_930),
    "wrn_40_2": (2_255_156, 2_243_546),
    "vgg8": (3_965_028, 3_918_858),
    "vgg11": (9_277_284, 9_231_114),
    "vgg13": (9_462_180, 9_416_010),
    "vgg16": (14_774_436, 14_728_266),
    "vgg19": (20_086_692, 20_040_522),
    "mobilenetv2": (812_836, 697_546),
    "shufflev1": (949_258, 862_768),
    "shufflev2": (1_355_528, 1_263_278),
}

#: The sizes the KD papers print for 100 classes (rounded to 10K).
PAPER_SIZES = {
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "wrn_40_2": 2.26e6,
    "wrn_16_2": 0.70e6,
    "resnet56": 0.86e6,
    "resnet20": 0.28e6,
    "vgg13": 9.46e6,
    "vgg8": 3.97e6,
    "shufflev2": 1.36e6,
    "mobilenetv2": 0.81e6,
}


def _classifier(model: nn.Module) -> nn.Linear:
    return [module for module in model.modules() if isinstance(module, nn.Linear)][-1]


def _save_published(path: Path, state: dict[str, Tensor], **extra) -> Path:
    """A file laid out the way RepDistiller's train_teacher.py saves it."""
    torch.save({"epoch": 240, "model": state, **extra}, path)
    return path


def test_the_zoo_names_are_registered_and_published():
    assert set(PARAMETERS) == set(PUBLISHED_MODELS)
    assert set(PUBLISHED_MODELS) <= set(list_models())
    assert set(OFFICIAL_MODELS) == set(PUBLISHED_MODELS)  # each is checked against its own


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_zoo_model_has_the_zoo_size_and_feature_taps(name: str):
    """For 100 classes: the exact size, logits, and taps that read stages of shrinking (or
    equal) resolution and a pooled feature as wide as the classifier's input."""
    model = create_model(name, num_classes=100).eval()
    assert count_parameters(model) == PARAMETERS[name][0]
    stages, embedding = model.feature_taps["stages"], model.feature_taps["embedding"]
    assert len(stages) >= 3 and len(embedding) == 1
    taps = FeatureTaps(model, stages + embedding)
    with torch.no_grad(), taps.capture() as features:
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert all(features[tap].dim() == 4 for tap in stages)
    sizes = [features[tap].shape[-1] for tap in stages]
    assert sizes == sorted(sizes, reverse=True), sizes
    assert features[embedding[0]].flatten(1).shape == (2, _classifier(model).in_features)


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_zoo_model_trains_on_cpu(name: str):
    """For 10 classes: the exact size and one SGD step on a batch of two."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train()
    assert count_parameters(model) == PARAMETERS[name][1]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    loss = F.cross_entropy(logits, torch.tensor([3, 7]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(("name", "size"), PAPER_SIZES.items())
def test_sizes_match_the_papers(name: str, size: float):
    assert round(PARAMETERS[name][0], -4) == size


# --- against the official architectures (tests/official/models.py, written independently) --


def _kdlight_outputs(model: nn.Module, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    """kdlight's logits, its default ``stages`` taps and its ``embedding`` tap, flattened."""
    stages, embedding = model.feature_taps["stages"], model.feature_taps["embedding"]
    taps = FeatureTaps(model, stages + embedding)
    with taps.capture() as features:
        logits = model(images)
    taps.remove()
    return logits, [features[tap] for tap in stages], features[embedding[0]].flatten(1)


def _assert_same_outputs(model: nn.Module, reference: nn.Module, images: Tensor) -> None:
    """Equal logits, and kdlight's default taps equal the official ``feats[1:-1]`` (its
    stages, after the ReLU) and ``feats[-1]`` (the pooled feature)."""
    logits, stages, embedding = _kdlight_outputs(model, images)
    feats, expected = reference(images, is_feat=True)
    assert len(stages) == len(feats) - 2
    _assert_close(logits, expected, "logits")
    for index, (tapped, official) in enumerate(zip(stages, feats[1:-1], strict=True), start=1):
        _assert_close(tapped, official, f"stage {index}")
    _assert_close(embedding, feats[-1], "embedding")


def _assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """Equal to float32 rounding: relative 1e-5, and an absolute term of 1e-5 of the
    tensor's largest value for the entries near zero (the pool sums in another order:
    AdaptiveAvgPool2d against the official AvgPool2d(8))."""
    atol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=what)


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_an_official_checkpoint_loads_with_the_official_outputs(name: str, tmp_path: Path):
    """A file as RepDistiller saves it, from the official network with random weights and BN
    statistics, loads through ``load_published`` into a model that computes what the
    official one does, in eval mode (the running statistics in use)."""
    reference = randomise_(official_model(name, num_classes=100), seed=1).eval()
    path = _save_published(tmp_path / "ckpt_epoch_240.pth", reference.state_dict())
    model = load_published(path, name, num_classes=100).eval()
    with torch.no_grad():
        _assert_same_outputs(model, reference, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_official_copy_of_a_zoo_model_computes_the_same(name: str):
    """kdlight's weights in the official network (``official_copy_of``, a strict load of
    ``official_state_dict``) give the same outputs in eval mode and in train mode (batch
    statistics), and train mode moves both models' BN running statistics alike."""
    model = randomise_(create_model(name, num_classes=100), seed=2).eval()
    reference = official_copy_of(name, model)
    assert not reference.training
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_same_outputs(model, reference, images)
        model.train(), reference.train()
        _assert_same_outputs(model, reference, images)
    ours, theirs = official_state_dict(name, model), reference.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        _assert_close(ours[key].float(), value.float(), key)


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_a_fresh_zoo_model_is_the_official_initialisation(name: str):
    """Under the same seed, kdlight builds the very weights the official code draws (the
    same modules created in the same order, the same initialisation in the same order), so
    a student starts where the official one would."""
    torch.manual_seed(0)
    ours = official_state_dict(name, create_model(name, num_classes=100))
    torch.manual_seed(0)
    theirs = official_model(name, num_classes=100).state_dict()
    assert list(ours) == list(theirs)
    assert [key for key in theirs if not torch.equal(ours[key], theirs[key])] == []


def test_official_copy_of_holds_copies():
    model = create_model("resnet8", num_classes=10)
    reference = official_copy_of("resnet8", model)
    with torch.no_grad():
        reference.fc.weight.add_(1.0)
    assert not torch.equal(reference.fc.weight, model.fc.weight)


# --- what a file may look like ------------------------------------------------------------


@pytest.fixture
def resnet20_state() -> dict[str, Tensor]:
    """The official resnet20's weights, as a published file holds them."""
    return randomise_(official_model("resnet20", num_classes=100), seed=3).state_dict()


def _assert_same_weights(model: nn.Module, state: dict[str, Tensor]) -> None:
    """``model`` computes what the official resnet20 holding ``state`` does (eval mode)."""
    reference = official_model("resnet20", num_classes=100)
    reference.load_state_dict(state, strict=False)  # an old file lacks num_batches_tracked
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_close(model.eval()(images), reference.eval()(images), "logits")


@pytest.mark.parametrize("layout", ["plain", "state_dict", "data_parallel"])
def test_plain_and_wrapped_state_dicts_load(layout: str, resnet20_state, tmp_path: Path):
    content = {
        "plain": resnet20_state,
        "state_dict": {"state_dict": resnet20_state},
        "data_parallel": {"model": {f"module.{k}": v for k, v in resnet20_state.items()}},
    }[layout]
    torch.save(content, tmp_path / "weights.pth")
    _assert_same_weights(load_published(tmp_path / "weights.pth", "resnet20"), resnet20_state)


def test_a_full_repdistiller_file_loads(resnet20_state, tmp_path: Path):
    """``*_last.pth`` keeps the argparse options and the optimizer's state as well."""
    model = create_model("resnet20", num_classes=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = _save_published(
        tmp_path / "resnet20_last.pth",
        resnet20_state,
        opt=argparse.Namespace(model="resnet20", learning_rate=0.05),
        optimizer=optimizer.state_dict(),
        best_acc=torch.tensor(69.1),
    )
    _assert_same_weights(load_published(path, "resnet20"), resnet20_state)


def test_files_without_num_batches_tracked_load(resnet20_state, tmp_path: Path):
    old = {k: v for k, v in resnet20_state.items() if not k.endswith("num_batches_tracked")}
    path = _save_published(tmp_path / "old.pth", old)
    _assert_same_weights(load_published(path, "resnet20"), old)


# --- one-line errors ----------------------------------------------------------------------


def _load_error(*args, **kwargs) -> str:
    with pytest.raises(KDLightError) as info:
        load_published(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_wrong_model_name_is_named(resnet20_state, tmp_path: Path):
    path = _save_published(tmp_path / "t.pth", resnet20_state)
    assert "'nope'" in _load_error(path, "nope")
    assert "'small_cnn'" in _load_error(path, "small_cnn")  # registered, but not the zoo's
    message = _load_error(path, "resnet32")  # another architecture
    assert "'resnet32'" in message and "missing" in message and "'layer1.3." in message
    message = _load_error(path, "resnet14")
    assert "unexpected" in message and "'layer1.2." in message


def test_a_wrong_num_classes_names_the_key_and_both_shapes(resnet20_state, tmp_path: Path):
    message = _load_error(_save_published(tmp_path / "t.pth", resnet20_state), "resnet20", 10)
    assert "'fc.weight'" in message and "(100, 64)" in message and "(10, 64)" in message
    assert "num_classes=100" in message
    # a wrong shape outside the classifier (a 0-dim tensor too): the key, no classes hint
    state = {**resnet20_state, "bn1.weight": torch.tensor(1.0)}
    message = _load_error(_save_published(tmp_path / "scalar.pth", state), "resnet20")
    assert "'bn1.weight' has shape ()" in message and "num_classes=" not in message.split(":")[-1]


def test_missing_and_unexpected_keys_are_named(resnet20_state, tmp_path: Path):
    state = dict(resnet20_state)
    del state["layer3.2.bn2.weight"]
    message = _load_error(_save_published(tmp_path / "missing.pth", state), "resnet20")
    assert "1 missing" in message and "'layer3.2.bn2.weight'" in message

    state = {**resnet20_state, "head.weight": torch.zeros(1)}
    message = _load_error(_save_published(tmp_path / "extra.pth", state), "resnet20")
    assert "1 unexpected" in message and "'head.weight'" in message


class NotAWeight:
    """An object that ``torch.load(weights_only=True)`` refuses."""


def test_unreadable_files_are_one_line_errors(tmp_path: Path):
    assert "no such file" in _load_error(tmp_path / "absent.pth", "resnet8")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert "cannot read" in _load_error(tmp_path / "garbage.pth", "resnet8")
    torch.save({"model": {}, "opt": NotAWeight()}, tmp_path / "pickled.pth")
    message = _load_error(tmp_path / "pickled.pth", "resnet8")
    assert "cannot read" in message and "NotAWeight" in message
    torch.save({"epoch": 240, "best_acc": 70.0}, tmp_path / "no_model.pth")
    message = _load_error(tmp_path / "no_model.pth", "resnet8")
    assert "no state dict" in message and "'epoch'" in message
