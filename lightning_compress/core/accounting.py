"""How much: parameters, non-zeros, MACs, serialized size and latency of a model.

The one definition every callback, the report and the benchmarks use. Pure functions that leave the
module's mode and buffers as they were. MACs count convolutions and matrix products only.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

Inputs = Any
"""A tensor, or a tuple of positional arguments, passed to the module's ``forward``."""


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, shared ones once; only ``requires_grad`` ones if ``trainable_only``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class Count:
    """Non-zero (not exactly zero) and total elements of one tensor or of a whole model."""

    nonzero: int
    total: int

    @property
    def sparsity(self) -> float:
        """Fraction of zero elements (0 for an empty count)."""
        return 1.0 - self.nonzero / self.total if self.total else 0.0


@dataclass(frozen=True)
class NonzeroCounts:
    """Result of :func:`count_nonzero`: the total and each parameter's count by qualified name."""

    total: Count
    per_parameter: dict[str, Count]


def count_nonzero(module: nn.Module) -> NonzeroCounts:
    """Count the non-zero elements of every parameter of ``module`` and of all of them.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        >>> counts = count_nonzero(layer)
        >>> counts.per_parameter["weight"], counts.total.total
        (Count(nonzero=1, total=4), 6)
    """
    per_parameter = {
        name: Count(nonzero=int(torch.count_nonzero(p.detach())), total=p.numel())
        for name, p in module.named_parameters()
    }
    total = Count(
        nonzero=sum(c.nonzero for c in per_parameter.values()),
        total=sum(c.total for c in per_parameter.values()),
    )
    return NonzeroCounts(total=total, per_parameter=per_parameter)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, then restore every submodule's mode.

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _call(module: nn.Module, example_input: Inputs) -> Any:
    if isinstance(example_input, tuple):
        return module(*example_input)
    return module(example_input)


def _flop_counts(module: nn.Module, example_input: Inputs) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, depth=None)
    # observers (quantization ranges) update even in eval mode: counting must leave every buffer as it was
    buffers = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        with eval_mode(module), torch.no_grad(), counter:
            _call(module, example_input)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return counter


def count_macs(module: nn.Module, example_input: Inputs) -> int:
    """Multiply-accumulates (``FLOPs / 2``) of one eval-mode forward pass on ``example_input``.

    ``example_input`` is a tensor or a tuple of ``forward``'s arguments; use a batch of one per image.

    Example:
        >>> # Conv2d: Cout * Cin * k * k * Hout * Wout = 8 * 3 * 3 * 3 * 8 * 8
        >>> count_macs(nn.Conv2d(3, 8, 3, bias=False), torch.randn(1, 3, 10, 10))
        13824
    """
    return _flop_counts(module, example_input).get_total_flops() // 2


def count_macs_per_module(module: nn.Module, example_input: Inputs) -> dict[str, int]:
    """MACs of one forward pass by submodule name; containers sum their children, the root is ``""``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Flatten(), nn.Linear(8 * 8 * 8, 2))
        >>> sorted(count_macs_per_module(net, torch.randn(1, 3, 10, 10)).items())
        [('', 14848), ('0', 13824), ('2', 1024)]
    """
    counts = _flop_counts(module, example_input).get_flop_counts()
    root = type(module).__name__
    result: dict[str, int] = {}
    for key, per_op in counts.items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else key
        result[name] = sum(per_op.values()) // 2
    return result


def serialized_size(obj: Any) -> int:
    """Bytes that ``torch.save`` writes for ``obj``; a module is saved as its ``state_dict``."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def measure_latency(module: nn.Module, example_input: Inputs, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of one forward pass in eval and inference mode (CUDA synchronized).

    ``repeats`` (>= 1) passes are timed after ``warmup`` (>= 0) untimed ones. To compare two models,
    alternate calls in one process so both see the same machine load.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    with eval_mode(module), torch.inference_mode():
        for _ in range(warmup):
            _call(module, example_input)
        for _ in range(repeats):
            sync()
            begin = time.perf_counter()
            _call(module, example_input)
            sync()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)
