"""Architectures (plain ``nn.Module``s) and the ``create_model`` registry."""

from kdlight.models import (  # noqa: F401  (registers the models)
    cifar_resnet,
    cnn,
    mobilenetv2,
    resnet,
    shufflenet,
    vgg,
    wrn,
)
from kdlight.models.published import (
    PUBLISHED_MODELS,
    load_published,
    official_state_dict,
)
from kdlight.models.registry import (
    build_model,
    count_parameters,
    create_model,
    list_models,
    register_model,
)

__all__ = [
    "PUBLISHED_MODELS",
    "build_model",
    "count_parameters",
    "create_model",
    "list_models",
    "load_published",
    "official_state_dict",
    "register_model",
]
