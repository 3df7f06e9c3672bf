"""Batched tensor augmentation for CIFAR: whole-batch ops on any device, nothing per image."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """torchvision's ``RandomCrop(size, padding)`` then ``RandomHorizontalFlip()``, as whole-batch ops.

    A crop at offset ``(dy, dx)`` is a shift of the flattened image by ``dy * W + dx`` (a flipped crop,
    one of the flipped image at the mirrored offset); rows and columns from outside are then zeroed.

    ``images`` (``N x C x H x W``) may have any dtype (uint8 is cheapest). The offsets and flips are drawn
    with ``generator`` on its own device (default: torch's global generator on the images' device), then
    moved to the images: a CPU generator gives the same augmentation on every device.

    Example:
        >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> random_crop_flip(images).shape, random_crop_flip(images, padding=0).sum() == images.sum()
        (torch.Size([8, 3, 32, 32]), tensor(True))
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = images.shape
    device = images.device
    draw = generator.device if generator is not None else device
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=draw, generator=generator) - padding
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=draw, generator=generator) - padding
    flip = (torch.rand(n, 1, device=draw, generator=generator) < 0.5).long()
    dy, dx, flip = (t.to(device, non_blocking=True) for t in (dy, dx, flip))
    dx = dx * (1 - 2 * flip)  # mirrored offset for the flipped images
    size, margin = c * h * w, padding * w + padding
    zeros = images.new_zeros(margin)
    # The batch unflipped, then flipped, between zero margins.
    flat = torch.cat([zeros, images.reshape(-1), images.flip(3).reshape(-1), zeros])
    windows = flat.as_strided((flat.numel() - size + 1, size), (1, 1))  # row k = flat[k : k + size]
    starts = margin + (torch.arange(n, device=device) + n * flip.view(n)) * size + (dy * w + dx).view(n)
    shifted = windows.index_select(0, starts).view(n, c, h, w)
    rows = torch.arange(h, device=device) + dy
    cols = torch.arange(w, device=device) + dx
    shifted.mul_(((rows >= 0) & (rows < h)).to(images.dtype)[:, None, :, None])
    return shifted.mul_(((cols >= 0) & (cols < w)).to(images.dtype)[:, None, None, :])


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``N x C x H x W`` images to float32 ``(x / 255 - mean) / std`` per channel (mean, std in [0, 1]).

    Example:
        >>> normalize(torch.full((1, 1, 1, 1), 255, dtype=torch.uint8), [0.5], [0.5]).item()
        1.0
    """
    # x / 255 / std - mean / std, as one multiply and one add.
    scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32, device=images.device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=images.device)
    return images.float().mul_(scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1))
