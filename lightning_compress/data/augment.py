"""Batched tensor augmentation for CIFAR: whole-batch ops on any device, nothing per image.

Example:
    >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> out = normalize(random_crop_flip(images), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    >>> out.shape, out.dtype
    (torch.Size([8, 3, 32, 32]), torch.float32)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, for every image of a batch.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` followed by ``RandomHorizontalFlip()``
    per image, done with a handful of whole-batch ops: a horizontally flipped crop is a crop of the
    flipped image at the mirrored offset, and cropping at offset ``(dy, dx)`` is a shift of the
    flattened image by ``dy * W + dx`` elements -- one contiguous window per image out of a strided
    view of the batch -- after which the rows and columns that came from outside the image are zeroed.

    Args:
        images: ``N x C x H x W`` images, any dtype (uint8 is cheapest), on any device.
        padding: Zero padding on each side; crop offsets are uniform in ``[0, 2 * padding]``.
        generator: Random generator on ``images.device``; default: the device's global generator.

    Returns:
        A new tensor with the shape, dtype and device of ``images``.

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
        >>> random_crop_flip(x, padding=0).sum().item() == x.sum().item()
        True
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = images.shape
    device = images.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator) - padding
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator) - padding
    flip = (torch.rand(n, 1, device=device, generator=generator) < 0.5).long()
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
    """Convert uint8 images to float32 and normalize them: ``(x / 255 - mean) / std`` per channel.

    Args:
        images: ``N x C x H x W`` uint8 images.
        mean: Per-channel mean in ``[0, 1]``.
        std: Per-channel standard deviation in ``[0, 1]``.

    Returns:
        float32 images on the device of ``images``.

    Example:
        >>> normalize(torch.full((1, 1, 1, 1), 255, dtype=torch.uint8), [0.5], [0.5]).item()
        1.0
    """
    # x / 255 / std - mean / std, as one multiply and one add.
    scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32, device=images.device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=images.device)
    return images.float().mul_(scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1))
