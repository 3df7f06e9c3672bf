"""Every callback on a network compiled with ``torch.compile``: each effect checked, and the checkpoints.

Most tests compile with ``backend="eager"``: dynamo captures the network as ``torch.compile`` does (guards,
recompiles after structural changes, the ``OptimizedModule`` wrapper and its ``_orig_mod.`` state-dict keys)
without Inductor's C++ build time; one test uses the default Inductor backend.
"""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.ao.nn.quantized as nnq
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import (
    ChannelPruning,
    CompressionReport,
    CompressToTarget,
    ImageClassifier,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_compress.cli import main
from lightning_compress.core.accounting import count_macs
from lightning_compress.core.architecture import restore_architecture
from lightning_compress.core.layers import is_compiled, unwrap_compiled
from lightning_compress.core.onnx import OnnxRuntimeNetwork
from lightning_compress.quantization.prepare import is_prepared
from tests.toy import ToyConvNet, UserClassifier, channels_dear, random_loader

BACKEND = "eager"
X = torch.randn(8, 3, 16, 16)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Forget earlier compilations: each test builds ToyConvNets anew, and past dynamo's recompile limit for
    ``ToyConvNet.forward`` (8) a compiled network would silently run eagerly."""
    torch._dynamo.reset()
    yield


def compiled_classifier(backend: str = BACKEND, in_place: bool = False) -> UserClassifier:
    torch.manual_seed(0)
    model = UserClassifier()
    if in_place:
        model.net.compile(backend=backend)
    else:
        model.net = torch.compile(model.net, backend=backend)
    return model


def fit(model: pl.LightningModule, callbacks, steps: int = 6, **kwargs) -> pl.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "max_steps": steps,
               "num_sanity_val_steps": 0, "limit_val_batches": 0}
    trainer = pl.Trainer(callbacks=list(callbacks), **{**options, **kwargs})
    trainer.fit(model, random_loader())
    return trainer


def macs_ratio(network: nn.Module) -> float:
    return count_macs(unwrap_compiled(network).eval(), (X,)) / count_macs(ToyConvNet().eval(), (X,))


def assert_runs_what_it_wraps(network: nn.Module) -> None:
    """The compiled wrapper computes what the (changed) module inside computes: no stale graph."""
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(network(X), network._orig_mod(X))


# ------------------------------------------------------------------------------------------ each callback
def test_magnitude_pruning_reaches_its_sparsity_with_patterns_in_the_uncompiled_names():
    model = compiled_classifier()
    fit(model, [MagnitudePruning(final_sparsity=0.5, include="net.conv*")])
    weights = torch.cat([model.net.conv1.weight.flatten(), model.net.conv2.weight.flatten()])
    assert float((weights == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert float((model.net.stem.weight == 0).float().mean()) == 0.0  # not included
    assert is_compiled(model.net)
    assert_runs_what_it_wraps(model.net)


def test_channel_pruning_reaches_its_macs_ratio_and_the_wrapper_recompiles():
    model = compiled_classifier()
    trainer = fit(model, [ChannelPruning(kept_macs_ratio=0.5, update_every="2steps", round_to=1)])
    assert macs_ratio(model.net) <= 0.52
    assert float(trainer.callback_metrics["macs/ratio"]) == pytest.approx(macs_ratio(model.net))
    assert model.net.conv1.out_channels < 16
    assert_runs_what_it_wraps(model.net)


def test_low_rank_factorization_reaches_its_macs_ratio():
    model = compiled_classifier()
    trainer = fit(model, [LowRankFactorization(kept_macs_ratio=0.6)])
    assert macs_ratio(model.net) <= 0.62
    assert float(trainer.callback_metrics["macs/ratio"]) == pytest.approx(macs_ratio(model.net))
    assert not isinstance(model.net.conv2, nn.Conv2d)  # replaced by its factors
    assert_runs_what_it_wraps(model.net)


@pytest.mark.parametrize("factorize", [False, True], ids=["channels", "channels_and_ranks"])
def test_compress_to_target_meets_its_plan_and_the_wrapper_recompiles(factorize, monkeypatch):
    from lightning_compress.planning import target as target_module

    if factorize:  # every channel cut priced dear: the plan factorizes, at the callback's end
        monkeypatch.setattr(target_module, "width_sensitivity", channels_dear)
    model = compiled_classifier()
    target = CompressToTarget(macs_ratio=0.5, start=0.0, end="2steps", update_every=1, round_to=2,
                              factorize=factorize)
    fit(model, [target])
    assert macs_ratio(model.net) <= 0.5 and target.plan.predicted <= 0.5
    assert bool(target.plan.ranks) == factorize
    assert isinstance(model.net.conv1, nn.Conv2d) != factorize  # replaced by its factors when planned so
    assert is_compiled(model.net)
    assert_runs_what_it_wraps(model.net)


@pytest.mark.slow
def test_an_int8_latency_plan_with_the_7bit_engine_ships_its_file_from_a_compiled_network(tmp_path):
    """CompressToTarget plans for int8 layers timed with 7-bit weights, removes channels through the compiled
    wrapper, and QAT (the 7-bit engine) ships the QDQ file; the shipped file is what the callback measured."""
    torch.manual_seed(0)
    model = UserClassifier()
    model.net = torch.compile(ToyConvNet(num_classes=4, width=32), backend=BACKEND)  # wide enough to time apart
    target = CompressToTarget(latency_ratio=0.8, start=0.0, end="3steps", update_every=1, round_to=4, batch_size=64,
                              table_path=str(tmp_path / "table.json"), repeats=10)
    trainer = fit(model, [target, QuantizationAwareTraining(engine="onnxruntime_7bit", start="5steps")], steps=8)
    assert target.plan.int8 and isinstance(model.net, OnnxRuntimeNetwork)
    entries = json.loads((tmp_path / "table.json").read_text())["entries"]
    assert entries and all(key.split()[0] in ("fp32", "int8w63") for key in entries), sorted(entries)[:3]
    assert 0 < target.measured["measured_ms"] and target.measured["target_ms"] == pytest.approx(
        0.8 * target.measured["dense_ms"])
    assert trainer.test(model, random_loader(), verbose=False)[0]["test_acc"] > 0.3


def is_int8(network: nn.Module, engine: str) -> bool:
    """torch's int8 modules in place (x86), or the QDQ ONNX file run by onnxruntime (the default engine)."""
    return isinstance(network, OnnxRuntimeNetwork) if engine == "onnxruntime" else (
        isinstance(network.conv1, nnq.Conv2d) and not is_prepared(network))


@pytest.mark.parametrize("engine", ["onnxruntime", "x86"])
@pytest.mark.parametrize("in_place", [False, True], ids=["torch.compile(net)", "net.compile()"])
def test_quantization_aware_training_ends_with_int8_in_place_and_test_runs_it(in_place, engine, caplog):
    model = compiled_classifier(in_place=in_place)
    with caplog.at_level(logging.INFO):
        trainer = fit(model, [QuantizationAwareTraining(start="2steps", engine=engine)], steps=8)
    assert is_int8(model.net, engine)
    assert not is_compiled(model.net)
    assert "'net' was compiled with torch.compile; its quantized version runs uncompiled" in caplog.text
    assert trainer.test(model, random_loader(), verbose=False)[0]["test_acc"] > 0.4


@pytest.mark.parametrize("engine", ["onnxruntime", "x86"])
@pytest.mark.parametrize("in_place", [False, True], ids=["torch.compile(net)", "net.compile()"])
def test_post_training_quantization_ends_with_int8_in_place_and_test_runs_it(in_place, engine, caplog):
    model = compiled_classifier(in_place=in_place)
    with caplog.at_level(logging.INFO):
        trainer = fit(model, [PostTrainingQuantization(calibration_batches=2, skip="net.fc", engine=engine)], steps=8)
    assert is_int8(model.net, engine)
    if engine == "x86":
        assert isinstance(model.net.fc, nn.Linear)  # skip by user name
    assert "runs uncompiled" in caplog.text
    assert trainer.test(model, random_loader(), verbose=False)[0]["test_acc"] > 0.4


def test_knowledge_distillation_logs_its_metrics():
    model = compiled_classifier()
    trainer = fit(model, [KnowledgeDistillation(teacher="self")])
    metrics = trainer.callback_metrics
    for name in ("distill/kd_loss", "distill/task_loss", "distill/agreement", "distill/alpha"):
        assert torch.isfinite(metrics[name]), name
    assert 0.0 <= float(metrics["distill/agreement"]) <= 1.0
    assert is_compiled(model.net)


def test_compression_report_is_written_and_measures_the_pruned_network(tmp_path):
    model = compiled_classifier()
    fit(model, [MagnitudePruning(final_sparsity=0.5), CompressionReport(dirpath=str(tmp_path), latency_repeats=1,
                                                                        latency_batch_sizes=(1,))])
    summary = json.loads((tmp_path / "compression_report.json").read_text())
    assert (tmp_path / "compression_report.md").is_file()
    assert summary["totals"]["macs_ratio"] == 1.0  # masking keeps every MAC
    assert summary["totals"]["layer_sparsity"] == pytest.approx(0.5 * (1152 + 2304) / 3740, abs=0.01)  # conv1, conv2


# ------------------------------------------------------------------------------------ refusals up front
class _Steps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


@pytest.mark.parametrize("callback", [QuantizationAwareTraining, PostTrainingQuantization])
def test_a_compiled_submodule_is_refused_before_training_naming_torch_compile_and_the_remedy(callback):
    model = UserClassifier()
    model.net.conv2 = torch.compile(model.net.conv2, backend=BACKEND)
    steps = _Steps()
    with pytest.raises(ValueError, match=r"'net.conv2': it is wrapped by torch.compile.*net.conv2.compile\(\).*"
                                         r"skip=\['net.conv2'\]"):
        fit(model, [callback(), steps])
    assert steps.steps == 0
    fit(model, [callback(skip="net.conv2", engine="x86")], steps=2)  # the remedy the message names
    assert isinstance(model.net.conv1, nnq.Conv2d) and is_compiled(model.net.conv2)


# ------------------------------------------------------------------------------------------ checkpoints
def _fit_qat_with_checkpoints(directory, ckpt_path=None) -> UserClassifier:
    model = compiled_classifier()
    qat = QuantizationAwareTraining(start="5steps", freeze_bn="9steps", convert_on_fit_end=False)
    # checkpoints at epoch ends (4 batches an epoch): the plain loader is not resumable mid-epoch
    checkpoints = ModelCheckpoint(dirpath=directory, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=12, callbacks=[qat, checkpoints])
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return model


def test_qat_resumes_exactly_into_a_compiled_module_from_before_and_inside_its_window(tmp_path):
    full = _fit_qat_with_checkpoints(tmp_path / "full")
    before = torch.load(tmp_path / "full" / "step=4.ckpt", weights_only=True)["state_dict"]
    inside = torch.load(tmp_path / "full" / "step=8.ckpt", weights_only=True)["state_dict"]
    assert "net._orig_mod.conv1.weight" in before  # torch's naming inside the wrapper, before QAT starts
    assert "net.conv1.weight" in inside  # the prepared network runs uncompiled
    expected = full.state_dict()
    for step in (4, 8):
        resumed = _fit_qat_with_checkpoints(tmp_path / f"from{step}", tmp_path / "full" / f"step={step}.ckpt")
        got = resumed.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected), step


def test_image_classifier_qat_checkpoint_reloads_and_exports(tmp_path):
    model = ImageClassifier("resnet20", num_classes=4)
    model.model = torch.compile(model.model, backend=BACKEND)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit(model, [QuantizationAwareTraining(start=0.5), checkpoints], steps=4, enable_checkpointing=True)
    path = tmp_path / "last.ckpt"
    loaded = ImageClassifier.load_from_checkpoint(path)  # no callback: the QAT record is replayed
    assert is_prepared(loaded.model)
    checkpoint = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in checkpoint["state_dict"].items())
    main(["export", str(path), "--to", str(tmp_path / "export"), "--only", "packed"])
    assert (tmp_path / "export" / "weights.lcpk").is_file()


def test_in_place_compile_keeps_checkpoints_loadable_into_an_uncompiled_module(tmp_path):
    for in_place in (True, False):
        model = compiled_classifier(in_place=in_place)
        trainer = fit(model, [MagnitudePruning(final_sparsity=0.5)], steps=2)
        trainer.save_checkpoint(tmp_path / "model.ckpt")
        if in_place:
            loaded = UserClassifier.load_from_checkpoint(tmp_path / "model.ckpt")
            assert torch.equal(loaded.net.conv2.weight, model.net.conv2.weight)
        else:  # torch names the wrapper's tensors net._orig_mod.*, which an uncompiled module does not have
            with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"net._orig_mod.stem.weight"):
                UserClassifier.load_from_checkpoint(tmp_path / "model.ckpt")


@pytest.mark.parametrize("callback", [lambda: ChannelPruning(kept_macs_ratio=0.5, update_every="2steps", round_to=1),
                                      lambda: LowRankFactorization(kept_macs_ratio=0.6)], ids=["channel", "low_rank"])
def test_architecture_records_of_a_compiled_network_replay_onto_an_uncompiled_one(callback, tmp_path):
    model = compiled_classifier()
    trainer = fit(model, [callback()], steps=2)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    x = torch.randn(2, 3, 16, 16)
    expected = model.eval()(x)
    for fresh in (UserClassifier(), compiled_classifier()):  # both ways: the keys follow the module
        checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=True)
        restore_architecture(fresh, checkpoint)
        fresh.load_state_dict(checkpoint["state_dict"])
        assert torch.allclose(fresh.eval()(x), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- inductor
@pytest.mark.slow
def test_qat_on_a_network_compiled_with_the_default_inductor_backend():
    model = compiled_classifier(backend="inductor")
    trainer = fit(model, [QuantizationAwareTraining(start="2steps", engine="x86")], steps=8)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the fp32 steps ran compiled
    assert isinstance(model.net.conv1, nnq.Conv2d) and not is_compiled(model.net)
    assert trainer.test(model, random_loader(), verbose=False)[0]["test_acc"] > 0.4
