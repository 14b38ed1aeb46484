"""A small model registry in the spirit of timm's ``register_model`` / ``create_model``."""

from collections.abc import Callable

from torch import nn

from kdlight.errors import KDLightError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model by name.

    The returned module carries ``model.spec`` (its name and arguments), which checkpoints
    store so that a teacher can be rebuilt from its checkpoint alone.
    """
    if name not in _MODELS:
        raise KDLightError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    model = _MODELS[name](num_classes=num_classes, **kwargs)
    model.spec = {"name": name, "num_classes": num_classes, **kwargs}
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
