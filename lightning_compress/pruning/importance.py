"""Which channels matter: criteria ``criterion(group) -> scores``, one score per channel of a group's root.

A group is a torch-pruning dependency group (the layers whose channels go together); scores are
summed over them and low scores are removed first. Built in: ``"l1"`` / ``"l2"`` filter norms (Li
et al., 2017), ``"bn_scale"`` (BatchNorm ``|gamma|``, Liu et al., 2017; L1 without BatchNorm) and
``"taylor"`` (``|w * dL/dw|`` from the last batch's gradients, Molchanov et al., 2019).

Example:
    >>> import torch, torch_pruning as tp
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 1, 1))
    >>> graph = tp.DependencyGraph().build_dependency(net, torch.randn(1, 3, 4, 4))
    >>> group = graph.get_pruning_group(net[0], tp.prune_conv_out_channels, [0, 1, 2, 3])
    >>> scores = resolve_importance("l1")(group)
    >>> scores.argsort()[:2].tolist()  # channel 0 (all-zero filter) is the least important
    [0, 1]
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch_pruning as tp

ChannelImportance = Callable[[tp.Group], torch.Tensor]
"""``criterion(group) -> scores``: one score per channel of the group's root layer."""

ImportanceLike = Union[str, ChannelImportance]
"""A criterion name from :data:`IMPORTANCE_CRITERIA` or a :data:`ChannelImportance`."""


class _WithFallback:
    """Score with ``primary``; use ``fallback`` where ``primary`` finds no layer."""

    def __init__(self, primary: ChannelImportance, fallback: ChannelImportance) -> None:
        self.primary, self.fallback = primary, fallback

    def __call__(self, group: tp.Group) -> torch.Tensor:
        scores = self.primary(group)
        return scores if isinstance(scores, torch.Tensor) and scores.numel() else self.fallback(group)


class _RequiresGradients:
    """A criterion that needs ``.grad`` on every weight of the group, failing clearly without."""

    def __init__(self, criterion: ChannelImportance, name: str) -> None:
        self.criterion, self.name = criterion, name

    def __call__(self, group: tp.Group) -> torch.Tensor:
        for dep, _ in group:
            weight = getattr(dep.target.module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.requires_grad and weight.grad is None:
                raise RuntimeError(
                    f"importance={self.name!r} needs gradients, but {type(dep.target.module).__name__} "
                    f"{dep.target.name} has none; channels are scored after a training step has run backward"
                )
        return self.criterion(group)


def _l1() -> ChannelImportance:
    return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)


IMPORTANCE_CRITERIA: dict[str, Callable[[], ChannelImportance]] = {
    "l1": _l1,
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
    "bn_scale": lambda: _WithFallback(tp.importance.BNScaleImportance(normalizer=None), _l1()),
    "taylor": lambda: _RequiresGradients(tp.importance.GroupTaylorImportance(normalizer=None), "taylor"),
}
"""Factories of the built-in criteria, by name."""


def resolve_importance(importance: ImportanceLike, name: str = "importance") -> ChannelImportance:
    """Turn a name from :data:`IMPORTANCE_CRITERIA` or a callable ``(group) -> scores`` into a criterion.

    Any ``torch_pruning.importance.Importance`` works. Raises ``ValueError`` (naming argument ``name``)
    for an unknown name or an object that is not callable.

    Example:
        >>> callable(resolve_importance("bn_scale"))
        True
    """
    if isinstance(importance, str):
        if importance not in IMPORTANCE_CRITERIA:
            raise ValueError(f"{name} must be one of {sorted(IMPORTANCE_CRITERIA)} or a callable "
                             f"(group) -> scores, got {importance!r}")
        return IMPORTANCE_CRITERIA[importance]()
    if not callable(importance):
        raise ValueError(f"{name} must be one of {sorted(IMPORTANCE_CRITERIA)} or a callable "
                         f"(group) -> scores, got {importance!r}")
    return importance
