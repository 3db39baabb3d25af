"""The model registry: models are made by name, with overrides of their own defaults."""

from __future__ import annotations

import inspect
import math
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


def model_summary(name: str) -> str:
    """What a model is: its docstring's first line, up to a colon."""
    return (inspect.getdoc(_get(name)) or "").split("\n")[0].split(": ")[0].rstrip(".")


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def model_defaults(name: str) -> dict[str, Any]:
    """A model's arguments and their defaults (num_classes excluded: it comes from the dataset)."""
    factory = _get(name)
    parameters = inspect.signature(factory).parameters
    return {k: p.default for k, p in parameters.items() if k != "num_classes" and p.default is not inspect.Parameter.empty}


# Integer arguments are sizes (at least 1) except these counts, where 0 means none (or, for stride, the patch).
MAY_BE_ZERO = ("depth", "depth2", "blocks", "stride")
LARGEST_INT = 2**31 - 1
RATES = ("dropout", "drop_path")  # probabilities of dropping: 0 to below 1
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def resolve_model_args(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults merged with overrides; None-valued overrides are dropped so the model keeps its default.

    Values given as text (the command line) are converted to the default's type; every value is then
    checked: a bool is a bool, an integer is a whole number in range, a float is finite (a rate in [0, 1)).
    """
    args = model_defaults(name)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in args:
            raise KmnistError(f"model {name!r} has no argument {key!r}; it takes {', '.join(args) or 'none'}")
        args[key] = _checked(key, args[key], value)
    return args


def _checked(key: str, default: Any, value: Any) -> Any:
    """value as the type of default, in its range; KmnistError otherwise."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in TRUE + FALSE:
            value = value.lower() in TRUE
        elif isinstance(value, int) and value in (0, 1):  # `residual=0` reaches here as the number 0
            value = bool(value)
        if not isinstance(value, bool):
            raise KmnistError(f"model argument {key} must be true or false, got {value!r}")
    elif isinstance(default, int):
        value = _parsed(key, value, int, "a whole number")
        minimum = 0 if key in MAY_BE_ZERO else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise KmnistError(f"model argument {key} must be a whole number of at least {minimum}, got {value!r}")
        if value > LARGEST_INT:  # torch takes sizes as C integers
            raise KmnistError(f"model argument {key} must be a whole number of at most {LARGEST_INT}, got {value}")
    elif isinstance(default, float):
        value = _parsed(key, value, float, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(_as_float(value)):
            raise KmnistError(f"model argument {key} must be a finite number, got {value!r}")
        value = float(value)
        if key in RATES and not 0 <= value < 1:
            raise KmnistError(f"model argument {key} is a rate: at least 0 and below 1, got {value}")
    return value


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        return math.inf


def _parsed(key: str, value: Any, kind: type, what: str) -> Any:
    """Text converted to kind (other values as they are); KmnistError naming the argument otherwise."""
    if not isinstance(value, str):
        return value
    try:
        return kind(value)
    except ValueError:
        raise KmnistError(f"model argument {key} must be {what}, got {value!r}") from None


def create_model(name: str, num_classes: int = 10, **overrides: Any) -> nn.Module:
    """Build a registered model by name."""
    args = resolve_model_args(name, overrides)
    try:
        model = _get(name)(num_classes=num_classes, **args)
    except ValueError as error:  # models reject impossible shapes (e.g. a patch that does not divide 28)
        raise KmnistError(f"model {name}: {error}") from None
    except RuntimeError as error:  # e.g. too large to allocate
        raise KmnistError(f"model {name} cannot be built with {args}: {str(error).splitlines()[0]}") from None
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
