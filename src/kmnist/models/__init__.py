"""Model registry; importing this package registers every model."""

from kmnist.models import mixer, resnet  # noqa: F401  (registers models)
from kmnist.models.registry import (create_model, list_models, model_defaults, model_summary, parameter_count,
                                    register_model, resolve_model_args)

__all__ = ["create_model", "list_models", "model_defaults", "model_summary", "parameter_count", "register_model",
           "resolve_model_args"]
