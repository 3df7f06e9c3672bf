"""Factor math: exact at full rank for every method, truncation errors equal the real errors, bad ranks refused."""

import pytest
import torch

from lightning_compress.factorization.decompositions import (
    METHODS,
    decompose,
    full_rank,
    reconstruct,
    truncation_errors,
)

SHAPES = {
    "svd": [(6, 4), (5, 9, 1, 1)],
    "tucker2": [(6, 4, 3, 3), (4, 6, 3, 3), (5, 5, 3, 5)],
    "spatial": [(6, 4, 3, 3), (5, 7, 3, 5)],
    "depthwise_separable": [(6, 4, 3, 3), (12, 4, 3, 3), (3, 2, 5, 5)],
}


@pytest.mark.parametrize("method, shape", [(m, s) for m in METHODS for s in SHAPES[m]])
def test_exact_at_full_rank_and_errors_match_every_truncation(method, shape):
    weight = torch.randn(shape, dtype=torch.float64)
    errors = truncation_errors(method, weight)
    assert len(errors) == full_rank(method, shape)
    for rank in range(1, full_rank(method, shape) + 1):
        approx = reconstruct(method, decompose(method, weight, rank), rank)
        assert approx.shape == weight.shape
        error = float(((approx - weight) ** 2).sum() / (weight**2).sum())
        if method == "tucker2":  # HOOI refines the higher-order SVD whose error truncation_errors reports
            assert error <= float(errors[rank - 1]) + 1e-9
        else:
            assert error == pytest.approx(float(errors[rank - 1]), abs=1e-9)
    assert float(errors[-1]) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(approx, weight, atol=1e-10)
    assert bool((errors[1:] <= errors[:-1] + 1e-12).all())


def test_factor_shapes_and_dtype_follow_the_weight():
    weight = torch.randn(16, 8, 3, 3)
    assert [f.shape for f in decompose("tucker2", weight, 4)] == [(4, 8, 1, 1), (4, 4, 3, 3), (16, 4, 1, 1)]
    assert [f.shape for f in decompose("tucker2", weight, 12)] == [(8, 8, 1, 1), (12, 8, 3, 3), (16, 12, 1, 1)]
    assert [f.shape for f in decompose("depthwise_separable", weight, 2)] == [(16, 1, 3, 3), (16, 16, 1, 1)]
    assert {f.dtype for f in decompose("spatial", weight.half(), 3)} == {torch.float16}


def test_tucker2_refinement_beats_plain_higher_order_svd_on_low_ranks():
    torch.manual_seed(1)
    weight = torch.randn(32, 32, 3, 3, dtype=torch.float64)
    approx = reconstruct("tucker2", decompose("tucker2", weight, 8), 8)
    refined = float(((approx - weight) ** 2).sum() / (weight**2).sum())
    assert refined < float(truncation_errors("tucker2", weight)[7]) - 1e-4


@pytest.mark.parametrize("method, rank, match", [
    ("svd", 5, r"rank must be an integer in \[1, 4\]"),
    ("svd", 0, r"rank must be an integer in \[1, 4\]"),
    ("tucker2", 7, r"rank must be an integer in \[1, 6\]"),
    ("depthwise_separable", 7, r"rank must be an integer in \[1, 6\]"),
    ("cp", 2, "method must be one of"),
])
def test_bad_ranks_and_methods(method, rank, match):
    weight = torch.randn(6, 4, 3, 3) if method != "svd" else torch.randn(6, 4)
    with pytest.raises(ValueError, match=match):
        decompose(method, weight, rank)
