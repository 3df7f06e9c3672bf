"""Which weights to prune: ``bool`` masks (``True`` = kept) computed from tensors by pure functions.

Functions take ``name -> tensor`` and return ``name -> mask``, never modifying their inputs. Exactly
``round(sparsity * numel)`` entries are pruned; ties are broken by position (later entries kept), so
the same tensors always give the same mask.

Example:
    >>> import torch
    >>> masks = global_magnitude_masks({"a": torch.tensor([1.0, -4.0]), "b": torch.tensor([3.0, 2.0])}, 0.5)
    >>> {name: mask.tolist() for name, mask in masks.items()}
    {'a': [False, True], 'b': [True, False]}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


_RADIX_MIN_NUMEL = 1 << 16
"""Below this size ``torch.kthvalue`` alone is as fast as the radix pass."""


def kth_smallest(scores: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest (1-based) of a 1-D tensor of non-negative scores, exactly, as a 0-d tensor.

    Large ``float32`` tensors take one histogram pass over the top 16 bits of their bit patterns (which
    order non-negative floats like their values), then ``kthvalue`` on the one bucket holding the answer.

    Example:
        >>> kth_smallest(torch.tensor([3.0, 0.0, 2.0, 5.0]), 3).item()
        3.0
    """
    if scores.dtype != torch.float32 or scores.numel() < _RADIX_MIN_NUMEL:
        return torch.kthvalue(scores, k).values
    high = scores.view(torch.int32) >> 16
    cumulative = torch.cumsum(torch.bincount(high, minlength=1 << 15), 0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor([k], device=scores.device)))
    below = int(cumulative[bucket - 1]) if bucket > 0 else 0
    inside = scores[high == bucket]
    if bucket == 0:  # zeros (often most of a pruned model) and denormals: do not select among many ties
        zeros = int((inside == 0).sum())
        if k <= zeros:
            return scores.new_zeros(())
        inside, below = inside[inside != 0], zeros
    return torch.kthvalue(inside, k - below).values


def smallest_k_mask(scores: Tensor, k: int) -> Tensor:
    """Mask out exactly the ``k`` smallest entries of 1-D non-negative scores (``k`` clipped to ``[0, n]``).

    Entries tied at the threshold are pruned from the front.

    Example:
        >>> smallest_k_mask(torch.tensor([3.0, 1.0, 1.0, 2.0]), 1).tolist()
        [True, False, True, True]
    """
    n = scores.numel()
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = kth_smallest(scores, k)
    keep = scores > threshold
    extra = n - k - int(keep.sum())  # entries tied with the threshold that must be kept after all
    if extra > 0:
        ties = torch.nonzero(scores == threshold).squeeze(1)
        keep[ties[-extra:]] = True
    return keep


def _check_sparsity(sparsity: float, name: str) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity for {name!r} must be in [0, 1], got {sparsity}")


def global_magnitude_masks(weights: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Prune the ``sparsity`` fraction (in ``[0, 1]``) of all entries together, smallest magnitude first.

    ``weights`` may be scores instead of weights (their absolute value is ranked), all on one device.

    Example:
        >>> masks = global_magnitude_masks({"w": torch.arange(10.0).view(2, 5)}, 0.3)
        >>> masks["w"].sum().item()
        7
    """
    _check_sparsity(sparsity, "global")
    flat = torch.cat([w.detach().reshape(-1).abs() for w in weights.values()])
    keep = smallest_k_mask(flat, round(sparsity * flat.numel()))
    return {name: part.view_as(w) for (name, w), part in
            zip(weights.items(), keep.split([w.numel() for w in weights.values()]))}


def layerwise_magnitude_masks(
    weights: Mapping[str, Tensor], sparsity: float | Mapping[str, float]
) -> dict[str, Tensor]:
    """Prune each tensor's smallest-magnitude entries to ``sparsity``: one fraction, or one per name.

    Example:
        >>> weights = {"a": torch.arange(4.0), "b": torch.arange(4.0)}
        >>> masks = layerwise_magnitude_masks(weights, {"a": 0.5, "b": 0.25})
        >>> [masks["a"].tolist(), masks["b"].tolist()]
        [[False, False, True, True], [False, True, True, True]]
    """
    masks = {}
    for name, w in weights.items():
        amount = sparsity[name] if isinstance(sparsity, Mapping) else sparsity
        _check_sparsity(amount, name)
        masks[name] = smallest_k_mask(w.detach().reshape(-1).abs(), round(amount * w.numel())).view_as(w)
    return masks


def _groups_along_input(weight: Tensor, m: int) -> Tensor:
    """View ``weight`` (out, in, *kernel) as (..., in // m, m): groups of ``m`` consecutive inputs."""
    moved = weight.movedim(1, -1)  # (out, *kernel, in)
    return moved.reshape(*moved.shape[:-1], weight.shape[1] // m, m)


def _ungroup(grouped: Tensor, weight: Tensor) -> Tensor:
    moved_shape = (weight.shape[0], *weight.shape[2:], weight.shape[1])
    return grouped.reshape(moved_shape).movedim(-1, 1)


def check_nm_compatible(weight_shape: torch.Size | tuple[int, ...], m: int, name: str) -> None:
    """Raise ``ValueError`` naming layer ``name`` unless its input dimension (dim 1) is a multiple of ``m``.

    Example:
        >>> check_nm_compatible((8, 16, 3, 3), 4, "conv")
    """
    if len(weight_shape) < 2 or weight_shape[1] % m != 0:
        raise ValueError(f"layer {name!r} has weight shape {tuple(weight_shape)}: its input dimension "
                         f"(dim 1) must be a multiple of M={m} for N:M sparsity; exclude it")


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest-magnitude weights of every ``m`` consecutive inputs (e.g. 2:4).

    Groups run along the input dimension (dim 1, which must be a multiple of ``m``), the layout sparse
    tensor cores accelerate.

    Example:
        >>> nm_mask(torch.tensor([[1.0, -5.0, 3.0, 2.0]]), 2, 4).tolist()
        [[False, True, True, False]]
    """
    check_nm_compatible(weight.shape, m, "weight")
    grouped = _groups_along_input(weight.detach().abs(), m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, grouped.topk(n, dim=-1).indices, True)
    return _ungroup(keep, weight)


def nm_scores(weight: Tensor, n: int, m: int) -> Tensor:
    """Magnitudes in which the weights the N:M mask keeps score ``+inf``.

    Pruning these scores to any sparsity up to ``1 - n / m`` removes only weights the final N:M mask
    removes, smallest first: that is how N:M sparsity is reached gradually.

    Example:
        >>> nm_scores(torch.tensor([[1.0, -5.0, 3.0, 2.0]]), 2, 4).tolist()
        [[1.0, inf, inf, 2.0]]
    """
    return weight.detach().abs().masked_fill(nm_mask(weight, n, m), float("inf"))


def channel_masks(
    weights: Mapping[str, Tensor],
    sparsity: float | Mapping[str, float],
    scope: str = "layerwise",
    norm: str = "l1",
) -> dict[str, Tensor]:
    """Prune whole output filters (dim 0) with the smallest norm; each mask is constant over a filter.

    A filter scores its mean absolute value (``norm="l1"``) or root-mean-square (``"l2"``), so filters
    of different fan-in compare fairly under ``scope="global"``, which prunes filters smallest first
    while the pruned weights stay within ``round(sparsity * total)``. ``scope="layerwise"`` prunes each
    tensor to its own ``sparsity`` (one fraction, or one per name).

    Example:
        >>> w = torch.stack([torch.full((2, 3), v) for v in (1.0, -3.0, 2.0, 0.5)])
        >>> channel_masks({"conv": w}, 0.5)["conv"][:, 0, 0].tolist()
        [False, True, True, False]
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    scores = {}
    for name, w in weights.items():
        rows = w.detach().reshape(w.shape[0], -1)
        scores[name] = rows.abs().mean(1) if norm == "l1" else rows.pow(2).mean(1).sqrt()
    if scope == "layerwise":
        filter_masks = {}
        for name, score in scores.items():
            amount = sparsity[name] if isinstance(sparsity, Mapping) else sparsity
            _check_sparsity(amount, name)
            filter_masks[name] = smallest_k_mask(score, round(amount * score.numel()))
    elif scope == "global":
        if isinstance(sparsity, Mapping):
            raise ValueError("per-layer sparsity needs scope='layerwise'")
        _check_sparsity(sparsity, "global")
        flat = torch.cat(list(scores.values()))
        sizes = torch.cat([torch.full((w.shape[0],), w[0].numel(), device=flat.device)
                           for w in weights.values()])
        order = torch.argsort(flat, stable=True)
        pruned_weights = torch.cumsum(sizes[order], 0)
        budget = round(sparsity * int(sizes.sum()))
        budget_tensor = torch.tensor([budget], device=flat.device)
        count = int(torch.searchsorted(pruned_weights, budget_tensor, right=True))
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[order[:count]] = False
        filter_masks = dict(zip(scores, keep.split([s.numel() for s in scores.values()])))
    else:
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    return {name: filter_masks[name].view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
            for name, w in weights.items()}


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a ``bool`` mask into a 1-D ``uint8`` CPU tensor, 8 entries per byte, most significant bit first.

    Example:
        >>> pack_mask(torch.tensor([True, False, True, True, False, False, False, False, True])).tolist()
        [176, 128]
    """
    bits = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits * weights).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`; ``ValueError`` if ``packed`` has the wrong byte count for ``shape``.

    Example:
        >>> mask = torch.rand(3, 5) > 0.5
        >>> torch.equal(unpack_mask(pack_mask(mask), mask.shape), mask)
        True
    """
    numel = int(torch.Size(shape).numel())
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"{packed.numel()} packed bytes do not hold a mask of shape {tuple(shape)}")
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = (packed.to(torch.uint8).view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).view(shape)
