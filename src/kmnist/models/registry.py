"""The model registry: models are made by name, with overrides of their own defaults."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from kmnist.errors import KmnistError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model class or factory under `name`."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_defaults(name: str) -> dict[str, Any]:
    """A model's arguments and their defaults (num_classes excluded: it comes from the dataset)."""
    factory = _get(name)
    parameters = inspect.signature(factory).parameters
    return {k: p.default for k, p in parameters.items() if k != "num_classes" and p.default is not inspect.Parameter.empty}


def resolve_model_args(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults merged with overrides; None-valued overrides are dropped so the model keeps its default."""
    args = model_defaults(name)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in args:
            raise KmnistError(f"model {name!r} has no argument {key!r}; it takes {', '.join(args) or 'none'}")
        default = args[key]
        if isinstance(default, bool) and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
            try:
                value = type(default)(value)
            except ValueError:
                raise KmnistError(f"model argument {key} must be a number, got {value!r}") from None
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        args[key] = value
    return args


def create_model(name: str, num_classes: int = 10, **overrides: Any) -> nn.Module:
    """Build a registered model by name."""
    args = resolve_model_args(name, overrides)
    try:
        model = _get(name)(num_classes=num_classes, **args)
    except ValueError as error:  # models reject impossible shapes (e.g. a patch that does not divide 28)
        raise KmnistError(f"model {name}: {error}") from None
    if any(isinstance(module, nn.Conv2d) for module in model.modules()):
        # Convolution weights stored channels-last make oneDNN (CPU) and cuDNN pick their NHWC kernels,
        # and each activation follows: 1.7x faster training steps for resnet-small in bf16 on 2 CPU
        # cores (docs/benchmarks.md). The values, state_dict and ONNX export are unchanged.
        model = model.to(memory_format=torch.channels_last)
    return model


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise KmnistError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _MODELS[name]
