"""A small model registry in the spirit of timm's ``register_model`` / ``create_model``, and
the rule for a model recorded in a file: built only from a registered name or a ``_target_``
the user trusts (:func:`build_recorded_model`)."""

import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from kdlight.errors import KDLightError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def register_variants(build: Callable[..., nn.Module], variants: Mapping[str, tuple]) -> None:
    """Register each variant of one architecture under its name: ``create_model(name,
    num_classes=...)`` calls ``build(*variants[name], num_classes=...)``."""
    _MODELS.update({name: functools.partial(build, *args) for name, args in variants.items()})


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def model_arguments(name: str) -> list[str]:
    """The arguments that the model registered as ``name`` takes (``num_classes`` and its own),
    which :func:`create_model` passes on to it."""
    return list(inspect.signature(_MODELS[name]).parameters)


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
    kdlight's checkpoints record how to rebuild it.

    It runs what ``_target_`` names: the spec is the user's own (a config, code). One read
    from a file goes through :func:`build_recorded_model`."""
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


# ------------------------------------------------------------------ models recorded in files
#: Targets (``_target_``) trusted in every model spec this process reads from a file, besides
#: those a call names: ``kdlight-train``'s ``trusted_targets`` setting (:func:`trust_targets`).
_trusted_targets: frozenset[str] = frozenset()
#: A Python name as Hydra imports it: ``module.attribute``, dotted.
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def trust_targets(targets: Iterable[str] | None) -> None:
    """Trust ``targets`` (dotted names such as ``torchvision.models.resnet18``) in every model
    spec this process reads from a file from now on, in place of those trusted before.
    ``kdlight-train`` and ``kdlight-cache-teacher`` set them from the ``trusted_targets``
    setting; code may pass ``trusted_targets=`` to ``load_model`` and ``load_teacher``
    instead.

    Raises:
        KDLightError: ``targets`` is not a list of dotted names.
    """
    global _trusted_targets
    _trusted_targets = frozenset(_dotted_names(targets))


def is_dotted_name(name) -> bool:
    """Whether ``name`` is a Python name as Hydra imports a target: ``module.attribute``."""
    return isinstance(name, str) and _DOTTED_NAME.fullmatch(name) is not None


def _dotted_names(targets: Iterable[str] | None) -> list[str]:
    if targets is None:
        return []
    names = [targets] if isinstance(targets, str | bytes) else list(targets)
    if isinstance(targets, str | bytes) or not all(is_dotted_name(name) for name in names):
        shown = ", ".join(map(str, names))
        raise KDLightError(
            f"trusted_targets=[{shown}] is not allowed: a list of dotted names, such as "
            "[torchvision.models.resnet18]"
        )
    return names


def spec_targets(spec) -> list[str]:
    """Every ``_target_`` of a model spec, nested ones included (Hydra's ``instantiate``
    builds nested configs too, in dicts and in lists such as ``_args_``), outermost first."""
    if isinstance(spec, Mapping):
        own = [spec["_target_"]] if "_target_" in spec else []
        return own + [t for value in spec.values() for t in spec_targets(value)]
    if isinstance(spec, list | tuple):
        return [t for value in spec for t in spec_targets(value)]
    return []


def check_recorded_spec(spec, source: str, trusted_targets: Iterable[str] = ()) -> None:
    """Refuse, in one line, a model spec read from ``source`` (a file) that would run code
    the user did not choose: a ``_target_`` (at any depth) that is not in
    ``trusted_targets`` nor in the process's (:func:`trust_targets`), or an OmegaConf
    interpolation (``${...}``), which Hydra would resolve as it builds the model (a resolver
    reads the environment, ``oc.env``, or makes new configs, ``oc.decode``). A spec with a
    registered ``name`` and no ``_target_`` calls only the registered model's function and
    always passes.

    Reading a file with ``torch.load(weights_only=True)`` runs no code; building what the
    file names would, so ``load_teacher`` and ``load_model`` check it first.
    """
    if not isinstance(spec, Mapping):
        raise KDLightError(f"{source} records a model spec that is a {type(spec).__name__}")
    if "_target_" not in spec:
        return
    trusted = _trusted_targets | set(_dotted_names(trusted_targets))
    for target in spec_targets(spec):
        if not isinstance(target, str) or target not in trusted:
            raise KDLightError(
                f"{source} records a model built by {target!s}: kdlight builds a model from a "
                "file only as a registered kdlight model or with a _target_ you gave or "
                f"trust; if you trust the file, allow it with trusted_targets=[{target}] "
                "(kdlight-train's setting, or load_model's and load_teacher's keyword argument)"
            )
    interpolation = _interpolation(spec)
    if interpolation is not None:
        raise KDLightError(
            f"{source} records a model spec with the interpolation {interpolation!r}, which "
            "kdlight does not resolve from a file"
        )


def _interpolation(tree) -> str | None:
    """The first string of ``tree`` (keys and values) that OmegaConf would resolve."""
    if isinstance(tree, str):
        return tree if "${" in tree else None
    if isinstance(tree, Mapping):
        tree = [*tree.keys(), *tree.values()]
    if not isinstance(tree, list | tuple):
        return None
    return next((found for item in tree if (found := _interpolation(item))), None)


def build_recorded_model(
    spec: Mapping, source: str, trusted_targets: Iterable[str] = ()
) -> nn.Module:
    """:func:`build_model` for a spec read from ``source`` (a checkpoint's
    ``kdlight.model_spec``), once :func:`check_recorded_spec` has found nothing in it that
    the user did not choose."""
    check_recorded_spec(spec, source, trusted_targets)
    return build_model(spec)


def spec_name(spec: Mapping | None, model: nn.Module | None = None) -> str:
    """A model's name for folders and reports: its registered name, else its class's."""
    spec = spec or {}
    if spec.get("name"):
        return str(spec["name"])
    if spec.get("_target_"):
        return str(spec["_target_"]).rsplit(".", 1)[-1]
    return type(model).__name__ if model is not None else "model"
