"""CompressToTarget in real Trainers: plans at its start, removes channels to the plan, refuses an
unreachable target before the first step, measures the shipped network after fit, resumes and reloads."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import onnx
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress import CompressionReport, CompressToTarget, QuantizationAwareTraining, quantization
from lightning_compress.core.accounting import count_macs
from lightning_compress.core.architecture import restore_architecture
from lightning_compress.planning import UnreachableTargetError
from lightning_compress.planning import callback as callback_module
from lightning_compress.planning import target as target_module
from lightning_compress.planning.latency import LatencyTable
from lightning_compress.planning.target import TargetPlanner
from lightning_compress.report import is_int8
from tests.composition.modules import DictBatchModule, dict_loader
from tests.events import read_scalars, read_texts
from tests.toy import ToyConvNet, UserClassifier, channels_dear, random_loader

STEPS = 8


def fit(module, callbacks, tmp_path, precision="32-true", val=True, logger=False, ckpt_path=None, steps=STEPS):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", precision=precision, callbacks=[*callbacks, checkpoint],
                         logger=logger, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=4)
    loaders = (random_loader(), random_loader(seed=1)) if val else (random_loader(),)
    trainer.fit(module, *loaders, ckpt_path=ckpt_path)
    return trainer


def test_macs_target_is_met_and_checkpoint_reloads_without_callbacks(tmp_path):
    torch.manual_seed(0)
    module = UserClassifier()
    example = torch.randn(1, 3, 16, 16)
    dense = count_macs(module.net, example)
    target = CompressToTarget(macs_ratio=0.5, start=0.0, end="4steps", update_every=2, round_to=4)
    fit(module, [target], tmp_path)
    assert count_macs(module.net, example) <= 0.5 * dense
    assert target.plan.predicted <= 0.5
    assert {name: module.net.get_submodule(name).out_channels for name in target.plan.widths} == target.plan.widths
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["callbacks"]  # the plan is plain data in the callback state


def test_a_factorizing_plan_factorizes_at_end_and_the_checkpoint_reloads_and_resumes(monkeypatch, tmp_path):
    """``factorize=True``: the planned ranks are factorized after the last channel removal (optimizer state moved
    onto the factors); the network meets the plan's MACs; a fresh module rebuilds it from the checkpoint's records,
    and a fit resumed after the factorization ends where the uninterrupted one did."""
    monkeypatch.setattr(target_module, "width_sensitivity", channels_dear)
    example = torch.randn(1, 3, 16, 16)

    def run(folder, steps=12, ckpt_path=None):  # four batches an epoch, unshuffled
        torch.manual_seed(0)
        module = UserClassifier()
        target = CompressToTarget(macs_ratio=0.4, start=0.0, end="4steps", update_every=2, round_to=4, factorize=True)
        fit(module, [target], folder, val=False, ckpt_path=ckpt_path, steps=steps)
        return module, target

    dense = count_macs(UserClassifier().net, example)
    module, target = run(tmp_path / "straight")
    assert target.plan.ranks and target.plan.details["factorize"]
    for name, rank in target.plan.ranks.items():
        block = module.net.get_submodule(name)
        assert isinstance(block, torch.nn.Sequential) and block[1].in_channels == min(rank, block[0].in_channels)
    assert count_macs(module.net, example) / dense == pytest.approx(target.plan.predicted, rel=1e-6)
    checkpoint = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    fresh = UserClassifier()
    restore_architecture(fresh, checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.allclose(fresh.eval()(example), module.eval()(example), atol=1e-5)
    run(tmp_path / "part", steps=8)  # stopped at the end of the epoch after the factorization (step 4)
    resumed, _ = run(tmp_path / "resumed", ckpt_path=tmp_path / "part" / "last.ckpt")
    for key, value in module.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_factorize_beside_another_layer_swap_or_an_early_mask_is_refused_before_the_first_step(tmp_path):
    from lightning_compress import LowRankFactorization, MagnitudePruning

    module = UserClassifier()
    before = {key: value.clone() for key, value in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"CompressToTarget\(factorize=True\) plans the factorizations itself"):
        fit(module, [CompressToTarget(macs_ratio=0.5, end="4steps", factorize=True),
                     LowRankFactorization(kept_macs_ratio=0.5, start=0.9)], tmp_path)  # windows apart
    with pytest.raises(ValueError, match="MagnitudePruning starts masking at step 0, but CompressToTarget replaces "
                                         "layers until step 4"):
        fit(module, [CompressToTarget(macs_ratio=0.5, end="4steps", factorize=True),
                     MagnitudePruning(final_sparsity=0.5)], tmp_path)
    assert all(torch.equal(value, before[key]) for key, value in module.state_dict().items())


def test_uniform_allocation_plans_one_fraction_and_records_both_sensitivities(tmp_path):
    torch.manual_seed(0)
    module = UserClassifier()
    example = torch.randn(1, 3, 16, 16)
    dense = count_macs(module.net, example)
    target = CompressToTarget(macs_ratio=0.5, allocation="uniform", start=0.0, end="4steps", update_every=2, round_to=4)
    fit(module, [target], tmp_path)
    assert target.plan.details["allocation"] == "uniform" and count_macs(module.net, example) <= 0.5 * dense
    kept = {target.plan.widths[g] / target.plan.dense_widths[g] for g in target.plan.widths}
    assert max(kept) - min(kept) <= 4 / min(target.plan.dense_widths.values())  # one fraction, up to rounding


class HeldOutData(pl.LightningDataModule):
    """Training and validation images apart (two seeds), as a DataModule holding out a validation split defines."""

    def train_dataloader(self):
        return random_loader(seed=0)

    def val_dataloader(self):
        return random_loader(seed=1)


@pytest.mark.parametrize("validates", [True, False], ids=["limit_val_batches=2", "limit_val_batches=0"])
def test_sensitivity_is_measured_on_the_validation_loader_also_when_the_trainer_does_not_validate(
        monkeypatch, tmp_path, validates):
    """The DataModule's validation images score the cuts, whether the Trainer validates or not; only without a
    validation loader at all does the current training batch stand in, with a warning."""
    seen = []

    def record(network, inputs, space, round_to, importance="l1"):
        seen.extend(inputs)
        return channels_dear(network, inputs, space, round_to, importance)

    monkeypatch.setattr(target_module, "width_sensitivity", record)
    held_out = torch.cat([images for images, _ in random_loader(seed=1)][:2])
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=2 if validates else 0)
    trainer.callbacks.append(CompressToTarget(macs_ratio=0.5, start=0.0, end="4steps", update_every=2, round_to=4,
                                              sensitivity_batches=2))
    trainer.fit(UserClassifier(), datamodule=HeldOutData())
    assert torch.equal(torch.cat(seen), held_out)

    seen.clear()
    with pytest.warns(UserWarning, match="no validation loader; channel sensitivity is measured on the current"):
        fit(UserClassifier(), [CompressToTarget(macs_ratio=0.5, start=0.0, end="4steps", update_every=2, round_to=4)],
            tmp_path, val=False)
    assert torch.equal(torch.cat(seen), next(iter(random_loader()))[0])


@pytest.mark.slow
def test_latency_target_plans_measures_and_logs(tmp_path):
    torch.manual_seed(0)
    module = UserClassifier()
    module.net = ToyConvNet(num_classes=4, width=32)  # wide enough that convolutions dominate its latency
    # a batch of 64: milliseconds, well above the timer's noise on this tiny network
    target = CompressToTarget(latency_ratio=0.7, start=0.0, end="4steps", update_every=2, round_to=4, batch_size=64,
                              table_path=str(tmp_path / "table.json"), repeats=20)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(module, [target], tmp_path, logger=logger)
    assert (tmp_path / "table.json").is_file()
    assert target.plan.details["predicted_ms"] > 0 and target.measured["measured_ms"] > 0
    scalars = read_scalars(logger.log_dir)
    assert {"plan/predicted", "plan/measured_ms", "plan/predicted_ms", "plan/prediction_error"} <= set(scalars)
    assert "plan/widths" in read_texts(logger.log_dir)


def test_the_shipped_latency_is_compared_at_the_dense_latency_timed_beside_it(monkeypatch, tmp_path):
    """The machine twice as busy after fit as when the latency model was calibrated (first batch): the prediction, a
    fraction of the dense network's, is compared at the dense network's time measured beside the shipped one, so
    the load is not counted as prediction error."""
    load = {"factor": 1.0}

    def measure(self, rounds=3, **networks):  # milliseconds: the network's MACs times the machine's load
        return {name: load["factor"] * count_macs(network, self.example) for name, network in networks.items()}

    class BusierAfterTraining(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            load["factor"] = 2.0

    monkeypatch.setattr(TargetPlanner, "measure", measure)  # and a table that costs MACs (no timing noise)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    torch.manual_seed(0)
    module = UserClassifier()
    example = torch.randn(1, 3, 16, 16)
    dense = count_macs(module.net, example)
    target = CompressToTarget(latency_ratio=0.6, start=0.0, end="4steps", update_every=2, round_to=4,
                              table_path=str(tmp_path / "table.json"))
    fit(module, [target, BusierAfterTraining()], tmp_path)
    measured = target.measured
    assert measured["dense_ms"] == pytest.approx(2.0 * dense)
    assert measured["measured_ms"] == pytest.approx(2.0 * count_macs(module.net, example))
    assert measured["target_ms"] == pytest.approx(0.6 * 2.0 * dense)
    assert measured["prediction_error"] == pytest.approx(0.0, abs=0.02)  # compared with the calibration: -50 %


def test_a_shipped_network_measuring_above_the_target_is_measured_again_before_it_is_reported(monkeypatch, tmp_path):
    """A load spike during the 3-round fit-end measurement makes the shipped network read 1.5x its time; above the
    target it is measured again over 7 rounds (as the plan's checks are), and the 7-round reading is reported."""
    calls = []

    def measure(self, rounds=3, **networks):  # milliseconds = MACs; the shipped network spiked in 3-round readings
        calls.append((sorted(networks), rounds))
        spike = {"shipped": 1.5 if rounds == 3 else 1.0}
        return {name: spike.get(name, 1.0) * count_macs(network, self.example) for name, network in networks.items()}

    monkeypatch.setattr(TargetPlanner, "measure", measure)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    torch.manual_seed(0)
    module = UserClassifier()
    example = torch.randn(1, 3, 16, 16)
    target = CompressToTarget(latency_ratio=0.6, start=0.0, end="4steps", update_every=2, round_to=4,
                              table_path=str(tmp_path / "table.json"))
    fit(module, [target], tmp_path)
    assert [rounds for names, rounds in calls if "shipped" in names] == [3, 7]
    assert target.measured["rounds"] == 7
    assert target.measured["measured_ms"] == pytest.approx(count_macs(module.net, example))
    assert target.measured["measured_ms"] <= target.measured["target_ms"]


def _planned_then_resumed(monkeypatch, tmp_path, slimmed_before_fit=False):
    """Plan in a first fit (milliseconds = MACs), resume it from the last checkpoint with every timing on the runtime
    recorded (milliseconds = the program's size in kB): the first callback, the resumed one and the timed programs."""
    def measure(self, rounds=3, **networks):  # the planning process: milliseconds = MACs
        return {name: float(count_macs(network, self.example)) for name, network in networks.items()}

    timed = {}

    def timed_programs(programs, runtime, threads, array, repeats, rounds=3):
        timed.update(programs)
        return {name: len(program) / 1000 for name, program in programs.items()}

    monkeypatch.setattr(TargetPlanner, "measure", measure)
    monkeypatch.setattr(LatencyTable, "network_ms", lambda self, shapes, int8: sum(s.macs() for s in shapes.values()))
    monkeypatch.setattr(callback_module, "timed_programs", timed_programs)
    arguments = {"latency_ratio": 0.6, "start": 0.0, "end": "4steps", "update_every": 2, "round_to": 4,
                 "table_path": str(tmp_path / "table.json"), "repeats": 3}
    torch.manual_seed(0)
    first = CompressToTarget(**arguments)
    fit(UserClassifier(), [first], tmp_path, steps=5)
    resumed, module = CompressToTarget(**arguments), UserClassifier()
    if slimmed_before_fit:  # the user rebuilt the slimmed network from the checkpoint before resuming
        restore_architecture(module, torch.load(tmp_path / "last.ckpt", weights_only=True))
    fit(module, [resumed], tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.plan.widths == first.plan.widths and resumed._planner is None
    return first, resumed, timed


def test_a_fit_resumed_after_planning_times_the_dense_network_beside_the_shipped_one(monkeypatch, tmp_path):
    """The resumed process has the plan (callback state) and the network as built before the checkpoint slimmed it:
    that dense network is timed beside the shipped one, and the prediction carried to its time."""
    first, resumed, timed = _planned_then_resumed(monkeypatch, tmp_path)
    convs = [tuple(m.weight.shape) for m in UserClassifier().net.modules() if isinstance(m, torch.nn.Conv2d)]
    exported = [tuple(t.dims) for t in onnx.load_from_string(timed["dense"]).graph.initializer if len(t.dims) == 4]
    assert sorted(exported) == sorted(convs)  # the dense widths, not the plan's
    measured, details = resumed.measured, first.plan.details
    assert measured["dense_ms"] == len(timed["dense"]) / 1000 > measured["measured_ms"]
    assert measured["predicted_ms"] == pytest.approx(details["predicted_ms"] / details["reference_ms"]
                                                     * measured["dense_ms"])
    assert measured["target_ms"] == pytest.approx(0.6 * measured["dense_ms"])


def test_a_network_slimmed_before_the_resumed_fit_is_not_taken_for_the_dense_one(monkeypatch, tmp_path):
    """A module rebuilt slimmed before ``fit(ckpt_path=...)`` has no dense network at ``setup``: the shipped network
    is timed alone, against the plan's absolute prediction."""
    first, resumed, timed = _planned_then_resumed(monkeypatch, tmp_path, slimmed_before_fit=True)
    measured = resumed.measured
    assert sorted(timed) == ["shipped"] and "dense_ms" not in measured and measured["measured_ms"] > 0
    assert measured["predicted_ms"] == first.plan.details["predicted_ms"]
    assert measured["target_ms"] == pytest.approx(0.6 * first.plan.details["dense_predicted_ms"])


def test_unreachable_target_is_refused_before_the_first_step(tmp_path):
    module = UserClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    target = CompressToTarget(macs_ratio=0.01, start=0.0, end="4steps", update_every=2, round_to=4)
    with pytest.raises(UnreachableTargetError, match=r"macs_ratio=0.01 cannot be reached.*ask for 0\.\d+ x dense or more"):
        fit(module, [target], tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"give exactly one target of latency_ms, latency_ratio, size_kb, macs_ratio, got none"),
    ({"latency_ms": 1.0, "size_kb": 3.0}, r"give exactly one target"),
    ({"latency_ratio": 1.5}, r"latency_ratio must be in \(0, 1\), got 1.5"),
    ({"latency_ms": -1.0}, r"latency_ms must be a positive number, got -1.0"),
    ({"latency_ms": 1.0, "runtime": "tensorrt"},
     r"runtime must be one of \('onnxruntime', 'openvino', 'executorch'\), got 'tensorrt'"),
    ({"latency_ms": 1.0, "batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ({"macs_ratio": 0.5, "allocation": "netadapt"},
     r"allocation must be one of \('sensitivity', 'uniform', 'greedy'\), got 'netadapt'"),
    ({"latency_ms": 1.0, "importance": "taylor"}, r"importance='taylor' needs gradients.*'l1', 'l2', 'bn_scale'"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressToTarget(**kwargs)


def test_int8_plan_with_qat_measures_the_shipped_onnx_file(tmp_path):
    torch.manual_seed(0)
    module = DictBatchModule()
    module.backbone = ToyConvNet(num_classes=4, width=32)
    target = CompressToTarget(latency_ratio=0.8, start=0.0, end="3steps", update_every=1, round_to=4, batch_size=64,
                              table_path=str(tmp_path / "table.json"), repeats=10)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    # the report listed first: whichever tears down first, both hold the one measurement of the shipped file
    report = CompressionReport(dirpath=str(tmp_path / "report"), latency_batch_sizes=())
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[report, target, QuantizationAwareTraining(start="5steps"),
                                                                checkpoint])
    trainer.fit(module, dict_loader())
    assert target.plan.int8 and is_int8(module.backbone)
    assert target.measured["measured_ms"] > 0
    written = json.loads((tmp_path / "report" / "compression_report.json").read_text())
    assert written["plans"] == [{"plan": target.plan.as_dict(), "runtime": "onnxruntime", "batch_size": 64,
                                 "threads": 1, "measured": target.measured}]
    markdown = (tmp_path / "report" / "compression_report.md").read_text()
    assert "Planned by CompressToTarget for onnxruntime, batch 64, 1 thread(s): target latency_ratio = 0.8" in markdown
    assert f"Shipped network measured {target.measured['measured_ms']:.4g} ms against the target " in markdown


def test_int8_plan_measures_the_qdq_file_export_ships_when_qat_does_not_convert(tmp_path, monkeypatch):
    """``QuantizationAwareTraining(convert_on_fit_end=False)`` leaves the network prepared: the QDQ file built from
    it (what ``lightning-compress export`` ships) is measured beside the fp32 dense network. With the 7-bit engine
    the latency table times layers with 7-bit weights (its own entries) and the checks time that engine's file."""
    torch.manual_seed(0)
    module = DictBatchModule()
    module.backbone = ToyConvNet(num_classes=4, width=32)
    target = CompressToTarget(latency_ratio=0.8, start=0.0, end="3steps", update_every=1, round_to=4, batch_size=64,
                              table_path=str(tmp_path / "table.json"), repeats=10)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[target, QuantizationAwareTraining(engine="onnxruntime_7bit", start="5steps",
                                                                      convert_on_fit_end=False)])
    engines = []
    quantize_static = quantization.quantize_static

    def timed_int8_program(*args, **kwargs):
        engines.append(kwargs["engine"])
        return quantize_static(*args, **kwargs)

    monkeypatch.setattr(quantization, "quantize_static", timed_int8_program)
    trainer.fit(module, dict_loader())
    assert target.plan.int8 and not is_int8(module.backbone)
    entries = json.loads((tmp_path / "table.json").read_text())["entries"]
    assert entries and all(key.split()[0] in ("fp32", "int8w63") for key in entries), sorted(entries)[:3]
    assert engines and set(engines) == {"onnxruntime_7bit"}  # the calibration's and the checks' int8 programs
    measured = target.measured
    assert measured["measured_ms"] > 0 and measured["target_ms"] == pytest.approx(0.8 * measured["dense_ms"])


@pytest.mark.slow
@pytest.mark.extended  # ~2-3 min: six lowerings with PT2E int8 (the fp32 ExecuTorch plan runs in CI)
def test_int8_plan_for_executorch_measures_the_shipped_program(tmp_path):
    torch.manual_seed(0)
    module = DictBatchModule()
    module.backbone = ToyConvNet(num_classes=4, width=32)
    target = CompressToTarget(latency_ratio=0.8, runtime="executorch", start=0.0, end="3steps", update_every=1,
                              round_to=4, batch_size=16, table_path=str(tmp_path / "table.json"), repeats=10)
    qat = QuantizationAwareTraining(engine="xnnpack", start="5steps")
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[target, qat])
    trainer.fit(module, dict_loader())
    assert target.plan.int8 and target.plan.details["latency_model"]["calibrated_on"] == "executorch"
    assert type(module.backbone).__name__ == "ExecuTorchNetwork" and is_int8(module.backbone)
    assert target.measured["measured_ms"] > 0 and target.plan.details["checks"][-1]["measured_ms"] > 0


def test_an_executorch_latency_target_needs_the_xnnpack_engine(tmp_path):
    target = CompressToTarget(latency_ratio=0.5, runtime="executorch", start=0.0, end="3steps", update_every=1)
    with pytest.raises(ValueError, match=r"runs the int8 program of the engines \('xnnpack',\); "
                                         r"QuantizationAwareTraining has engine='onnxruntime'"):
        fit(UserClassifier(), [target, QuantizationAwareTraining(start="5steps")], tmp_path)


def test_an_engine_onnxruntime_does_not_run_is_refused_for_an_onnxruntime_latency_target(tmp_path):
    target = CompressToTarget(latency_ratio=0.5, start=0.0, end="3steps", update_every=1, round_to=4)
    with pytest.raises(ValueError, match=r"engine='x86': train with one of "
                                         r"\('onnxruntime', 'onnxruntime_7bit', 'onnxruntime_symmetric'\)"):
        fit(UserClassifier(), [target, QuantizationAwareTraining(engine="x86", start="5steps")], tmp_path)
