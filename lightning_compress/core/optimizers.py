"""Optimizers after a layer was replaced: new parameters take the old ones' places, the schedule goes on.

When a callback swaps a layer for new ones (low-rank factorization turns one weight into two or
three), the optimizer must train the new parameters with the hyperparameters the old one had (its
param group: learning rate, weight decay, ...), and the LR scheduler must continue from the same
step. :func:`replace_parameters` edits the optimizers in place, so their identity -- which Lightning,
LR schedulers and precision plugins hold on to -- never changes. Per-parameter state (momentum, Adam
moments) of a replaced parameter has no meaning for its replacements and is dropped: they start
with fresh state.

Example:
    >>> import torch
    >>> from torch import nn
    >>> old, new = nn.Parameter(torch.ones(2)), [nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))]
    >>> sgd = torch.optim.SGD([{"params": [old], "weight_decay": 0.1}], lr=0.1, momentum=0.9)
    >>> sgd.state[old]["momentum_buffer"] = torch.zeros(2)
    >>> replace_parameters([sgd], {old: new})
    >>> [p.shape for p in sgd.param_groups[0]["params"]], sgd.param_groups[0]["weight_decay"], len(sgd.state)
    ([torch.Size([1]), torch.Size([1])], 0.1, 0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def replace_parameters(
    optimizers: Sequence[torch.optim.Optimizer], replacements: Mapping[torch.Tensor, Sequence[torch.Tensor]]
) -> None:
    """Put each replaced parameter's replacements in its param group, in its place, and drop its state.

    A replaced parameter that no optimizer holds (frozen) leaves its replacements out of every optimizer.

    Args:
        optimizers: The trainer's optimizers (``trainer.optimizers``).
        replacements: ``{old parameter: [new parameters]}``.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [new for param in group["params"] for new in replacements.get(param, [param])]
        for old in replacements:
            optimizer.state.pop(old, None)
