"""Factorized blocks: the ``nn.Sequential`` of thinner layers that replaces a dense Conv2d/Linear, and its MACs.

Blocks hold only ordinary ``Conv2d``/``Linear`` layers, so FX quantization, ONNX export and a plain
``load_state_dict`` see nothing new. Stride, padding and dilation are split between the factors and
the bias goes on the last one, so a block at full rank computes what the dense layer did.

Example:
    >>> conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    >>> block = factorize_layer(conv, "tucker2", rank=16)
    >>> x = torch.randn(1, 8, 10, 10)
    >>> bool(torch.allclose(block(x), conv(x), atol=1e-5))
    True
    >>> [type(m).__name__ for m in block]
    ['Conv2d', 'Conv2d', 'Conv2d']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.core.accounting import eval_mode
from lightning_compress.factorization.decompositions import decompose, full_rank

KXK_METHODS = ("tucker2", "spatial", "depthwise_separable")
"""Methods for convolutions with a kernel larger than 1x1 (``Linear`` and 1x1 convolutions always use ``svd``)."""

FACTORIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
"""Layer types that can be factorized (grouped convolutions excepted, see :func:`is_factorizable`)."""


def is_factorizable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``Linear`` or an ungrouped ``Conv2d``, which :func:`factorize_layer` accepts.

    Example:
        >>> is_factorizable(nn.Conv2d(4, 4, 3)), is_factorizable(nn.Conv2d(4, 4, 3, groups=4))
        (True, False)
    """
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


def _pointwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1)


def layer_method(layer: nn.Module, kxk_method: str) -> str:
    """The decomposition a layer gets: ``svd`` for ``Linear`` and 1x1 convolutions, ``kxk_method`` otherwise.

    Example:
        >>> layer_method(nn.Conv2d(4, 4, 1), "spatial"), layer_method(nn.Conv2d(4, 4, 3), "spatial")
        ('svd', 'spatial')
    """
    return "svd" if _pointwise(layer) else kxk_method


def max_rank(layer: nn.Module, method: str) -> int:
    """The rank at which ``method`` (from :func:`layer_method`) reproduces ``layer`` exactly."""
    return full_rank(method, layer.weight.shape)


def _conv(in_channels: int, out_channels: int, kernel: Sequence[int], like: nn.Conv2d, bias: bool, *,
          stride: Sequence[int] = (1, 1), padding: Sequence[int] | str = (0, 0), dilation: Sequence[int] = (1, 1),
          groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, tuple(kernel), stride=tuple(stride),
                     padding=padding if isinstance(padding, str) else tuple(padding), dilation=tuple(dilation),
                     groups=groups, bias=bias, padding_mode=like.padding_mode,
                     device=like.weight.device, dtype=like.weight.dtype)


def _split(padding: tuple[int, int] | str, axis: int) -> tuple[int, int] | str:
    """Padding along one spatial axis only (a string padding mode applies per axis by itself)."""
    if isinstance(padding, str):
        return padding
    return (padding[0], 0) if axis == 0 else (0, padding[1])


def factorized_structure(layer: nn.Module, method: str, rank: int) -> nn.Sequential:
    """The block that replaces ``layer``, with fresh weights (what a replay builds), on its device and dtype.

    ``method`` is :func:`layer_method`'s for the layer and ``rank`` in ``[1, max_rank(layer, method)]``;
    a layer, method or rank that does not fit raises ``ValueError``.

    Example:
        >>> [tuple(m.weight.shape) for m in factorized_structure(nn.Linear(8, 4), "svd", 2)]
        [(2, 8), (4, 2)]
    """
    if not is_factorizable(layer):
        raise ValueError(f"only Linear and ungrouped Conv2d layers can be factorized, got {layer}")
    if method not in ("svd", *KXK_METHODS) or (method == "svd") != _pointwise(layer):
        raise ValueError(f"method {method!r} does not fit {layer}: Linear and 1x1 convolutions take 'svd', "
                         f"larger kernels one of {KXK_METHODS}")
    limit = max_rank(layer, method)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an integer in [1, {limit}] for {method} of {layer}, got {rank!r}")
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False, **kw),
                             nn.Linear(rank, layer.out_features, bias=bias, **kw))
    c_in, c_out, (kh, kw) = layer.in_channels, layer.out_channels, layer.kernel_size
    stride, padding, dilation = layer.stride, layer.padding, layer.dilation
    if method == "svd":
        return nn.Sequential(_conv(c_in, rank, (1, 1), layer, False, stride=stride, padding=padding),
                             _conv(rank, c_out, (1, 1), layer, bias))
    if method == "tucker2":
        r_out, r_in = min(rank, c_out), min(rank, c_in)
        return nn.Sequential(_conv(c_in, r_in, (1, 1), layer, False),
                             _conv(r_in, r_out, (kh, kw), layer, False, stride=stride, padding=padding,
                                   dilation=dilation),
                             _conv(r_out, c_out, (1, 1), layer, bias))
    if method == "spatial":
        return nn.Sequential(_conv(c_in, rank, (kh, 1), layer, False, stride=(stride[0], 1),
                                   padding=_split(padding, 0), dilation=(dilation[0], 1)),
                             _conv(rank, c_out, (1, kw), layer, bias, stride=(1, stride[1]),
                                   padding=_split(padding, 1), dilation=(1, dilation[1])))
    return nn.Sequential(_conv(c_in, c_in * rank, (kh, kw), layer, False, stride=stride, padding=padding,
                               dilation=dilation, groups=c_in),
                         _conv(c_in * rank, c_out, (1, 1), layer, bias))


@torch.no_grad()
def factorize_layer(layer: nn.Module, method: str, rank: int) -> nn.Sequential:
    """The block that replaces ``layer``, initialized from its weights (exact at full rank).

    Arguments as for :func:`factorized_structure`; the block keeps the layer's training mode and
    ``requires_grad``.

    Example:
        >>> linear = nn.Linear(6, 5)
        >>> x = torch.randn(3, 6)
        >>> bool(torch.allclose(factorize_layer(linear, "svd", 5)(x), linear(x), atol=1e-5))
        True
    """
    block = factorized_structure(layer, method, rank)
    for module, factor in zip(block, decompose(method, layer.weight, rank)):
        module.weight.copy_(factor.reshape(module.weight.shape))
    if layer.bias is not None:
        block[-1].bias.copy_(layer.bias)
    if layer.weight.ndim == 4 and layer.weight.is_contiguous(memory_format=torch.channels_last):
        block = block.to(memory_format=torch.channels_last)
    return block.train(layer.training).requires_grad_(layer.weight.requires_grad)


@dataclass(frozen=True)
class Geometry:
    """What a layer's MACs depend on, per sample: the ``(H, W)`` of a convolution's input and output.

    For a ``Linear`` both are ``(rows, 1)``, rows being the input vectors per sample.
    """

    input_size: tuple[int, int]
    output_size: tuple[int, int]


def layer_geometries(network: nn.Module, names: Sequence[str], example: tuple[Any, ...]) -> dict[str, Geometry]:
    """Each named layer's :class:`Geometry`, from one eval-mode forward pass of ``network`` on ``example``.

    ``names`` are relative to ``network``; a layer not called exactly once per forward raises
    ``ValueError`` naming the calls.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(16, 2))
        >>> layer_geometries(net, ["0", "2"], (torch.randn(1, 3, 5, 5),))["0"]
        Geometry(input_size=(5, 5), output_size=(2, 2))
    """
    found: dict[str, list[Geometry]] = {name: [] for name in names}

    def recorder(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            if isinstance(module, nn.Linear):
                rows = x.numel() // x.shape[-1]
                found[name].append(Geometry((rows, 1), (rows, 1)))
            else:
                found[name].append(Geometry(tuple(x.shape[-2:]), tuple(output.shape[-2:])))
        return record

    handles = [network.get_submodule(name).register_forward_hook(recorder(name)) for name in names]
    try:
        with eval_mode(network), torch.no_grad():
            network(*example)
    finally:
        for handle in handles:
            handle.remove()
    wrong = {name: len(calls) for name, calls in found.items() if len(calls) != 1}
    if wrong:
        raise ValueError(f"only layers called once per forward pass can be factorized; calls: {wrong}; leave them "
                         "out with exclude=[...]")
    return {name: calls[0] for name, calls in found.items()}


def block_macs(layer: nn.Module, method: str | None, rank: int | None, geometry: Geometry) -> int:
    """MACs of one sample through ``layer`` (``method=None``) or its factorized block at ``rank``.

    Counted as :func:`lightning_compress.core.accounting.count_macs` counts (biases not counted).

    Example:
        >>> conv, where = nn.Conv2d(16, 16, 3, padding=1), Geometry((8, 8), (8, 8))
        >>> block_macs(conv, None, None, where), block_macs(conv, "tucker2", 8, where)
        (147456, 53248)
    """
    (h_in, w_in), (h_out, w_out) = geometry.input_size, geometry.output_size
    out_pixels = h_out * w_out
    if isinstance(layer, nn.Linear):
        c_in, c_out, kh, kw = layer.in_features, layer.out_features, 1, 1
    else:
        c_in, c_out, (kh, kw) = layer.in_channels, layer.out_channels, layer.kernel_size
    if method is None:
        return c_out * (c_in // getattr(layer, "groups", 1)) * kh * kw * out_pixels
    if method == "svd":
        return rank * (c_in + c_out) * out_pixels
    if method == "tucker2":
        r_out, r_in = min(rank, c_out), min(rank, c_in)
        return r_in * c_in * h_in * w_in + (r_out * r_in * kh * kw + c_out * r_out) * out_pixels
    if method == "spatial":  # the vertical factor keeps the input's full width (it pads and strides vertically)
        return rank * c_in * kh * h_out * w_in + c_out * rank * kw * out_pixels
    return c_in * rank * (kh * kw + c_out) * out_pixels
