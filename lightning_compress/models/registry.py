"""Models by name: the registry behind :func:`create_model` and :func:`list_models`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory under a new ``name``.

    The factory takes ``num_classes`` and its family's keyword arguments, and returns a fresh ``nn.Module``.

    Raises:
        ValueError: If ``name`` is empty or taken, or the factory has no ``num_classes`` parameter.

    Example:
        >>> @register_model("doctest_tiny")
        ... def tiny(num_classes: int = 10) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
        >>> create_model("doctest_tiny", num_classes=3)[1].out_features
        3
        >>> _ = _REGISTRY.pop("doctest_tiny")  # keep the registry clean for other doctests
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__qualname__}")
        if "num_classes" not in inspect.signature(factory).parameters:
            raise ValueError(f"model factory {factory.__qualname__} must accept a `num_classes` argument")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted: those :func:`create_model` accepts."""
    return sorted(_REGISTRY)


def create_model(name_or_module: str | nn.Module, num_classes: int = 10, **kwargs: object) -> nn.Module:
    """Build a registered model by name, or pass a user's ``nn.Module`` through unchanged.

    Args:
        name_or_module: A name from :func:`list_models`, or any ``nn.Module`` (``num_classes`` ignored).
        num_classes: Number of output classes of a named model; a positive integer.
        **kwargs: Family-specific arguments of a named model, e.g. ``width_mult`` for ``"mobilenetv2"``.

    Raises:
        ValueError: For an unknown name or argument (listing the known ones), a bad ``num_classes``,
            or keyword arguments given with an ``nn.Module``.

    Example:
        >>> create_model("mobilenetv2", num_classes=10, width_mult=0.5).classifier[-1].in_features
        1280
        >>> net = nn.Linear(4, 2)
        >>> create_model(net) is net
        True
    """
    if isinstance(name_or_module, nn.Module):
        if kwargs:
            raise ValueError(
                f"model arguments {sorted(kwargs)} only apply to a model given by name, "
                f"not to an nn.Module ({type(name_or_module).__name__}); configure the module yourself"
            )
        return name_or_module
    if not isinstance(name_or_module, str):
        raise ValueError(
            f"name_or_module must be a model name or an nn.Module, got {type(name_or_module).__name__}"
        )
    factory = _REGISTRY.get(name_or_module)
    if factory is None:
        close = difflib.get_close_matches(name_or_module, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name_or_module!r}; known models: {', '.join(list_models())}.{hint}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none besides num_classes"
        raise ValueError(
            f"model {name_or_module!r} got unexpected arguments {unknown}; it accepts: {allowed}"
        )
    return factory(num_classes=num_classes, **kwargs)
