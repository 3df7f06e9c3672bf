"""Optimizers after a layer was replaced: new parameters take the old ones' places, the schedule goes on.

The optimizers are edited in place, since Lightning, LR schedulers and precision plugins hold on to them.

Example:
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
    """Put each ``{old: [new, ...]}`` replacement in the old parameter's group and place; drop its state.

    Replacements of a parameter no optimizer holds (frozen) stay out of every optimizer.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [new for param in group["params"] for new in replacements.get(param, [param])]
        for old in replacements:
            optimizer.state.pop(old, None)
