"""Physically removing channels: the one seam over torch-pruning's dependency graph.

torch-pruning (DepGraph, Fang et al., 2023) traces a network and finds which layers must lose the
same channels together (a conv, its BatchNorm, the next layer's inputs, residual branches,
depthwise convs, concatenations). :class:`~lightning_compress.pruning.ChannelPruning` uses it only
through this module.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3))
    >>> graph = trace_dependencies(net, torch.randn(1, 3, 8, 8))
    >>> groups = prunable_groups(graph, ignored=[net[2]])
    >>> list(groups)
    ['0']
    >>> remove_channels(graph, {"0": [0, 1, 2]})
    >>> net[0].out_channels, net[1].num_features, net[2].in_channels
    (5, 5, 5)
    >>> graph.pruning_history()
    [['0', True, [0, 1, 2]]]
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_compress.core.accounting import eval_mode

History = list[list[Any]]
"""torch-pruning's pruning history: ``[root module name, is output-channel pruning, indices]`` per removal."""


def _call(network: nn.Module, example_input: Any) -> Any:
    return network(*example_input) if isinstance(example_input, tuple) else network(example_input)


@contextlib.contextmanager
def _innermost_module(network: nn.Module) -> Iterator[list[str]]:
    """Track the stack of modules running their forward, to name the one where an error happened."""
    stack: list[str] = []

    def enter(name: str) -> Any:
        return lambda module, args: stack.append(name)  # append returns None: the input is unchanged

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for name, module in network.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def trace_dependencies(network: nn.Module, example_input: Any) -> tp.DependencyGraph:
    """Trace ``network`` (in eval mode, gradients on) and build its channel dependency graph.

    ``example_input`` is a tensor or a tuple of ``forward``'s positional arguments; a batch of one is
    enough. Raises ``ValueError`` naming the module (and its type) running when tracing fails.

    Example:
        >>> len(trace_dependencies(nn.Linear(3, 2), torch.randn(1, 3)).module2node) > 0
        True
    """
    with _innermost_module(network) as stack, eval_mode(network), torch.enable_grad():
        try:
            return tp.DependencyGraph().build_dependency(
                network, example_inputs=example_input, forward_fn=lambda m, x: _call(m, x), verbose=False
            )
        except Exception as error:  # noqa: BLE001 -- any failure of the trace is reported the same way
            where = stack[-1] if stack else ""
            kind = type(network.get_submodule(where)).__name__
            raise ValueError(
                f"channel pruning cannot trace the network: {type(error).__name__}: {error} "
                f"(in module {where or '<network>'!r} of type {kind})"
            ) from error


def prunable_groups(graph: tp.DependencyGraph, ignored: Iterable[nn.Module]) -> dict[str, tp.Group]:
    """The coupled channel groups whose output channels may be removed, by root layer name.

    A group is left out when it removes output channels of a module in ``ignored`` (the classifier,
    user-excluded layers) or channels of the network's output, which keeps its shape.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> list(prunable_groups(trace_dependencies(net, torch.randn(1, 3)), ignored=[net[2]]))
        ['0']
        >>> list(prunable_groups(trace_dependencies(net, torch.randn(1, 3)), ignored=[]))  # net[2] makes the output
        ['0']
    """
    names = {module: name for name, module in graph.model.named_modules()}
    groups = graph.get_all_groups(ignored_layers=list(ignored), root_module_types=(nn.modules.conv._ConvNd, nn.Linear))
    outputs = {node for node in graph.module2node.values() if not node.outputs}
    return {names[group[0].dep.target.module]: group for group in groups
            if not any(dep.target in outputs and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group)}


def group_channels(group: tp.Group) -> int:
    """Number of channels of a group's root layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> group_channels(prunable_groups(trace_dependencies(net, torch.randn(1, 3)), [net[1]])["0"])
        4
    """
    return len(group[0].idxs)


_RESHAPES = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten)


class _ChannelSplitWatch(TorchFunctionMode):
    """Record reshapes that split the channel dim of an ``(N, C, H, W)`` tensor into ``(N, G, C/G, H, W)``."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.found: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (func in _RESHAPES and isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)
                and source.dim() == 4 and out.dim() == 5 and out.shape[0] == source.shape[0]
                and min(out.shape[1], out.shape[2]) > 1 and out.shape[1] * out.shape[2] == source.shape[1]):
            self.found.setdefault(self.stack[-1] if self.stack else "", (tuple(source.shape), tuple(out.shape)))
        return out


def channel_splits(network: nn.Module, example_input: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Modules whose forward splits the channel dimension into groups, as a channel shuffle does.

    The dependency graph cannot follow ShuffleNet's ``(N, C, H, W) -> (N, G, C/G, H, W)`` permutation,
    so such networks are refused before training. Returns ``{module name: (input shape, grouped
    shape)}``, ``""`` naming the network's own forward.

    Example:
        >>> class Shuffle(nn.Module):
        ...     def forward(self, x):
        ...         n, c, h, w = x.shape
        ...         return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        >>> channel_splits(nn.Sequential(nn.Conv2d(3, 4, 1), Shuffle()), torch.randn(1, 3, 2, 2))
        {'1': ((1, 4, 2, 2), (1, 2, 2, 2, 2))}
    """
    with _innermost_module(network) as stack, eval_mode(network), torch.no_grad():
        watch = _ChannelSplitWatch(stack)
        with watch:
            _call(network, example_input)
    return watch.found


def ignore_patterns(names: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """Short ``ignore`` globs that match every one of ``names`` and no other of ``candidates``.

    Each name becomes ``*.<shortest dotted suffix>`` (two parts at least) matching no other candidate.

    Example:
        >>> ignore_patterns(["s1.b0.f.b", "s2.b0.f.b"], ["s1.b0.f.a", "s1.b0.f.b", "s2.b0.f.b", "s2.proj"])
        ['*.f.b']
    """
    allowed = set(names)
    patterns: list[str] = []
    for name in names:
        parts = name.split(".")
        for size in range(min(2, len(parts)), len(parts) + 1):
            pattern = "*." + ".".join(parts[-size:])
            hits = [c for c in candidates if fnmatch.fnmatchcase("x." + c, pattern)]
            if set(hits) <= allowed:
                break
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def check_prunable(network: nn.Module, example_input: Any, ignored_names: Sequence[str]) -> list[str]:
    """Remove one channel from every group of a *copy* of ``network`` and run it, to fail before training.

    Args:
        network: The network (left unchanged).
        example_input: As for :func:`trace_dependencies`.
        ignored_names: Modules (relative to ``network``) whose output channels must stay.

    Returns:
        The root names of the prunable groups.

    Raises:
        ValueError: If the network shuffles channels (:func:`channel_splits`), tracing fails, no group
            can be pruned, or the slimmed copy fails to run (naming the ``ignore`` list that avoids it).

    Example:
        >>> check_prunable(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), torch.randn(1, 3), ["1"])
        ['0']
    """
    splits = channel_splits(network, example_input)
    if splits:
        name, (source, grouped) = next(iter(splits.items()))
        raise ValueError(
            f"channel pruning cannot slim this network: module {name or '<network>'!r} "
            f"({type(network.get_submodule(name)).__name__}) views its {source} activation as {grouped}, "
            f"a channel shuffle between groups ({len(splits)} module(s) do: {list(splits)[:3]}), which moves "
            "channels across coupled layers in a way the dependency graph cannot follow. Channel-shuffle "
            "networks (ShuffleNet) cannot be channel-pruned; use MagnitudePruning(pattern='channel') to zero "
            "whole filters instead."
        )
    clone = copy.deepcopy(network)
    graph = trace_dependencies(clone, example_input)
    groups = prunable_groups(graph, [clone.get_submodule(name) for name in ignored_names])
    if not groups:
        raise ValueError(f"no channel of the network can be removed: every coupled group contains one of "
                         f"the left-alone layers {list(ignored_names)}")
    broken: dict[str, tuple[str, Exception]] = {}
    for name, group in groups.items():
        if group_channels(group) < 2:
            continue
        remove_channels(graph, {name: [0]})
        try:
            with eval_mode(clone), torch.no_grad():
                _call(clone, example_input)
        except Exception as error:  # noqa: BLE001 -- report any failure of the slimmed network
            broken[name] = (type(clone.get_submodule(name)).__name__, error)
            clone = copy.deepcopy(network)  # go on from an intact copy, to name every group that breaks
            graph = trace_dependencies(clone, example_input)
    if broken:
        (name, (kind, error)), others = next(iter(broken.items())), list(broken)[1:]
        raise ValueError(
            f"channel pruning cannot slim the network: removing a channel of {name!r} ({kind}) and its coupled "
            f"layers breaks the forward pass with {type(error).__name__}: {error}"
            + (f"; so does removing a channel of {len(others)} other group(s) ({others[:2]}...)" if len(others) > 2
               else f"; so does removing a channel of {others}" if others else "")
            + ". An operation hard-codes a channel count (e.g. a fixed reshape, a grouped convolution); leave "
            f"{'these layers' if others else 'the layer'} alone with ignore={ignore_patterns(list(broken), list(groups))} "
            "(their coupled layers keep their channels too) or rewrite the operation."
        ) from error
    return list(groups)


@contextlib.contextmanager
def _tracking_indices(network: nn.Module) -> Iterator[dict[str, tuple[nn.Parameter, torch.Tensor | None, torch.dtype]]]:
    """Make every parameter float64 with its flat indices as ``.grad``, which torch-pruning slices with it."""
    before: dict[str, tuple[nn.Parameter, torch.Tensor | None, torch.dtype]] = {}
    for name, param in network.named_parameters():
        before[name] = (param, param.grad, param.dtype)
        param.grad = None
        param.data = param.data.double()
        param.grad = torch.arange(param.numel(), device=param.device, dtype=torch.float64).view_as(param)
    yield before


def remove_channels(
    graph: tp.DependencyGraph,
    plan: Mapping[str, Sequence[int]],
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> None:
    """Remove the planned channels (``{root layer name: current channel indices}``) in place.

    Optimizers keep their identity (LR schedulers keep working): slimmed parameters replace the old
    ones in their param groups and per-element state (momentum, Adam moments) is sliced to the kept
    elements.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> net(torch.randn(2, 3)).sum().backward(); sgd.step()
        >>> remove_channels(trace_dependencies(net, torch.randn(1, 3)), {"0": [1]}, [sgd])
        >>> [tuple(p.shape) for p in sgd.param_groups[0]["params"]]
        [(3, 3), (3,), (2, 3), (2,)]
        >>> sgd.state[net[0].weight]["momentum_buffer"].shape
        torch.Size([3, 3])
    """
    network = graph.model
    with _tracking_indices(network) as before:
        for name, idxs in plan.items():
            if len(idxs):
                root = network.get_submodule(name)
                pruner = graph.get_pruner_of_module(root)
                graph.get_pruning_group(root, pruner.prune_out_channels, sorted(int(i) for i in idxs)).prune()
        after = dict(network.named_parameters())
        replaced: dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor]] = {}
        for name, (old, grad, dtype) in before.items():
            new = after[name]
            kept = new.grad.flatten().long()
            new.grad = None
            new.data = new.data.to(dtype)
            if new is old:
                old.grad = grad
                continue
            old.data = old.data.to(dtype)
            new.grad = grad.flatten()[kept].view_as(new) if grad is not None else None
            replaced[old] = (new, kept)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [replaced.get(p, (p, None))[0] for p in group["params"]]
        for old, (new, kept) in replaced.items():
            if old not in optimizer.state:
                continue
            state = optimizer.state.pop(old)
            optimizer.state[new] = {
                key: value.flatten()[kept].view_as(new)
                if isinstance(value, torch.Tensor) and value.shape == old.shape else value
                for key, value in state.items()
            }


def replay_history(network: nn.Module, example_input: Any, history: History) -> tp.DependencyGraph:
    """Slim a freshly built ``network`` in place to the architecture a ``graph.pruning_history()`` produced.

    Its weights are meaningless until a state dict of the slimmed model is loaded. Returns the graph.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> _ = replay_history(net, torch.randn(1, 3), [["0", True, [0, 2]]])
        >>> net[0].out_features, net[1].in_features
        (2, 2)
    """
    graph = trace_dependencies(network, example_input)
    graph.load_pruning_history([list(entry) for entry in history])
    return graph
