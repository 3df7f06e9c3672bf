"""Sensitivity analysis: one layer pruned at a time, weights restored, monotone per-layer targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.sensitivity import check_sparsities, layer_sensitivity, sensitivity_targets, write_sensitivity


def test_each_layer_is_pruned_alone_and_restored():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def evaluate(module):
        seen.append(tuple(float((module[i].weight == 0).float().mean()) for i in range(2)))
        return 1.0 - seen[-1][0] - 0.1 * seen[-1][1]

    rows = layer_sensitivity(net, evaluate, ["0", "1"], [0.5, 0.75])
    assert seen == [(0, 0), (0.5, 0), (0.75, 0), (0, 0.5), (0, 0.75)]
    assert [(r["layer"], r["sparsity"]) for r in rows] == [("0", 0.0), ("0", 0.5), ("0", 0.75),
                                                             ("1", 0.0), ("1", 0.5), ("1", 0.75)]
    assert rows[2]["drop"] == pytest.approx(0.75)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert sensitivity_targets(rows, max_drop=0.06) == {"0": 0.0, "1": 0.5}


def test_attention_projections_are_analyzed_and_restored():
    from lightning_compress.core.layers import select_weights, weight_label

    net = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 2))
    assert [weight_label(name) for name in select_weights(net)] == ["0", "1.in_proj_weight", "1.out_proj"]
    labels = ["1.in_proj_weight", "1.out_proj"]
    before = net[1].in_proj_weight.detach().clone()
    zeros = []
    rows = layer_sensitivity(net, lambda m: zeros.append(float((m[1].in_proj_weight == 0).float().mean())) or 1.0,
                             labels, [0.5])
    assert zeros[:2] == [0.0, 0.5] and [r["layer"] for r in rows] == ["1.in_proj_weight"] * 2 + ["1.out_proj"] * 2
    assert torch.equal(net[1].in_proj_weight, before)
    with pytest.raises(ValueError, match=r"layers \['1.in_proj'\] name no weight; weights are: \['0', '1.in_proj_weight'"):
        layer_sensitivity(net, lambda m: 1.0, ["1.in_proj"], [0.5])


def test_targets_stop_at_the_first_intolerable_sparsity():
    rows = [{"layer": "a", "sparsity": s, "drop": d} for s, d in [(0.0, 0), (0.5, 0.2), (0.9, 0.0)]]
    assert sensitivity_targets(rows, max_drop=0.1) == {"a": 0.0}  # 0.9 recovering is noise, not tolerance
    with pytest.raises(ValueError, match="max_drop"):
        sensitivity_targets(rows, max_drop=-1)
    with pytest.raises(ValueError, match="sparsities"):
        check_sparsities([0.5, 1.0])


def test_written_targets_are_yaml_magnitude_pruning_arguments(tmp_path):
    import yaml

    rows = [{"layer": "model.fc", "sparsity": 0.0, "accuracy": 0.9, "drop": 0.0},
            {"layer": "model.fc", "sparsity": 0.5, "accuracy": 0.9, "drop": 0.0}]
    paths = write_sensitivity(rows, {"model.fc": 0.5}, tmp_path, 0.01, {"include": ["model.fc"], "exclude": None})
    assert yaml.safe_load(paths["targets"].read_text()) == {
        "final_sparsity": {"model.fc": 0.5}, "scope": "layerwise", "include": ["model.fc"]}
    assert paths["csv"].read_text().splitlines()[1] == "model.fc,0.0,0.9,0.0"
