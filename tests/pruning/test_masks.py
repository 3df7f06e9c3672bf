import pytest
import torch

from lightning_compress.pruning.masks import (
    channel_masks,
    check_nm_compatible,
    global_magnitude_masks,
    kth_smallest,
    layerwise_magnitude_masks,
    nm_mask,
    nm_scores,
    pack_mask,
    smallest_k_mask,
    unpack_mask,
)


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(8, 4, 3, 3, generator=g) * 0.1, "b": torch.randn(16, 8, 3, 3, generator=g),
            "c": torch.randn(10, 16, generator=g)}


def test_smallest_k_prunes_exactly_k_with_deterministic_ties():
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.0])
    keep = smallest_k_mask(scores, 2)
    assert keep.tolist() == [False, False, True, True, True, True]
    assert smallest_k_mask(scores, 0).all() and not smallest_k_mask(scores, 6).any()


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 1.0])
def test_global_masks_use_one_threshold_across_tensors(sparsity):
    weights = _weights()
    masks = global_magnitude_masks(weights, sparsity)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    kept = torch.cat([w[m].abs() for w, m in zip(weights.values(), masks.values())])
    pruned = torch.cat([w[~m].abs() for w, m in zip(weights.values(), masks.values())])
    if kept.numel() and pruned.numel():
        assert pruned.max() <= kept.min()
    # the small-scale layer "a" is pruned harder than the others under one threshold
    if 0 < sparsity < 1:
        assert (~masks["a"]).float().mean() > (~masks["b"]).float().mean()


def test_layerwise_masks_hit_each_target():
    weights = _weights()
    masks = layerwise_magnitude_masks(weights, {"a": 0.5, "b": 0.75, "c": 0.1})
    for name, target in {"a": 0.5, "b": 0.75, "c": 0.1}.items():
        assert int((~masks[name]).sum()) == round(target * weights[name].numel())
        w, m = weights[name].abs(), masks[name]
        assert w[~m].max() <= w[m].min()


def test_masks_do_not_modify_inputs_and_keep_shapes():
    weights = _weights()
    before = {n: w.clone() for n, w in weights.items()}
    masks = global_magnitude_masks(weights, 0.5)
    assert all(torch.equal(before[n], weights[n]) for n in weights)
    assert all(masks[n].shape == weights[n].shape and masks[n].dtype == torch.bool for n in weights)


def test_nm_mask_keeps_n_largest_of_every_m_inputs():
    w = _weights()["b"]  # (16, 8, 3, 3): groups of 4 consecutive input channels
    mask = nm_mask(w, 2, 4)
    groups = mask.movedim(1, -1).reshape(16, 3, 3, 2, 4)
    assert (groups.sum(-1) == 2).all()
    wg = w.abs().movedim(1, -1).reshape(16, 3, 3, 2, 4)
    assert (wg.masked_fill(~groups, float("inf")).amin(-1) >= wg.masked_fill(groups, -1.0).amax(-1)).all()
    linear = nm_mask(_weights()["c"], 1, 4)
    assert (linear.view(10, 4, 4).sum(-1) == 1).all()


def test_nm_scores_reach_the_nm_mask_gradually():
    weights = {n: _weights()[n] for n in ("b", "c")}
    scores = {n: nm_scores(w, 2, 4) for n, w in weights.items()}
    half = global_magnitude_masks(scores, 0.25)
    final = global_magnitude_masks(scores, 0.5)
    for name, w in weights.items():
        target = nm_mask(w, 2, 4)
        assert torch.equal(final[name], target)
        assert not (~half[name] & target).any()  # only weights the final mask drops are pruned early


def test_nm_rejects_incompatible_input_dimension():
    with pytest.raises(ValueError, match="'layer3'.*multiple of M=4"):
        check_nm_compatible((8, 6, 3, 3), 4, "layer3")


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_channel_masks_prune_whole_filters(norm):
    weights = _weights()
    masks = channel_masks(weights, {"a": 0.5, "b": 0.25, "c": 0.3}, scope="layerwise", norm=norm)
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows.all(1) | ~rows.any(1)).all()  # each filter fully kept or fully pruned
    assert int((~masks["b"].reshape(16, -1).all(1)).sum()) == 4
    assert int((~masks["c"].reshape(10, -1).all(1)).sum()) == 3


def test_channel_masks_global_ranks_normalized_filter_norms():
    a = torch.ones(4, 2, 3, 3) * torch.tensor([1.0, 5.0, 6.0, 7.0]).view(4, 1, 1, 1)
    b = torch.ones(4, 8) * torch.tensor([2.0, 3.0, 8.0, 9.0]).view(4, 1)
    masks = channel_masks({"a": a, "b": b}, 0.3, scope="global")  # budget 0.3 * 104 = 31 weights
    assert masks["a"][:, 0, 0, 0].tolist() == [False, True, True, True]  # 18 weights
    assert masks["b"][:, 0].tolist() == [False, True, True, True]  # + 8 = 26 <= 31; next filter would be 34
    with pytest.raises(ValueError, match="scope"):
        channel_masks({"a": a}, 0.3, scope="filterwise")


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 3, 3)])
def test_pack_unpack_roundtrip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_mask(packed, (mask.numel() + 9,))


@pytest.mark.parametrize("zero_fraction", [0.0, 0.5, 0.9])
def test_kth_smallest_radix_path_is_exact(zero_fraction):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(200_000, generator=g).abs() * torch.rand(200_000, generator=g) ** 4  # wide range
    scores[: int(zero_fraction * scores.numel())] = 0.0
    scores[-10:] = float("inf")  # N:M scores keep +inf entries
    for k in (1, 1000, 100_000, 180_000, 199_990, 199_991, 200_000):
        assert kth_smallest(scores, k) == torch.kthvalue(scores, k).values, k
        assert int((~smallest_k_mask(scores, k)).sum()) == k
