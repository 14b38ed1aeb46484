"""The model registry: every architecture builds, outputs logits and has its documented size."""

import pytest
import torch
from torch import nn

from kdlight.models import count_parameters, create_model, list_models

EXPECTED_MODELS = {"resnet8", "resnet18", "resnet18_half", "resnet20", "small_cnn"}


def logits_shape(model: nn.Module, batch: int = 2) -> tuple[int, ...]:
    """Shape of the model's output for a random ``(batch, 3, 32, 32)`` input."""
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(batch, 3, 32, 32)).shape)


def test_registry_lists_the_expected_models():
    names = list_models()
    assert names == sorted(names)
    assert set(names) >= EXPECTED_MODELS


@pytest.mark.parametrize("name", list_models())
def test_every_model_maps_a_cifar_batch_to_logits(name: str):
    assert logits_shape(create_model(name)) == (2, 10)
    assert logits_shape(create_model(name, num_classes=100)) == (2, 100)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet18_half", 2.7e6, 2.9e6),
        ("resnet18", 11.1e6, 11.3e6),
        ("small_cnn", 0.1e6, 0.5e6),
        ("resnet20", 0.26e6, 0.28e6),
        ("resnet8", 75e3, 81e3),
    ],
)
def test_parameter_counts(name: str, low: float, high: float):
    assert low <= count_parameters(create_model(name)) <= high


def test_resnet18_half_is_resnet18_at_half_width():
    assert count_parameters(create_model("resnet18", width=0.5)) == count_parameters(
        create_model("resnet18_half")
    )


def test_count_parameters_skips_frozen_parameters():
    model = create_model("resnet8")
    total = count_parameters(model)
    for p in model.fc.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == total - sum(p.numel() for p in model.fc.parameters())


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="nope") as info:
        create_model("nope")
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "small_cnn"])
def test_nonpositive_width_is_rejected(name: str):
    with pytest.raises(ValueError, match="width"):
        create_model(name, width=0)


def test_spec_records_name_and_arguments_and_rebuilds_the_model():
    model = create_model("resnet20", num_classes=100, width=0.5)
    assert model.spec == {"name": "resnet20", "num_classes": 100, "width": 0.5}
    assert create_model("resnet18_half").spec == {"name": "resnet18_half", "num_classes": 10}

    rebuilt = create_model(**model.spec)
    assert type(rebuilt) is type(model)
    assert count_parameters(rebuilt) == count_parameters(model)
    assert count_parameters(model) < count_parameters(create_model("resnet20", num_classes=100))
    assert logits_shape(rebuilt) == (2, 100)
