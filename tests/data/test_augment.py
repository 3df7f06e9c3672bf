"""Batched crop/flip and normalization: exact against a per-image reference, random per batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_compress.data.augment import normalize, random_crop_flip


def per_image_reference(images: torch.Tensor, padding: int, seed: int) -> torch.Tensor:
    """Crop and flip image by image, drawing the same random numbers as the batched version."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=g)
    flip = torch.rand(n, 1, generator=g) < 0.5
    out = []
    for i in range(n):
        crop = F.pad(images[i], (padding,) * 4)[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_equals_per_image_crop_then_flip(dtype):
    images = torch.randint(0, 256, (16, 3, 32, 32)).to(dtype)
    out = random_crop_flip(images, padding=4, generator=torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == dtype
    assert torch.equal(out, per_image_reference(images, 4, seed=3))


def test_crop_flip_is_random_per_image_and_per_batch():
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is visible
    first, second = random_crop_flip(images), random_crop_flip(images)
    assert not torch.equal(first, second)
    zeros = (first == 0).flatten(1).sum(1)  # padding shown: 3 * (32 * |dy - 4| + 32 * |dx - 4| - overlap)
    assert (zeros > 0).sum() >= 48  # only the centre offset (1 in 81) shows no padding
    assert zeros.max() <= 3 * (32 * 32 - 28 * 28)  # at most 4 rows and 4 columns of padding
    assert len(set(zeros.tolist())) >= 8  # offsets differ from image to image


def test_crop_flip_without_padding_only_flips_about_half():
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=0, generator=torch.Generator().manual_seed(0))
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert ((out == images).flatten(1).all(1) | flipped).all()
    assert 150 < flipped.sum() < 250


def test_crop_flip_rejects_negative_padding():
    with pytest.raises(ValueError, match="padding must be >= 0, got -1"):
        random_crop_flip(torch.zeros(1, 3, 4, 4), padding=-1)


def test_normalize_matches_formula_and_centres_the_mean():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    channel = (1, 3, 1, 1)
    expected = (images.float() / 255 - torch.tensor(mean).view(channel)) / torch.tensor(std).view(channel)
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    centre = torch.tensor([round(m * 255) for m in mean], dtype=torch.uint8).view(channel).expand(2, 3, 4, 4)
    assert normalize(centre, mean, std).abs().max() < 0.5 / 255 / min(std)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crop_flip_and_normalize_on_cuda_match_the_cpu():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator(device="cuda").manual_seed(3)
    out = random_crop_flip(images.cuda(), generator=g)
    g = torch.Generator(device="cuda").manual_seed(3)
    n = len(images)
    dy = torch.randint(0, 9, (n, 1), device="cuda", generator=g).cpu()
    dx = torch.randint(0, 9, (n, 1), device="cuda", generator=g).cpu()
    flip = (torch.rand(n, 1, device="cuda", generator=g) < 0.5).cpu()
    for i in range(n):
        crop = F.pad(images[i], (4,) * 4)[:, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i].cpu(), crop.flip(-1) if flip[i] else crop)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.testing.assert_close(normalize(images.cuda(), mean, std).cpu(), normalize(images, mean, std))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_generator_augments_cuda_images_as_it_augments_cpu_ones():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    on_cpu = random_crop_flip(images, generator=torch.Generator().manual_seed(3))
    on_cuda = random_crop_flip(images.cuda(), generator=torch.Generator().manual_seed(3))
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), on_cpu)
