"""Every pair of compression callbacks and the whole set, on ImageClassifier and on a user's dict-batch
module, under fp32 / bf16-mixed / 16-mixed: fit, test, and reload from a checkpoint without the callbacks.

What each case checks is what each technique promises: channels removed (fewer MACs), weights masked to
the target sparsity, the network converted to int8, the distillation loss logged; and the checkpoint
written mid-compression loads into a freshly built module (no callbacks) with exactly its weights.
"""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

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
from lightning_compress.core.accounting import count_macs
from lightning_compress.core.onnx import OnnxRuntimeNetwork
from lightning_compress.report import is_int8
from tests.composition.modules import DictBatchModule, dict_loader, same_entry
from tests.quantization.test_shipped_parity import int8_weight_codes
from tests.toy import ToyConvNet, channels_dear, random_loader

TECHNIQUES = ("channel", "magnitude", "qat", "kd")
COMBINATIONS = [pair for pair in itertools.combinations(TECHNIQUES, 2)] + [TECHNIQUES]
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
STEPS = 8


def make_callbacks(names, report_dir=None):
    """The callbacks of one combination; windows chosen so that every effect happens within 8 steps."""
    factories = {
        "channel": lambda: ChannelPruning(channel_ratio=0.5, start=0.0, end="2steps", update_every=1),
        "magnitude": lambda: MagnitudePruning(final_sparsity=0.5, start=0.0, end="4steps", update_every=1),
        # after a factorization (layers replaced by new parameters: a mask starts after it)
        "magnitude_late": lambda: MagnitudePruning(final_sparsity=0.5, start="3steps", end="4steps", update_every=1),
        "qat": lambda: QuantizationAwareTraining(start="5steps"),
        "qat_xnnpack": lambda: QuantizationAwareTraining(engine="xnnpack", start="5steps"),
        "qat_7bit": lambda: QuantizationAwareTraining(engine="onnxruntime_7bit", start="5steps"),
        "kd": lambda: KnowledgeDistillation(ToyConvNet(num_classes=4), alpha=0.5),
        "target": lambda: CompressToTarget(macs_ratio=0.5, start=0.0, end="2steps", update_every=1, round_to=2),
        "target_factorized": lambda: CompressToTarget(macs_ratio=0.5, start=0.0, end="2steps", update_every=1,
                                                      round_to=2, factorize=True),
    }
    callbacks = [factories[name]() for name in names]
    if report_dir is not None:
        callbacks.append(CompressionReport(dirpath=str(report_dir), latency_batch_sizes=(1,), latency_repeats=1))
    return callbacks


def make_module(kind):
    if kind == "image_classifier":
        return ImageClassifier("resnet20", num_classes=4, lr=0.05, lr_schedule="constant"), random_loader()
    return DictBatchModule(), dict_loader()


def network_of(module):
    return module.model if isinstance(module, ImageClassifier) else module.backbone


def fit(module, loader, callbacks, precision, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=STEPS)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", precision=precision, callbacks=[*callbacks, checkpoint],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    return trainer, tmp_path / "last.ckpt"


def check_case(kind, names, precision, tmp_path, report=False):
    torch.manual_seed(0)
    module, loader = make_module(kind)
    example = torch.randn(1, 3, 16, 16)
    dense_macs = count_macs(network_of(module), example)
    callbacks = make_callbacks(names, tmp_path / "report" if report else None)
    trainer, path = fit(module, loader, callbacks, precision, tmp_path)
    assert trainer.global_step == STEPS

    checkpoint = torch.load(path, weights_only=False)
    prefix = "model." if kind == "image_classifier" else "backbone."
    weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}

    # each technique's effect is there
    planned = {"target", "target_factorized"} & set(names)
    if "channel" in names or "target" in names:
        assert {r["kind"] for r in checkpoint["compression_architecture"]} >= {"channel_slimming"}
    if planned:
        assert count_macs(network_of(module).eval(), example) <= 0.5 * dense_macs or "qat" in names
    if "target_factorized" in names:
        assert {r["kind"] for r in checkpoint["compression_architecture"]} >= {"low_rank_factorization"}
    if {"magnitude", "magnitude_late"} & set(names):
        pruning = next(cb for cb in callbacks if isinstance(cb, MagnitudePruning))
        layers = [name[len(prefix):] for name in pruning._names]
        pruned = [weights[name] for name in layers]
        zeros = sum(int((w == 0).sum()) for w in pruned)
        assert zeros / sum(w.numel() for w in pruned) == pytest.approx(0.5, abs=0.02)
    if "qat" in names:
        assert is_int8(network_of(module))
        assert any("weight_fake_quant" in key for key in weights)
    if "qat_xnnpack" in names:  # ends as the ExecuTorch program it ships; the checkpoint holds the PT2E QAT graph
        assert is_int8(network_of(module)) and type(network_of(module)).__name__ == "ExecuTorchNetwork"
        assert any("activation_post_process" in key for key in weights), sorted(weights)[:5]
    if "qat_7bit" in names:  # ends as its QDQ ONNX file, every weight code on -63..63 after masks and slicing
        network = network_of(module)
        assert isinstance(network, OnnxRuntimeNetwork)
        codes = int8_weight_codes(network.program_bytes())
        assert codes and max(int(abs(c).max()) for c in codes) == 63
    if "kd" in names:
        assert torch.isfinite(trainer.callback_metrics["distill/kd_loss"])
    if report:
        assert (tmp_path / "report" / "compression_report.json").is_file()

    # reload without any callback: the records rebuild the architecture, the weights load strictly
    fresh, _ = make_module(kind)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    reloaded = network_of(fresh)
    if "channel" in names or planned:
        assert count_macs(reloaded.eval(), example) < 0.8 * dense_macs
    differing = [key for key, value in reloaded.state_dict().items()
                 if not same_entry(value, checkpoint["state_dict"][prefix + key])]
    assert differing == [], [(reloaded.state_dict()[k], checkpoint["state_dict"][prefix + k]) for k in differing[:2]]
    tester = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    fresh_again, test_loader = make_module(kind)
    results = tester.test(fresh_again, test_loader, ckpt_path=path, verbose=False)
    assert 0.0 <= results[0]["test/acc" if kind == "image_classifier" else "test_acc"] <= 1.0


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
def test_user_dict_batch_module(names, precision, tmp_path):
    check_case("dict_module", names, precision, tmp_path, report=len(names) == len(TECHNIQUES))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("names", [("target", other) for other in TECHNIQUES[1:]] + [("target", *TECHNIQUES[1:])],
                         ids="+".join)
def test_compress_to_target_composes(names, precision, tmp_path):
    """CompressToTarget in place of ChannelPruning: with each other technique and with all of them."""
    check_case("dict_module", names, precision, tmp_path, report=len(names) == len(TECHNIQUES))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("names", [("target_factorized", other) for other in ("magnitude_late", "qat", "kd")]
                         + [("target_factorized", "magnitude_late", "qat", "kd")], ids="+".join)
def test_a_factorizing_target_composes(names, precision, tmp_path, monkeypatch):
    """CompressToTarget(factorize=True), its plan made to factorize (every channel cut dear), with each other
    technique and with all of them: the factorization happens at its end, before QAT, and reloads."""
    from lightning_compress.planning import target as target_module

    monkeypatch.setattr(target_module, "width_sensitivity", channels_dear)
    check_case("dict_module", names, precision, tmp_path, report=len(names) == len(TECHNIQUES))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_image_classifier_whole_set(precision, tmp_path):
    check_case("image_classifier", TECHNIQUES, precision, tmp_path, report=True)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("names", COMBINATIONS[:-1], ids="+".join)
def test_image_classifier_pairs(names, precision, tmp_path):
    check_case("image_classifier", names, precision, tmp_path)


PT2E_PAIRS = [("qat_xnnpack", other) for other in ("channel", "magnitude", "kd")]
PT2E_WHOLE_SET = ("channel", "magnitude", "qat_xnnpack", "kd")


@pytest.mark.slow
@pytest.mark.parametrize("precision", [pytest.param("32-true", marks=pytest.mark.extended), "bf16-mixed"])
def test_pt2e_engine_whole_set(precision, tmp_path):
    """QAT on torchao PT2E (engine='xnnpack', ending as its ExecuTorch program) with every other technique."""
    # fp32 is extended: the kill -9 resume test trains this whole set with engine='xnnpack' in fp32 by default
    check_case("dict_module", PT2E_WHOLE_SET, precision, tmp_path, report=True)


@pytest.mark.slow
def test_7bit_engine_whole_set_under_bf16(tmp_path):
    """engine='onnxruntime_7bit' with every other technique under bf16 autocast: its file keeps the 7-bit grid."""
    check_case("dict_module", ("channel", "magnitude", "qat_7bit", "kd"), "bf16-mixed", tmp_path)


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("names", PT2E_PAIRS, ids="+".join)
def test_pt2e_engine_pairs(names, precision, tmp_path):
    """QAT on torchao PT2E with each other technique alone (about a minute each: ``-m extended``)."""
    check_case("dict_module", names, precision, tmp_path)


@pytest.mark.parametrize("order", [("qat", "channel"), ("channel", "qat")], ids="-".join)
def test_composition_is_checked_in_any_list_order_before_training(order):
    """QAT starting inside the channel-pruning window cannot work: refused before the first step."""
    steps = []

    class Recorder(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    factories = {"channel": lambda: ChannelPruning(channel_ratio=0.5, start=0.0, end="4steps", update_every=1),
                 "qat": lambda: QuantizationAwareTraining(start="2steps")}
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", callbacks=[Recorder(), *(factories[n]() for n in order)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"ChannelPruning changes the architecture until step 4, but "
                                         r"QuantizationAwareTraining quantizes from step 2.*ChannelPruning\(end=...\)"):
        trainer.fit(DictBatchModule(), dict_loader())
    assert steps == []


def test_nm_masks_need_channel_counts_in_whole_blocks():
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[MagnitudePruning(pattern="2:4", start=0.0, end="4steps"),
                                    ChannelPruning(channel_ratio=0.25, end="2steps", round_to=2)])
    with pytest.raises(ValueError, match=r"keeps a 2:4 pattern .*ChannelPruning\(round_to=...\) to a multiple of 4"):
        trainer.fit(DictBatchModule(), dict_loader())


def test_masks_follow_channel_removal_keeping_the_surviving_rows_and_columns(tmp_path):
    """After a removal the mask of each surviving weight is the old mask's surviving entries."""
    module = DictBatchModule()
    magnitude = MagnitudePruning(final_sparsity=0.5, start=0.0, end="2steps", update_every=1)
    channel = ChannelPruning(channel_ratio=0.5, start="3steps", end="4steps", update_every=1)
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:  # the removal has not happened yet at this callback's turn
                seen["before"] = pl_module.backbone.conv2.weight.detach().clone()

    trainer = pl.Trainer(max_steps=6, accelerator="cpu", callbacks=[Spy(), channel, magnitude], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, dict_loader())
    after = module.backbone.conv2.weight.detach()
    assert after.shape[0] < seen["before"].shape[0]
    # masked entries stay exactly zero through removal and further training, at the same sparsity
    assert float((after == 0).float().mean()) == pytest.approx(float((seen["before"] == 0).float().mean()), abs=0.1)
    assert float((after == 0).float().mean()) > 0.3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_post_training_quantization_calibrates_on_dict_batches_after_the_other_techniques(precision, tmp_path):
    module = DictBatchModule()
    callbacks = [*make_callbacks(("channel", "magnitude", "kd")), PostTrainingQuantization(calibration_batches=2, engine="x86")]
    fit(module, dict_loader(), callbacks, precision, tmp_path)
    assert is_int8(module.backbone)
    assert module.backbone.get_submodule("conv1").weight().shape[0] < 16  # the slimmed network was quantized
    tester = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert 0.0 <= tester.test(module, dict_loader(), verbose=False)[0]["test_acc"] <= 1.0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_factorization_composes_with_masks_quantization_and_distillation(precision, tmp_path):
    """Factorize at step 2, mask the new layers from step 3, fake-quantize from step 5, distil throughout."""
    module = DictBatchModule()
    callbacks = [QuantizationAwareTraining(start="5steps"), KnowledgeDistillation(ToyConvNet(num_classes=4), alpha=0.5),
                 MagnitudePruning(final_sparsity=0.5, start="3steps", end="4steps", update_every=1),
                 LowRankFactorization(kept_macs_ratio=0.6, method="tucker2", start="2steps")]
    _, path = fit(module, dict_loader(), callbacks, precision, tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    kinds = [r["kind"] for r in checkpoint["compression_architecture"]]
    assert kinds[-1] == "quantization_aware_training" and len(kinds) == 2  # factorized, then prepared
    assert is_int8(module.backbone)
    fresh = DictBatchModule()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: the factorized, fake-quantized shapes
    pruning = next(cb for cb in callbacks if isinstance(cb, MagnitudePruning))
    masked = [checkpoint["state_dict"][name] for name in pruning._names]
    assert sum(int((w == 0).sum()) for w in masked) / sum(w.numel() for w in masked) == pytest.approx(0.5, abs=0.02)
