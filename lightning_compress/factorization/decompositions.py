"""Low-rank decompositions of layer weights: the factor tensors and their truncation errors (pure math).

Factors are computed in float64 and returned in the weight's dtype and device. The methods:

* ``svd`` -- ``Linear`` or 1x1 convolution: ``W ≈ B·A``; exact at ``r = min(O, I)``.
* ``tucker2`` -- kxk convolution (Kim et al. 2016): 1x1 to ``min(r, I)``, kxk core to ``min(r, O)``,
  1x1 to ``O``; HOSVD refined by HOOI; exact at ``r = max(O, I)``.
* ``spatial`` -- ``kh x 1`` then ``1 x kw`` (Jaderberg et al. 2014); exact at ``r = min(I·kh, O·kw)``.
* ``depthwise_separable`` -- depthwise kxk with depth multiplier ``r``, then pointwise 1x1; exact at
  ``r = min(O, kh·kw)``.

Example:
    >>> w = torch.randn(6, 4, 3, 3)
    >>> factors = decompose("spatial", w, full_rank("spatial", w.shape))
    >>> [tuple(f.shape) for f in factors]
    [(12, 4, 3, 1), (6, 12, 1, 3)]
    >>> bool(torch.allclose(reconstruct("spatial", factors, 12), w, atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

METHODS = ("svd", "tucker2", "spatial", "depthwise_separable")
"""Every decomposition; ``svd`` is for ``Linear`` and 1x1 convolutions, the others for kxk convolutions."""

_HOOI_ITERATIONS = 3


def full_rank(method: str, shape: Sequence[int]) -> int:
    """The rank at which ``method`` reproduces a weight of ``shape`` exactly (the largest allowed rank).

    Example:
        >>> [full_rank(m, (16, 8, 3, 3)) for m in ("tucker2", "spatial", "depthwise_separable")]
        [16, 24, 9]
    """
    out_channels, in_channels = shape[0], shape[1]
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    if method == "svd":
        return min(out_channels, in_channels)
    if method == "tucker2":
        return max(out_channels, in_channels)
    if method == "spatial":
        return min(in_channels * kh, out_channels * kw)
    if method == "depthwise_separable":
        return min(out_channels, kh * kw)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _top_singular(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _check_rank(method: str, weight: torch.Tensor, rank: int) -> None:
    limit = full_rank(method, weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an integer in [1, {limit}] for {method} of a weight of shape "
                         f"{tuple(weight.shape)}, got {rank!r}")


def _tucker2_bases(weight: torch.Tensor, rank_out: int, rank_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal output/input bases ``(O, rank_out)``, ``(I, rank_in)``: HOSVD, then HOOI sweeps."""
    out_channels, in_channels = weight.shape[:2]
    mode_in = weight.transpose(0, 1).reshape(in_channels, -1)
    basis_in = _top_singular(mode_in, rank_in)[0]
    for _ in range(_HOOI_ITERATIONS):
        projected = torch.einsum("oihw,is->oshw", weight, basis_in).reshape(out_channels, -1)
        basis_out = _top_singular(projected, rank_out)[0]
        projected = torch.einsum("oihw,or->irhw", weight, basis_out).reshape(in_channels, -1)
        basis_in = _top_singular(projected, rank_in)[0]
    return basis_out, basis_in


def decompose(method: str, weight: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """The weights of the layers that replace ``weight``, in the order the input flows through them.

    Args:
        method: One of :data:`METHODS`.
        weight: The dense weight, ``(O, I)`` or ``(O, I, kh, kw)``.
        rank: In ``[1, full_rank(method, weight.shape)]``; ``ValueError`` outside it.

    Returns:
        ``svd``: ``[A (r, I, ...), B (O, r, ...)]``, trailing 1x1 dims kept;
        ``tucker2``: ``[first (r_in, I, 1, 1), core (r_out, r_in, kh, kw), last (O, r_out, 1, 1)]``;
        ``spatial``: ``[vertical (r, I, kh, 1), horizontal (O, r, 1, kw)]``;
        ``depthwise_separable``: ``[depthwise (I·r, 1, kh, kw), pointwise (O, I·r, 1, 1)]``.

    Example:
        >>> a, b = decompose("svd", torch.randn(5, 3), 2)
        >>> a.shape, b.shape
        (torch.Size([2, 3]), torch.Size([5, 2]))
    """
    _check_rank(method, weight, rank)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    out_channels, in_channels = w.shape[:2]
    if method == "svd":
        u, s, vh = _top_singular(w.reshape(out_channels, in_channels), rank)
        root = s.sqrt()
        trailing = tuple(w.shape[2:])
        factors = [(root[:, None] * vh).reshape(rank, in_channels, *trailing),
                   (u * root).reshape(out_channels, rank, *trailing)]
    elif method == "tucker2":
        basis_out, basis_in = _tucker2_bases(w, min(rank, out_channels), min(rank, in_channels))
        core = torch.einsum("oihw,or,is->rshw", w, basis_out, basis_in)
        factors = [basis_in.T[:, :, None, None], core, basis_out[:, :, None, None]]
    elif method == "spatial":
        kh, kw = w.shape[2:]
        matrix = w.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)
        u, s, vh = _top_singular(matrix, rank)
        root = s.sqrt()
        vertical = (u * root).T.reshape(rank, in_channels, kh, 1)
        horizontal = (root[:, None] * vh).reshape(rank, out_channels, kw).transpose(0, 1)
        factors = [vertical, horizontal.reshape(out_channels, rank, 1, kw)]
    else:  # depthwise_separable
        kh, kw = w.shape[2:]
        slices = w.transpose(0, 1).reshape(in_channels, out_channels, kh * kw)
        u, s, vh = _top_singular(slices, rank)
        root = s.sqrt()
        depthwise = (root[..., None] * vh).reshape(in_channels * rank, 1, kh, kw)
        pointwise = (u * root[:, None, :]).transpose(0, 1).reshape(out_channels, in_channels * rank, 1, 1)
        factors = [depthwise, pointwise]
    return [f.contiguous().to(device=weight.device, dtype=weight.dtype) for f in factors]


def reconstruct(method: str, factors: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """The dense weight that the factors :func:`decompose` computed at ``rank`` with ``method`` compute.

    Example:
        >>> w = torch.randn(4, 6)
        >>> bool(torch.allclose(reconstruct("svd", decompose("svd", w, 4), 4), w, atol=1e-5))
        True
    """
    if method == "svd":
        a, b = factors
        matrix = b.reshape(b.shape[0], rank) @ a.reshape(rank, a.shape[1])
        return matrix.reshape(b.shape[0], a.shape[1], *a.shape[2:])
    if method == "tucker2":
        first, core, last = factors
        return torch.einsum("rshw,or,si->oihw", core, last[:, :, 0, 0], first[:, :, 0, 0])
    if method == "spatial":
        vertical, horizontal = factors
        return torch.einsum("rih,orw->oihw", vertical[..., 0], horizontal[:, :, 0, :])
    if method == "depthwise_separable":
        depthwise, pointwise = factors
        in_channels = depthwise.shape[0] // rank
        dw = depthwise.reshape(in_channels, rank, *depthwise.shape[2:])
        pw = pointwise.reshape(pointwise.shape[0], in_channels, rank)
        return torch.einsum("oim,imhw->oihw", pw, dw)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def truncation_errors(method: str, weight: torch.Tensor) -> torch.Tensor:
    """Relative squared error ``‖W − Ŵ_r‖² / ‖W‖²`` of every rank ``r = 1 .. full_rank``.

    Read off one decomposition's singular values into a float64 CPU tensor; element ``r - 1`` is rank
    ``r``'s error. For ``tucker2`` it is the HOSVD's error, an upper bound of the refined one.

    Example:
        >>> errors = truncation_errors("svd", torch.diag(torch.tensor([3.0, 1.0])))
        >>> [round(float(e), 3) for e in errors]
        [0.1, 0.0]
    """
    limit = full_rank(method, weight.shape)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    total = float((w * w).sum())
    if total == 0.0:
        return torch.zeros(limit, dtype=torch.float64)
    out_channels, in_channels = w.shape[:2]
    if method == "tucker2":
        basis_out = torch.linalg.svd(w.reshape(out_channels, -1), full_matrices=False)[0]
        basis_in = torch.linalg.svd(w.transpose(0, 1).reshape(in_channels, -1), full_matrices=False)[0]
        energy = torch.einsum("oihw,or,is->rshw", w, basis_out, basis_in).pow(2).sum(dim=(2, 3))
        kept = energy.cumsum(0).cumsum(1)
        ranks = torch.arange(1, limit + 1)
        kept = kept[(ranks.clamp(max=energy.shape[0]) - 1), (ranks.clamp(max=energy.shape[1]) - 1)]
    else:
        if method == "svd":
            matrix = w.reshape(out_channels, in_channels)
        elif method == "spatial":
            kh, kw = w.shape[2:]
            matrix = w.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)
        else:
            matrix = w.transpose(0, 1).reshape(in_channels, out_channels, -1)
        squared = torch.linalg.svdvals(matrix).pow(2)
        kept = squared.reshape(-1, squared.shape[-1]).sum(0).cumsum(0)[:limit]
    return (1.0 - kept / total).clamp(min=0.0)
