"""The planning pieces alone: layer shapes and their ONNX models, the cached latency table, the channel space
(checked against real slimming), the greedy search and the calibrated latency model."""

from __future__ import annotations

import itertools
import json

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from lightning_compress.core.accounting import count_macs_per_module
from lightning_compress.core.machine import cpu_description
from lightning_compress.models import create_model
from lightning_compress.planning import latency as latency_module
from lightning_compress.planning.latency import (
    LatencyTable,
    LayerShape,
    channel_block,
    layer_onnx,
    layer_shapes,
    round_medians,
    runtime_runner,
)
from lightning_compress.planning.planner import (
    LatencyModel,
    Plan,
    Target,
    UnreachableTargetError,
    anchored_widths,
    greedy_widths,
    runtime_program,
    target_cost,
    uniform_widths,
)
from lightning_compress.planning.ranks import (
    factored_copy,
    factored_shapes,
    rank_candidates,
    rank_sensitivity,
)
from lightning_compress.planning.target import REMEASURE_ROUNDS, TargetPlanner
from lightning_compress.planning.widths import channel_space, slimmed_copy, width_sensitivity
from tests.toy import channels_dear


def test_layer_shapes_give_the_macs_torch_counts():
    net = create_model("mobilenetv2", num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    shapes, counted = layer_shapes(net, example), count_macs_per_module(net, example)
    assert any(s.groups == s.in_channels > 1 for s in shapes.values())  # depthwise convolutions are in
    assert {name: s.macs() for name, s in shapes.items()} == {name: counted[name] for name in shapes}


@pytest.mark.parametrize("int8", [False, True])
def test_layer_models_run_and_int8_fuses_into_one_int8_kernel(int8, tmp_path):
    shape = LayerShape("conv", 16, 24, (3, 3), (2, 2), (1, 1), (1, 1), 1, (10, 10))
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(layer_onnx(shape, 2, int8), options, providers=["CPUExecutionProvider"])
    x = (torch.randint(0, 256, (2, 16, 10, 10), dtype=torch.uint8) if int8 else torch.randn(2, 16, 10, 10)).numpy()
    assert session.run(None, {"x": x})[0].shape == (2, 24, 5, 5)

    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert ("QLinearConv" in ops and "DequantizeLinear" not in ops) if int8 else "Conv" in ops


def test_latency_table_is_cached_per_machine_and_runtime(tmp_path):
    path = tmp_path / "table.json"
    shape = LayerShape("linear", 64, 10, (1, 1), (1, 1), (0, 0), (1, 1), 1, (1, 1))
    table = LatencyTable(path=path, repeats=5)
    first = table.layer_ms(shape, int8=False)
    table.layer_ms(shape, int8=True)
    assert table.measured == 2
    table.save()
    again = LatencyTable(path=path, repeats=5)
    assert again.entries == table.entries and again.measured == 0
    assert again.layer_ms(shape, int8=False) == pytest.approx(first / table.reference_ms * again.reference_ms)
    stored = json.loads(path.read_text())
    stored["machine"]["cpu"]["model"] = "another CPU"
    path.write_text(json.dumps(stored))
    assert LatencyTable(path=path, repeats=5).entries == {}  # another machine's figures are not reused
    assert LatencyTable(path=path, batch_size=4, repeats=5).entries == {}


def test_a_7bit_table_times_layers_with_7bit_weights_as_entries_of_their_own(tmp_path):
    from onnx import numpy_helper

    path = tmp_path / "table.json"
    shape = LayerShape("conv", 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    def weight_codes(weight_max):
        graph = onnx.load_from_string(layer_onnx(shape, 1, True, weight_max)).graph
        return numpy_helper.to_array(next(t for t in graph.initializer if t.name == "w_codes"))

    codes = {weight_max: weight_codes(weight_max) for weight_max in (127, 63)}
    assert int(abs(codes[127]).max()) == 127 and int(abs(codes[63]).max()) == 63
    eight = LatencyTable(path=path, repeats=5)
    eight.layer_ms(shape, int8=True)
    eight.save()
    seven = LatencyTable(path=path, repeats=5, weight_max=63)
    seven.layer_ms(shape, int8=True)
    assert seven.measured == 1  # the 8-bit entry is not reused for 7-bit weights
    assert sorted(key.split()[0] for key in seven.entries) == ["int8", "int8w63"]
    with pytest.raises(ValueError, match=r"weight_max must be an integer in 1\.\.127, got 255"):
        LatencyTable(weight_max=255)


class _Clock:
    """A stand-in for ``time`` in the latency module: programs advance it by their cost, so timing is exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_latency_table_layers_compare_when_the_machine_slows_between_them(monkeypatch):
    """Each layer is timed against the reference in the same rounds: a machine twice as slow while the second
    layer is measured leaves the two layers' ratio that of their costs (it doubled in milliseconds alone)."""
    costs = {"reference": 1e-3, "small": 0.5e-3, "large": 2e-3, "empty": 0.05e-3}
    speed = {"factor": 1.0}
    clock = _Clock()

    def layer_program(shape, batch_size, int8, weight_max=127):
        return {32: b"reference", 8: b"small", 16: b"large"}[shape.out_channels]

    def runner(model, runtime, threads):
        def run(array):
            clock.now += costs[model.decode()] * speed["factor"]
        return run

    monkeypatch.setattr(latency_module, "time", clock)
    monkeypatch.setattr(latency_module, "layer_onnx", layer_program)
    monkeypatch.setattr(latency_module, "_empty_onnx", lambda array: b"empty")
    monkeypatch.setattr(latency_module, "runtime_runner", runner)
    table = LatencyTable(repeats=10)
    small = table.layer_ms(LayerShape("conv", 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8)), int8=False)
    speed["factor"] = 2.0
    large = table.layer_ms(LayerShape("conv", 8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8)), int8=False)
    assert large / small == pytest.approx((2 - 0.05) / (0.5 - 0.05))
    assert table.describe()["reference_layer_ms"] == pytest.approx(0.95)


def test_round_medians_take_turns_call_by_call_so_a_drifting_machine_keeps_the_ratio(monkeypatch):
    """The machine slows steadily while measuring (each call a little slower than the one before): timed in
    blocks, the program measured second would read 1.7x slower than it is; taking turns call by call, both see
    the same drift."""
    clock, calls = _Clock(), {"count": 0}

    def program(cost):
        def run():
            calls["count"] += 1
            clock.now += cost * (1 + calls["count"] / 20)
        return run

    monkeypatch.setattr(latency_module, "time", clock)
    medians = round_medians({"small": program(0.2e-3), "large": program(0.4e-3)}, repeats=20, rounds=1, warmup=0)
    assert medians["large"][0] / medians["small"][0] == pytest.approx(2.0, rel=0.05)


def test_channel_space_predicts_the_shapes_real_slimming_gives():
    torch.manual_seed(0)
    for name in ("resnet20", "mobilenetv2"):
        net = create_model(name, num_classes=10).eval()
        example = torch.randn(1, 3, 32, 32)
        classifier = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        space = channel_space(net, example, classifier)
        generator = torch.Generator().manual_seed(1)
        widths = {g: space.candidates(g, 8)[int(torch.randint(len(space.candidates(g, 8)), (1,), generator=generator))]
                  for g in space.widths}
        assert space.shapes(widths) == layer_shapes(slimmed_copy(net, example, widths), example), name


def test_greedy_search_is_deterministic_meets_the_budget_and_spares_sensitive_groups():
    net = create_model("resnet20", num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    space = channel_space(net, example, ["fc"])
    cost = target_cost(Target("macs_ratio", 0.5), space, None, int8=False)
    sensitivity = {g: {w: (10.0 if g == "layer3.1.conv1" else 0.01) * (space.widths[g] - w) for w in
                       space.candidates(g, 8)} for g in space.widths}
    widths = greedy_widths(space, sensitivity, cost, 0.5, 8)
    assert cost(widths) <= 0.5
    assert widths["layer3.1.conv1"] == 64  # the one expensive group is left whole
    assert greedy_widths(space, sensitivity, cost, 0.5, 8) == widths
    with pytest.raises(UnreachableTargetError, match=r"narrowest candidate network .* reaches 0\.1197"):
        greedy_widths(space, sensitivity, cost, 0.01, 8)


def test_uniform_allocation_shrinks_every_group_alike_within_the_budget():
    net = create_model("resnet20", num_classes=10).eval()
    space = channel_space(net, torch.randn(1, 3, 32, 32), ["fc"])
    cost = target_cost(Target("macs_ratio", 0.5), space, None, int8=False)
    widths = uniform_widths(space, cost, 0.5, 8)
    assert cost(widths) <= 0.5
    by_dense = {}
    for group, width in widths.items():
        by_dense.setdefault(space.widths[group], set()).add(width)
    assert all(len(kept) == 1 for kept in by_dense.values())  # groups of one dense width keep one width
    assert by_dense == {16: {8}, 32: {24}, 64: {48}}  # one fraction (0.74), to multiples of 8: 16 -> 8 overshoots
    looser = uniform_widths(space, cost, 0.7, 8)
    assert all(looser[g] >= widths[g] for g in widths) and cost(looser) <= 0.7
    with pytest.raises(UnreachableTargetError, match=r"reaches 0\.1197"):
        uniform_widths(space, cost, 0.01, 8)


def test_anchored_search_trades_channels_around_the_uniform_widths():
    net = create_model("resnet20", num_classes=10).eval()
    space = channel_space(net, torch.randn(1, 3, 32, 32), ["fc"])
    cost = target_cost(Target("macs_ratio", 0.5), space, None, int8=False)
    # removal costs little everywhere except in layer3's stream and one inner convolution
    expensive = {g for g in space.widths if g.startswith("layer3")}
    sensitivity = {g: {w: (1.0 if g in expensive else 0.01) * (space.widths[g] - w) / space.widths[g] for w in
                       space.candidates(g, 8)} for g in space.widths}
    uniform = uniform_widths(space, cost, 0.5, 8)
    widths = anchored_widths(space, sensitivity, cost, 0.5, 8)
    assert cost(widths) <= 0.5 and widths != uniform
    assert all(uniform[g] / 2 <= widths[g] <= 2 * uniform[g] for g in widths)  # no group far from uniform
    assert any(widths[g] > uniform[g] for g in expensive)  # paid for by the cheap groups
    assert sum(sensitivity[g][w] for g, w in widths.items()) < sum(sensitivity[g][w] for g, w in uniform.items())
    assert anchored_widths(space, sensitivity, cost, 0.5, 8) == widths  # deterministic
    free = greedy_widths(space, sensitivity, cost, 0.5, 8)
    assert min(free[g] / uniform[g] for g in free) < 0.5  # what the bounds prevent: a group far below uniform
    flat = {g: {w: 0.0 for w in space.candidates(g, 8)} for g in space.widths}
    assert anchored_widths(space, flat, cost, 0.5, 8) == uniform  # nothing to gain: the uniform widths
    with pytest.raises(UnreachableTargetError, match=r"reaches 0\.1197"):
        anchored_widths(space, sensitivity, cost, 0.01, 8)


def _resnet20_with_inputs():
    """A seeded ResNet-20, one batch of 16 random images, and its channel space (the classifier ignored)."""
    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10).eval()
    inputs = [torch.randn(16, 3, 32, 32)]
    return net, inputs, channel_space(net, inputs[0][:1], ["fc"])


def test_sensitivity_is_zero_at_the_dense_width_and_grows_with_removal():
    net, inputs, space = _resnet20_with_inputs()
    costs = width_sensitivity(net, inputs, space, round_to=16)
    assert all(costs[g][space.widths[g]] == 0.0 for g in costs)
    assert costs["layer3.0.conv1"][16] > costs["layer3.0.conv1"][48] > 0.0


def test_sensitivity_scores_cuts_with_statistics_re_estimated_on_the_inputs():
    net, inputs, space = _resnet20_with_inputs()
    before = width_sensitivity(net, inputs, space, round_to=16)
    for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # stale statistics: no effect
        norm.running_mean.uniform_(-3, 3)
        norm.running_var.uniform_(0.1, 5)
    after = width_sensitivity(net, inputs, space, round_to=16)
    flat = lambda costs: {(g, w): c for g, widths in costs.items() for w, c in widths.items()}  # noqa: E731
    assert flat(after) == pytest.approx(flat(before), rel=1e-4, abs=1e-7) and max(flat(before).values()) > 0


def test_latency_model_is_calibrated_on_three_real_measurements():
    """The dense, the narrowest and the uniform widths the first calibration predicts at the target, each measured
    end to end: the prediction passes through all three."""
    net = create_model("resnet20", num_classes=10).eval()
    # 0.7: reachable on every CPU seen (at batch 8 the narrowest network measured 0.54x the dense one on an AMX Xeon,
    # so a 0.5 target had no uniform widths to measure there)
    planner = TargetPlanner(net, torch.randn(1, 3, 32, 32), Target("latency_ratio", 0.7), batch_size=8,
                            ignored=["fc"], repeats=10)
    references = planner.latency.references
    assert set(references) == {"dense", "narrowest", "uniform"}
    narrowest = {g: planner.space.candidates(g, 8)[-1] for g in planner.space.widths}
    for reference, widths in (("dense", planner.space.widths), ("narrowest", narrowest)):
        assert references[reference]["layers_ms"] == pytest.approx(planner.latency.layers_ms(
            planner.space.shapes(widths)))
    assert references["narrowest"]["layers_ms"] < references["uniform"]["layers_ms"] < references["dense"]["layers_ms"]
    points = {(reference["layers_ms"], reference["measured_ms"]) for reference in references.values()}
    knots = planner.latency.knots  # all three, unless noise on a busy machine inverted two (then one is left out)
    assert len(knots) >= 2 and set(knots) <= points and all(b[1] > a[1] for a, b in itertools.pairwise(knots))
    for knot_sum, knot_ms in knots:
        assert planner.latency.predict_sum(knot_sum) == pytest.approx(knot_ms, rel=1e-6)


def _model_through(*points):
    model = LatencyModel(table=None, int8=False)
    model.layers_ms = lambda shapes: shapes  # shapes stand for their table sum here
    model.calibrate({f"p{i}": point for i, point in enumerate(points)})
    return model


def test_latency_model_is_piecewise_linear_and_extends_its_outer_segments():
    model = _model_through((10.0, 20.0), (4.0, 6.0), (6.0, 12.0))
    assert [model.predict_sum(x) for x in (4.0, 5.0, 6.0, 8.0, 10.0)] == pytest.approx([6.0, 9.0, 12.0, 16.0, 20.0])
    assert model.predict_sum(2.0) == pytest.approx(0.0) and model.predict_sum(12.0) == pytest.approx(24.0)


def test_latency_model_drops_a_reference_measured_out_of_order():
    """A noisy middle measurement (slower than the dense network) is left out; two references measured out of order
    leave the table's milliseconds shifted through their mean."""
    model = _model_through((10.0, 20.0), (4.0, 6.0), (6.0, 21.0))
    assert model.knots == [(4.0, 6.0), (10.0, 20.0)] and set(model.references) == {"p0", "p1", "p2"}
    model = _model_through((10.0, 5.0), (4.0, 6.0))
    assert model.knots == [(7.0, 5.5)] and model.predict_sum(9.0) == pytest.approx(7.5)


@pytest.mark.parametrize("again", [0.3, 0.9])
def test_a_latency_target_is_measured_again_before_it_is_refused(again, monkeypatch, tmp_path):
    """One calibration on a busy machine can put the narrowest network far too close to the dense one: the refusal
    comes only if a second calibration, over more rounds, agrees."""
    calls = []

    def measure(self, rounds=3, **networks):  # the first calibration inflated, the second (at another load) as
        calls.append(rounds)                 # ``again`` says
        return {"dense": 10.0, "narrowest": 9.0} if len(calls) == 1 else {"dense": 20.0, "narrowest": 20.0 * again}

    monkeypatch.setattr(TargetPlanner, "measure", measure)  # and a table that costs MACs (no timing noise)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 1)).eval()
    planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("latency_ratio", 0.5), ignored=["2"],
                            table_path=tmp_path / "table.json", repeats=2)
    assert planner.closest() == pytest.approx(0.9)
    if again < 0.5:
        planner.check_reachable()
        assert planner.closest() == pytest.approx(again) and planner.dense_value == pytest.approx(1.0)
    else:
        with pytest.raises(UnreachableTargetError, match=r"latency_ratio=0.5 cannot be reached.*at 0\.9 x dense"):
            planner.check_reachable()
    assert calls == [3, REMEASURE_ROUNDS]


def test_a_planner_for_another_target_shares_the_calibration_it_makes(monkeypatch, tmp_path):
    """A planner copied for another target that calibrates again (before refusing) calibrates the original too:
    both cost against the new dense reference (a stale reference once made the original report 0.975x dense
    for a network the copy measured at 0.77x)."""
    calls = []

    def measure(self, rounds=3, **networks):  # 3 rounds: the first calibration and its uniform reference
        calls.append(rounds)
        first = {"dense": 10.0, "narrowest": 9.0, "uniform": 9.5}
        return first if rounds == 3 else {"dense": 20.0, "narrowest": 6.0, "uniform": 13.0}

    monkeypatch.setattr(TargetPlanner, "measure", measure)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 1)).eval()
    planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("latency_ratio", 0.95), ignored=["2"],
                            table_path=tmp_path / "table.json", repeats=2)
    other = planner.with_target(Target("latency_ratio", 0.5))
    other.check_reachable()
    assert calls == [3, 3, REMEASURE_ROUNDS]
    assert planner.closest() == pytest.approx(0.3) == other.closest() and planner.dense_value == pytest.approx(1.0)


@pytest.mark.parametrize("slow_below", [0, 16])
def test_widths_the_runtime_runs_no_faster_are_not_candidates(slow_below, monkeypatch, tmp_path):
    """A table where layers with fewer than ``slow_below`` output channels cost 4x their MACs (as onnxruntime's int8
    convolution runs 8 channels slower than 16): the floor rises to 16, the narrowest network calibrated on and
    every candidate keep 16 channels or more; a table costing MACs keeps the floor at ``round_to``."""
    def network_ms(self, shapes, int8):
        return sum(s.macs() * (4 if s.out_channels < slow_below else 1) for s in shapes.values())

    measured = {}

    def measure(self, rounds=3, **networks):
        measured.update({name: [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
                         for name, net in networks.items()})
        return {name: float(count_macs_per_module(net, self.example).get("", 0)) for name, net in networks.items()}

    monkeypatch.setattr(TargetPlanner, "measure", measure)
    monkeypatch.setattr(LatencyTable, "network_ms", network_ms)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 4, 1)).eval()
    planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("latency_ratio", 0.5), ignored=["4"], round_to=8,
                            table_path=tmp_path / "table.json", repeats=2)
    floor = 16 if slow_below else 8
    assert planner.space.floor == floor and measured["narrowest"] == [floor, floor, 4]
    assert all(min(planner.space.candidates(g, 8)) == floor for g in planner.space.widths)
    plan = planner.plan(net, [torch.randn(4, 3, 8, 8)], checks=1)
    assert min(plan.widths.values()) >= floor and plan.details["floor"] == floor


def test_the_channel_block_is_the_one_onnxruntime_lays_fp32_convolutions_out_in_on_this_cpu():
    """onnxruntime's NCHWc block is the CPU's float vector width: 16 with AVX-512, 8 with AVX2; int8 and the other
    runtimes have none the planner knows of."""
    flags = cpu_description()["flags"]
    expected = 16 if "avx512f" in flags else 8 if "avx2" in flags else None
    if expected is None:
        pytest.skip(f"no AVX2 on this CPU ({flags}): onnxruntime's block not known here")
    assert channel_block("onnxruntime", int8=False) == expected
    assert {channel_block("onnxruntime", int8=True), channel_block("openvino", int8=False),
            channel_block("executorch", int8=False)} == {0}


@pytest.mark.parametrize("int8", [False, True])
def test_widths_above_the_runtime_block_are_its_multiples(int8, monkeypatch, tmp_path):
    """With a block of 16 (AVX-512 onnxruntime, fp32) a 64-channel group plans among 64/48/32/16/8 channels, never 24,
    40 or 56, which run as slow as the next multiple of 16 in a network; an int8 plan keeps every multiple of 8."""
    monkeypatch.setattr("lightning_compress.planning.target.channel_block",
                        lambda runtime, int8: 0 if int8 else 16)
    monkeypatch.setattr(TargetPlanner, "measure", lambda self, rounds=3, **networks: {
        name: float(count_macs_per_module(net, self.example).get("", 0)) if isinstance(net, nn.Module) else 1e9
        for name, net in networks.items()})
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(64, 4, 1)).eval()
    planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("latency_ratio", 0.3), ignored=["4"], round_to=8,
                            int8=int8, table_path=tmp_path / "table.json", repeats=2)
    candidates = {w for g in planner.space.widths for w in planner.space.candidates(g, 8)}
    assert candidates == ({8, 16, 24, 32, 40, 48, 56, 64} if int8 else {8, 16, 32, 48, 64})
    plan = planner.plan(net, [torch.randn(4, 3, 8, 8)], checks=1)
    assert plan.details["block"] == (0 if int8 else 16) and set(plan.widths.values()) <= candidates


def macs_as_ms(networks, example):
    """Each network's MACs standing in for its milliseconds (a measurement without timing noise)."""
    return {name: float(count_macs_per_module(net, example).get("", 0)) for name, net in networks.items()}


def _plan_checked_by(measure, monkeypatch, tmp_path):
    """A half-latency plan of a small convolution stack whose end-to-end checks ``measure`` gives, costed by a table
    of MACs (no timing noise), with sensitivity growing with the channels cut, on AVX-512's channel block of 16 (the
    plans do not depend on the CPU that runs the test)."""
    monkeypatch.setattr("lightning_compress.planning.target.channel_block", lambda runtime, int8: 0 if int8 else 16)
    monkeypatch.setattr(TargetPlanner, "measure", measure)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 4, 1)).eval()
    planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("latency_ratio", 0.5), ignored=["4"], round_to=8,
                            table_path=tmp_path / "table.json", repeats=2)
    sensitivity = {g: {w: 0.01 * (planner.space.widths[g] - w) for w in planner.space.candidates(g, 8)}
                   for g in planner.space.widths}
    return planner.plan(net, [], sensitivity=sensitivity)


@pytest.mark.parametrize("confirmed", [False, True])
def test_a_missed_check_is_measured_again_before_the_budget_shrinks(confirmed, monkeypatch, tmp_path):
    """A plan whose first end-to-end check misses is measured again over more rounds; only a confirmed miss
    re-plans under a smaller budget (each shrink cuts channels the target did not ask for)."""
    calls = []

    def measure(self, rounds=3, **networks):  # the networks' MACs as milliseconds; the first check's plan inflated
        ms = macs_as_ms(networks, self.example)
        if "planned" in networks:
            calls.append(rounds)
            if rounds == 3 and len(calls) == 1 or confirmed and len(calls) == 2:
                ms["planned"] = 0.8 * ms["dense"]
        return ms

    plan = _plan_checked_by(measure, monkeypatch, tmp_path)
    checks = plan.details["checks"]
    assert [check["rounds"] for check in checks] == ([REMEASURE_ROUNDS, 3] if confirmed else [REMEASURE_ROUNDS])
    assert checks[0]["budget"] == 0.5 and plan.details["met"]
    if confirmed:  # the confirmed miss (0.8) shrank the budget
        assert checks[1]["budget"] == pytest.approx(0.5 * 0.5 / 0.8) and plan.predicted <= checks[1]["budget"]
    else:
        assert checks[0]["measured"] <= 0.5 and plan.predicted <= 0.5


@pytest.mark.parametrize("later", [0.55, 1.0])
def test_a_plan_measured_well_below_its_target_is_grown(later, monkeypatch, tmp_path):
    """The latency model over-predicts the first plan (measured at 0.6 of its prediction, and again over more
    rounds): the budget grows by the margin. Measured at 0.55 of the prediction again, the grown plan is kept;
    measured as predicted (the machine's load changed), it misses, and the widths that met are measured again and
    kept."""
    planned_calls = []

    def measure(self, rounds=3, **networks):  # the networks' MACs as milliseconds, the planned one scaled
        ms = macs_as_ms(networks, self.example)
        if "planned" in networks:
            planned_calls.append(rounds)
            ms["planned"] *= 0.6 if len(planned_calls) <= 2 else later
        return ms

    plan = _plan_checked_by(measure, monkeypatch, tmp_path)
    checks = plan.details["checks"]
    first = checks[0]
    assert first["predicted"] <= 0.5 and first["measured"] == pytest.approx(0.6 * first["predicted"], rel=1e-3)
    assert planned_calls[:2] == [3, REMEASURE_ROUNDS] and first["rounds"] == REMEASURE_ROUNDS  # confirmed first
    assert checks[1]["budget"] == pytest.approx(0.5 / 0.6) and checks[1]["predicted"] > 0.5
    assert plan.details["met"] and checks[-1]["measured"] <= 0.5
    if later < 1.0:  # the grown plan met: kept
        assert len(checks) == 2 and plan.predicted == checks[1]["predicted"]
    else:  # it missed (measured again first): the first widths, measured again
        assert [c["rounds"] for c in checks] == [REMEASURE_ROUNDS, REMEASURE_ROUNDS, 3]
        assert len(checks) == 3 and plan.predicted == first["predicted"] == checks[2]["predicted"]


@pytest.mark.parametrize(("fraction", "acted_on"), [(0.93, True), (0.97, False)])
def test_a_plan_measured_a_few_percent_below_its_prediction_is_grown(fraction, acted_on, monkeypatch, tmp_path):
    """Measured at 0.93 of its prediction (a budget's 7 % left unused), the plan is measured again over more rounds
    and re-planned under a grown budget; at 0.97, within a measurement's noise, it is kept after one check."""
    planned_calls = []

    def measure(self, rounds=3, **networks):
        ms = macs_as_ms(networks, self.example)
        if "planned" in networks:
            planned_calls.append(rounds)
            ms["planned"] *= fraction
        return ms

    plan = _plan_checked_by(measure, monkeypatch, tmp_path)
    first = plan.details["checks"][0]
    assert first["measured"] == pytest.approx(fraction * first["predicted"], rel=1e-3) and plan.details["met"]
    assert planned_calls[:2] == ([3, REMEASURE_ROUNDS] if acted_on else [3])
    if acted_on:  # the grown plan measured too, then kept (it met)
        assert [check["budget"] for check in plan.details["checks"]] == pytest.approx([0.5, 0.5 / fraction])


def test_a_plan_measured_below_its_prediction_once_is_not_grown(monkeypatch, tmp_path):
    """One low measurement (a load spike on the dense network's turn reads the same as an over-prediction) is
    measured again over more rounds; measured as predicted there, the plan is kept as it was."""
    planned_calls = []

    def measure(self, rounds=3, **networks):
        ms = macs_as_ms(networks, self.example)
        if "planned" in networks:
            planned_calls.append(rounds)
            ms["dense"] *= 1.0 / 0.6 if len(planned_calls) == 1 else 1.0
        return ms

    plan = _plan_checked_by(measure, monkeypatch, tmp_path)
    checks = plan.details["checks"]
    assert planned_calls == [3, REMEASURE_ROUNDS] and len(checks) == 1
    assert checks[0]["measured"] == pytest.approx(checks[0]["predicted"], rel=1e-3) and plan.details["met"]


def test_an_int8_program_built_to_be_timed_is_not_held_to_the_conversion_check(monkeypatch):
    """The planner times int8 programs of networks nobody ships (the narrowest widths at random initialization, whose
    near-constant logits any kernel's rounding reorders: a ResNet-56 at 8 channels on an AVX2-only CPU), so a check
    that would refuse them does not stop the plan."""
    from lightning_compress.quantization import families
    from lightning_compress.quantization.check import ConversionError

    def refuse(*args, **kwargs):
        raise ConversionError("refused")

    monkeypatch.setattr(families, "check_conversion", refuse)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    batch = torch.randn(4, 3, 8, 8)
    program = runtime_program(net, batch, True, "onnxruntime", [batch])
    assert runtime_runner(program, "onnxruntime", 1)(batch.numpy())[0].shape == (4, 4, 8, 8)


@pytest.mark.slow
def test_executorch_plan_is_costed_by_onnxruntime_and_checked_on_the_program(tmp_path):
    """ExecuTorch: layers from onnxruntime's table, the model calibrated and the plan checked on XNNPACK programs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 4, 1)).eval()
    example = torch.randn(1, 3, 16, 16)
    run = runtime_runner(runtime_program(net, example.expand(8, -1, -1, -1), False, "executorch"), "executorch", 1)
    batch = torch.randn(8, 3, 16, 16)
    assert torch.allclose(torch.as_tensor(run(batch.numpy())), net(batch), atol=1e-4)  # the program computes net
    planner = TargetPlanner(net, example, Target("latency_ratio", 0.7), "executorch", batch_size=8, ignored=["4"],
                            round_to=8, table_path=tmp_path / "table.json", repeats=10)
    plan = planner.plan(net, [torch.randn(8, 3, 16, 16)], checks=1)
    model = plan.details["latency_model"]
    assert (model["runtime"], model["calibrated_on"]) == ("onnxruntime", "executorch")
    assert json.loads((tmp_path / "table.json").read_text())["machine"]["runtime"] == "onnxruntime"
    assert plan.widths != plan.dense_widths and 0 < plan.details["checks"][-1]["measured_ms"]
    assert plan.details["checks"][0]["dense_measured_ms"] == pytest.approx(model["references"]["dense"]["measured_ms"],
                                                                           rel=0.5)  # one runtime, one network


def test_target_arguments_are_checked():
    with pytest.raises(ValueError, match="give exactly one target of latency_ms, size_kb, got none"):
        Target.from_arguments(latency_ms=None, size_kb=None)
    with pytest.raises(ValueError, match="size_kb must be a positive number, got True"):
        Target.from_arguments(size_kb=True)


def test_an_int8_latency_ratio_is_of_the_fp32_dense_network_timed_beside(monkeypatch, tmp_path):
    """The user's baseline is the fp32 network they start from: an int8 plan's ratio divides by the fp32 dense
    network's milliseconds, measured in the calibration's rounds and beside every check, so a third of the dense
    latency is reachable with int8 where fp32 channel removal alone cannot reach it."""
    beside = []

    def measure(self, rounds=3, **networks):  # int8 programs at 0.4x their fp32 MACs; the fp32 dense at its MACs
        beside.append(networks["dense"] if "planned" in networks else None)
        ms = {name: 0.4 * float(count_macs_per_module(net, self.example).get("", 0))
              for name, net in networks.items() if isinstance(net, nn.Module)}
        dense_macs = float(count_macs_per_module(self.dense_network, self.example).get("", 0))
        if "dense_fp32" in networks:
            ms["dense_fp32"] = dense_macs
        if "planned" in networks:
            ms["dense"] = dense_macs
        return ms

    monkeypatch.setattr(TargetPlanner, "measure", measure)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 4, 1)).eval()
    planner = TargetPlanner(net, torch.randn(1, 3, 8, 8), Target("latency_ratio", 1 / 3), int8=True, ignored=["4"],
                            table_path=tmp_path / "table.json", repeats=2)
    assert isinstance(planner.ratio_reference, bytes)  # the fp32 dense program, not the int8 one
    assert planner.dense_value == pytest.approx(0.4, rel=1e-3)  # int8 dense: 0.4x the fp32 dense
    sensitivity = {group: {w: (planner.space.widths[group] - w) / 32 for w in planner.space.candidates(group, 8)}
                   for group in planner.space.widths}
    plan = planner.plan(net, [], sensitivity=sensitivity)
    assert plan.details["met"] and plan.predicted <= 1 / 3 < planner.dense_value
    assert plan.details["reference_ms"] == pytest.approx(planner.latency.baseline_ms)
    assert all(program is planner.ratio_reference for program in beside if program is not None) and any(beside)
    check = plan.details["checks"][-1]
    assert check["dense_measured_ms"] == pytest.approx(planner.latency.baseline_ms)


def test_factorized_shapes_are_the_layers_factorize_layer_builds():
    net = create_model("resnet20", num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    space = channel_space(net, example, ignored=["fc"])
    ranks = {"layer3.0.conv1": 16, "layer2.1.conv2": 8}  # the first one strided
    assert factored_shapes(space.shapes(space.widths), ranks) == layer_shapes(factored_copy(net, ranks), example)
    layers = space.layers
    assert rank_candidates(layers["layer3.1.conv1"], 8) == [16, 32]  # a quarter and a half of 64
    assert rank_candidates(layers["layer1.0.conv1"], 8) == [8]  # a quarter of 16 is below one multiple of 8
    assert rank_candidates(layers["conv1"], 8) == [] and rank_candidates(layers["fc"], 8) == []


def test_rank_sensitivity_grows_as_the_rank_falls():
    net, inputs, _ = _resnet20_with_inputs()
    costs = rank_sensitivity(net, inputs, {"layer3.1.conv1": [8, 32]})
    assert costs["layer3.1.conv1"][8] > costs["layer3.1.conv1"][32] > 0.0


def test_a_factorizing_plan_is_checked_on_the_factorized_network(monkeypatch, tmp_path):
    """Costed by MACs (a stand-in table and clock), ranks let the widths stay wider at the same budget; the check
    builds and measures the factorized network, which measures what was predicted."""
    measured = []

    def measure(self, rounds=3, **networks):
        ms = macs_as_ms(networks, self.example)
        if "planned" in networks:
            measured.append(ms["planned"] / ms["dense"])
        return ms

    monkeypatch.setattr(TargetPlanner, "measure", measure)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    net, inputs, _ = _resnet20_with_inputs()
    planner = TargetPlanner(net, inputs[0][:1], Target("latency_ratio", 0.4), ignored=["fc"],
                            table_path=tmp_path / "table.json", repeats=2)
    # channels dear (each group's cut fraction), ranks as measured (a random network loses little to them)
    sensitivity = channels_dear(net, inputs, planner.space, 8)
    plain = planner.plan(net, inputs, sensitivity=sensitivity)
    factorized = planner.plan(net, inputs, sensitivity=sensitivity, factorize=True)
    assert factorized.ranks and not plain.ranks and factorized.details["met"]
    assert factorized.sensitivity < plain.sensitivity
    assert measured[-1] == pytest.approx(factorized.predicted, rel=1e-6)
    assert Plan.from_dict(factorized.as_dict()) == factorized


def test_a_ratio_plans_prediction_error_is_measured_beside_the_dense_network(monkeypatch, tmp_path):
    """The machine runs twice as slow at the check as at the calibration: the plan's ratio error is the ratio's
    (0), not the milliseconds' (+100 %): the dense network timed beside it carries the load."""
    def measure(self, rounds=3, **networks):  # milliseconds = MACs at calibration, twice that at the checks
        load = 2.0 if "planned" in networks else 1.0
        return {name: load * float(count_macs_per_module(net, self.example).get("", 0))
                for name, net in networks.items()}

    monkeypatch.setattr(TargetPlanner, "measure", measure)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    net, inputs, _ = _resnet20_with_inputs()
    planner = TargetPlanner(net, inputs[0][:1], Target("latency_ratio", 0.5), ignored=["fc"],
                            table_path=tmp_path / "table.json", repeats=2)
    plan = planner.plan(net, inputs)
    assert plan.details["prediction_error"] == pytest.approx(0.0, abs=1e-6)
    assert plan.details["predicted_ms"] / plan.details["measured_ms"] == pytest.approx(0.5, rel=1e-6)
