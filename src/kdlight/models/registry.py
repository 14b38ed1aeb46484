"""A small model registry in the spirit of timm's ``register_model`` / ``create_model``."""

from collections.abc import Callable, Mapping

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


def build_model(spec: Mapping) -> nn.Module:
    """A model from its spec: a registered ``name`` and its arguments (what
    :func:`create_model` records in ``model.spec``), or a config with ``_target_``, any
    importable ``nn.Module`` class or function and its arguments (a user's own class, a
    torchvision or timm model). The model carries the spec as ``model.spec``, so that
    kdlight's checkpoints record how to rebuild it."""
    spec = dict(spec)
    if "_target_" not in spec:
        return create_model(**spec)
    from hydra.utils import instantiate

    try:
        model = instantiate(spec)
    except Exception as err:  # an import error, a wrong argument...
        cause = err.__cause__ or err
        raise KDLightError(
            f"cannot build the model {spec['_target_']}: {str(cause).splitlines()[0]}"
        ) from None
    if not isinstance(model, nn.Module):
        raise KDLightError(f"{spec['_target_']} built a {type(model).__name__}, not an nn.Module")
    if getattr(model, "spec", None) is None:  # create_model's own spec is kept as it is
        model.spec = spec
    return model


def spec_name(spec: Mapping | None, model: nn.Module | None = None) -> str:
    """A model's name for folders and reports: its registered name, else its class's."""
    spec = spec or {}
    if spec.get("name"):
        return str(spec["name"])
    if spec.get("_target_"):
        return str(spec["_target_"]).rsplit(".", 1)[-1]
    return type(model).__name__ if model is not None else "model"
