"""The optimizers' parameter order, saved by name, so that a resumed fit gives saved state to the right tensors.

``torch.optim.Optimizer.load_state_dict`` matches saved state to parameters by position. A replayed
architecture record may register the same parameters in another module order (QAT preparation traces
the network into a ``GraphModule``), so ``configure_optimizers`` on the resumed module lists them in
another order and momentum would land on the wrong tensors. Compression callbacks save the order by
qualified name in every checkpoint and put it back when training resumes.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> saved = parameter_order([sgd], net)
    >>> resumed = torch.optim.SGD(reversed(list(net.parameters())), lr=0.1)
    >>> restore_parameter_order([resumed], net, saved)
    >>> parameter_order([resumed], net) == saved
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ORDER_KEY = "compression_optimizer_order"
"""Top-level checkpoint key: per optimizer, per parameter group, the parameters' qualified names."""


def parameter_order(optimizers: Sequence[torch.optim.Optimizer], module: nn.Module) -> list[list[list[str | None]]]:
    """The qualified name of every parameter in every group of ``optimizers``, in order.

    Args:
        optimizers: The trainer's optimizers.
        module: The LightningModule that owns the parameters.

    Returns:
        ``[optimizer][group][position] -> name`` (``None`` for a tensor ``module`` does not own).
    """
    names = {id(param): name for name, param in module.named_parameters()}
    return [[[names.get(id(param)) for param in group["params"]] for group in optimizer.param_groups]
            for optimizer in optimizers]


def restore_parameter_order(optimizers: Sequence[torch.optim.Optimizer], module: nn.Module,
                            saved: Sequence[Sequence[Sequence[str | None]]]) -> None:
    """Reorder each group to the ``saved`` order, moving the state torch loaded by position along with it.

    Groups that do not hold the same parameters as the saved ones are left as they are.

    Args:
        optimizers: The trainer's optimizers, right after their state was loaded.
        module: The LightningModule that owns the parameters.
        saved: What :func:`parameter_order` returned when the checkpoint was written.
    """
    params = dict(module.named_parameters())
    for optimizer, saved_groups in zip(optimizers, saved):
        if len(saved_groups) != len(optimizer.param_groups):
            continue
        for group, names in zip(optimizer.param_groups, saved_groups):
            current = group["params"]
            if len(names) != len(current) or not all(name in params for name in names):
                continue
            wanted = [params[name] for name in names]
            if {id(p) for p in wanted} != {id(p) for p in current} or all(a is b for a, b in zip(wanted, current)):
                continue
            loaded = [optimizer.state.pop(param, None) for param in current]  # torch matched them by position
            group["params"] = wanted
            for param, state in zip(wanted, loaded):
                if state is not None:
                    optimizer.state[param] = state
