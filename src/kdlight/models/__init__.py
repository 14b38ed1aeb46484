"""Architectures (plain ``nn.Module``s) and the ``create_model`` registry."""

from kdlight.models import cnn, resnet  # noqa: F401  (registers the models)
from kdlight.models.registry import count_parameters, create_model, list_models, register_model

__all__ = ["count_parameters", "create_model", "list_models", "register_model"]
