"""The PT2E engine (x86_inductor) behind QuantizationAwareTraining and PostTrainingQuantization, with real Trainers."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import fx
from torch.utils.data import DataLoader
from torchao.quantization.pt2e import FakeQuantizeBase

from lightning_compress.core.aoti import AotiNetwork
from lightning_compress.core.architecture import checkpoint_records, restore_architecture
from lightning_compress.pruning import ChannelPruning, MagnitudePruning
from lightning_compress.quantization import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
    pt2e,
    quantize_static,
)
from lightning_compress.quantization.observers import pause_observers, resume_observers
from tests.toy import UserClassifier, random_images, random_loader

IMAGES, LABELS = random_images(64).tensors
_q = torch.ops.quantized_decomposed
PRECISIONS = ["32-true", "bf16-mixed"]


def _is_int8_graph(network: torch.nn.Module) -> bool:
    targets = {node.target for node in network.graph.nodes} if isinstance(network, fx.GraphModule) else set()
    return (_q.dequantize_per_channel.default in targets and _q.quantize_per_tensor.default in targets
            and not pt2e.is_pt2e_prepared(network))


class _Recorder(Callback):
    """At each batch start: is the network fake-quantized, does the optimizer hold its parameters; at fit end,
    the fake-quant model the int8 graph is converted from (QAT converts in teardown, after every on_fit_end)."""

    def __init__(self):
        self.prepared, self.optimizer_holds_network, self.reference = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prepared.append(pt2e.is_pt2e_prepared(pl_module.net))
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.optimizer_holds_network.append({id(p) for p in pl_module.parameters()} <= held)

    def on_fit_end(self, trainer, pl_module):
        if pt2e.is_pt2e_prepared(pl_module.net):
            self.reference = pt2e.frozen_copy(pl_module.net)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_qat_ends_with_the_aoti_package_that_tests_as_the_fake_quant_model(make_trainer, precision):
    torch.manual_seed(0)
    model, recorder = UserClassifier(), _Recorder()
    qat = QuantizationAwareTraining(engine="x86_inductor", start="2steps", freeze_bn=0.5, freeze_observers=0.75,
                                    log_every_n_steps=2)
    trainer = make_trainer([qat, recorder], max_steps=8, max_epochs=None, precision=precision)
    trainer.fit(model, random_loader())
    assert recorder.prepared == [False, False] + [True] * 6
    assert all(recorder.optimizer_holds_network)
    assert isinstance(model.net, AotiNetwork)  # the .pt2 that ships, oneDNN's int8 kernels: what test() runs
    assert qat.state_dict() == {"stage": "int8", "observers_frozen": True, "bn_frozen": True}
    metrics = trainer.callback_metrics
    assert 0 < float(metrics["quant/weight_error/net.conv1"]) < 0.05
    assert float(metrics["quant/act_scale/net.x"]) > 0
    with torch.no_grad():
        agreement = (model.net(IMAGES).argmax(1) == recorder.reference(IMAGES).argmax(1)).float().mean()
        reference_acc = float((recorder.reference(IMAGES).argmax(1) == LABELS).float().mean())
    assert agreement >= 0.95
    test_acc = trainer.test(model, random_loader(), verbose=False)[0]["test_acc"]  # under the fit's precision
    assert test_acc > 0.4 and abs(test_acc - reference_acc) <= 0.05
    predictions = trainer.predict(model, DataLoader(torch.randn(6, 3, 16, 16), batch_size=3))
    assert [tuple(p.shape) for p in predictions] == [(3, 4), (3, 4)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ptq_calibrates_and_tests_the_aoti_package(make_trainer, precision):
    torch.manual_seed(0)
    model = UserClassifier()
    trainer = make_trainer([PostTrainingQuantization(calibration_batches=2, engine="x86_inductor")], max_epochs=3,
                           precision=precision)
    trainer.fit(model, random_loader())
    assert isinstance(model.net, AotiNetwork)
    assert trainer.test(model, random_loader(), verbose=False)[0]["test_acc"] > 0.4


def _accuracy(logits, labels):
    return float((logits.argmax(1) == labels).float().mean())


def test_xnnpack_qat_tests_through_the_executorch_program_it_ships(make_trainer, tmp_path):
    from executorch.runtime import Runtime

    from lightning_compress.core.executorch import ExecuTorchNetwork

    torch.manual_seed(0)
    model, recorder = UserClassifier(), _Recorder()
    qat = QuantizationAwareTraining(engine="xnnpack", start="2steps", freeze_bn=0.5, freeze_observers=0.75)
    trainer = make_trainer([qat, recorder], max_steps=8, max_epochs=None)
    trainer.fit(model, random_loader())
    assert isinstance(model.net, ExecuTorchNetwork)
    # the program, run by ExecuTorch's runtime straight from the bytes that ship, is what test() measured
    path = tmp_path / "model.pte"
    path.write_bytes(model.net.program_bytes())
    method = Runtime.get().load_program(path).load_method("forward")
    images, labels = random_loader().dataset.tensors
    shipped = torch.cat([method.execute([chunk.contiguous()])[0] for chunk in images.split(16)])
    test_acc = trainer.test(model, DataLoader(random_loader().dataset, batch_size=16), verbose=False)[0]["test_acc"]
    assert test_acc == pytest.approx(_accuracy(shipped, labels), abs=1e-6)
    with torch.no_grad():  # and it computes the int8 graph it was lowered from, near-ties aside
        reference = recorder.reference(images)
    assert (shipped.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    # a copy and a checkpoint carry the program (bytes in a buffer), and the copy runs
    copied = copy.deepcopy(model.net)
    assert torch.equal(copied(images[:4]), model.net(images[:4]))
    trainer.save_checkpoint(tmp_path / "int8.ckpt")
    saved = torch.load(tmp_path / "int8.ckpt", weights_only=True)["state_dict"]["net.pte_program"]
    assert saved.numpy().tobytes() == model.net.program_bytes()


def test_xnnpack_qat_ships_a_channels_last_network(make_trainer):
    """``ImageClassifier(channels_last=True)`` (the quickstart recipe's setting) keeps its weights in NHWC strides,
    which XNNPACK's layout pass refused: the conversion fell back to the fake-quantized network with a warning.
    The program is lowered from a default-format copy; the user's network keeps its own format."""
    from lightning_compress.core.executorch import ExecuTorchNetwork, pte_bytes

    torch.manual_seed(0)
    model = UserClassifier()
    model.net = model.net.to(memory_format=torch.channels_last)
    qat = QuantizationAwareTraining(engine="xnnpack", start="2steps", freeze_bn=0.5, freeze_observers=0.75)
    make_trainer([qat], max_steps=6, max_epochs=None).fit(model, random_loader())
    assert isinstance(model.net, ExecuTorchNetwork)
    float_net = UserClassifier().net.to(memory_format=torch.channels_last).eval()
    assert pte_bytes(float_net, IMAGES[:2])
    assert float_net.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_xnnpack_ptq_ships_the_executorch_program():
    from lightning_compress.core.executorch import ExecuTorchNetwork

    model = UserClassifier()
    net = model.net.eval()
    int8 = quantize_static(net, [(IMAGES[i:i + 16],) for i in range(0, 64, 16)], engine="xnnpack")
    assert isinstance(int8, ExecuTorchNetwork)
    with torch.no_grad():
        assert (int8(IMAGES).argmax(1) == net(IMAGES).argmax(1)).float().mean() >= 0.9


def test_without_a_compiler_the_x86_inductor_network_stays_the_graph(monkeypatch):
    from lightning_compress.quantization import families

    monkeypatch.setattr(families, "has_compiler", lambda: False)
    net = UserClassifier().net.eval()
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler to build the AOTInductor package"):
        int8 = quantize_static(net, [(IMAGES[:16],)], engine="x86_inductor")
    assert _is_int8_graph(int8)


def test_quantize_static_with_a_pt2e_engine_leaves_the_network_alone():
    model = UserClassifier()
    net = model.net.eval()
    int8 = quantize_static(net, [(IMAGES[i:i + 16],) for i in range(0, 64, 16)], engine="x86_inductor", skip="fc")
    assert isinstance(net.conv1, torch.nn.Conv2d) and isinstance(int8, AotiNetwork)
    with torch.no_grad():
        assert (int8(IMAGES[:1]).argmax(1) == net(IMAGES[:1]).argmax(1)).all()
        assert (int8(IMAGES).argmax(1) == net(IMAGES).argmax(1)).float().mean() >= 0.9


def _fit_with_checkpoints(make_trainer, tmp_path, ckpt_path=None):
    torch.manual_seed(0)
    model = UserClassifier()
    qat = QuantizationAwareTraining(engine="x86_inductor", start="1steps", freeze_bn="3steps",
                                    freeze_observers="6steps", convert_on_fit_end=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = make_trainer([qat, checkpoint], max_steps=8, max_epochs=None, enable_checkpointing=True)
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return model, qat


def test_a_checkpoint_inside_the_qat_window_resumes_bitwise(make_trainer, tmp_path):
    full, qat = _fit_with_checkpoints(make_trainer, tmp_path / "a")
    ckpt = torch.load(tmp_path / "a" / "step=4.ckpt", weights_only=False)
    assert ckpt["callbacks"]["QuantizationAwareTraining"] == {"stage": "qat", "observers_frozen": False,
                                                              "bn_frozen": True}
    (record,) = checkpoint_records(ckpt)
    assert record.payload == {"engine": "x86_inductor", "skip": [],
                              "example_inputs": [{"shape": [16, 3, 16, 16], "dtype": "float32"}]}
    # the record alone rebuilds the network: a fresh module takes the checkpoint's whole state
    reloaded = UserClassifier()
    restore_architecture(reloaded, ckpt)
    reloaded.load_state_dict(ckpt["state_dict"])
    assert pt2e.is_pt2e_prepared(reloaded.net)

    resumed, _ = _fit_with_checkpoints(make_trainer, tmp_path / "b", ckpt_path=tmp_path / "a" / "step=4.ckpt")
    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        same = torch.equal if isinstance(expected[key], torch.Tensor) else type(expected[key]).__eq__
        assert same(expected[key], got[key]), key
    assert got["net.graph_mode._extra_state"] == {"bn_frozen": True}
    int8_full, int8_resumed = qat.convert(full), qat.convert(resumed)
    assert isinstance(int8_full, AotiNetwork)
    with torch.no_grad():
        assert torch.equal(int8_full(IMAGES[:4]), int8_resumed(IMAGES[:4]))


def test_with_magnitude_and_channel_pruning_in_one_trainer(make_trainer):
    torch.manual_seed(0)
    model = UserClassifier()
    callbacks = [ChannelPruning(channel_ratio=0.5, start=0.0, end="2steps", update_every=1, round_to=1),
                 MagnitudePruning(final_sparsity=0.5, start=0.0, end="6steps", update_every=1),
                 QuantizationAwareTraining(engine="x86_inductor", start="3steps"), recorder := _Recorder()]
    trainer = make_trainer(callbacks, max_steps=8, max_epochs=None)
    trainer.fit(model, random_loader())
    assert isinstance(model.net, AotiNetwork)
    assert [r.kind for r in model.compression_architecture][-1] == "quantization_aware_training"
    graph = pt2e.convert(recorder.reference)  # what the package was compiled from
    assert _is_int8_graph(graph)
    int8_weights = [t for t in graph.buffers() if t.dtype == torch.int8 and t.dim() == 4]
    assert len(int8_weights) == 3 and int8_weights[1].shape[0] < 16  # conv1 lost channels before QAT
    zeros = sum(int(w.eq(0).sum()) for w in int8_weights[1:])
    assert zeros >= 0.45 * sum(w.numel() for w in int8_weights[1:]), "pruned zeros did not survive int8"
    assert trainer.test(model, random_loader(), verbose=False)[0]["test_acc"] >= 0.0


def test_validation_does_not_move_the_observers():
    """PT2E fake-quantizers observe in training only, and QAT pauses them while validating besides: validation
    data far outside the training range leaves the ranges as training left them; training observes again."""

    def ranges(module):
        return [m.scale.clone() for m in module.modules() if isinstance(m, FakeQuantizeBase)]

    class Probe(pl.Callback):
        def __init__(self):
            self.seen, self.before = [], None

        def on_validation_start(self, trainer, pl_module):
            self.before = ranges(pl_module.net)

        def on_validation_end(self, trainer, pl_module):
            if self.before:
                self.seen.append(all(torch.equal(a, b) for a, b in zip(self.before, ranges(pl_module.net))))

    x, y = random_images(16).tensors
    loud = DataLoader(torch.utils.data.TensorDataset(20 * x, y), batch_size=8)
    model, probe = UserClassifier(), Probe()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[QuantizationAwareTraining(engine="x86_inductor", convert_on_fit_end=False),
                                    probe])
    trainer.fit(model, random_loader(32), loud)
    assert probe.seen == [True, True]
    assert all(bool(m.observer_enabled[0]) for m in model.net.modules() if isinstance(m, FakeQuantizeBase))


def test_pause_and_resume_restore_what_was_observing():
    model = UserClassifier()
    prepared = pt2e.prepare(model.net, example_inputs=(IMAGES[:2],))
    quantizers = [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]
    quantizers[0].disable_observer()
    paused = pause_observers(prepared)
    assert len(paused) == len(quantizers) - 1 and not any(bool(m.observer_enabled[0]) for m in quantizers)
    resume_observers(paused)
    assert [bool(m.observer_enabled[0]) for m in quantizers] == [False] + [True] * (len(quantizers) - 1)


def test_pt2e_engines_pass_the_callbacks_argument_checks():
    assert QuantizationAwareTraining(engine="x86_inductor").engine.name == "x86_inductor"
    assert PostTrainingQuantization(engine="x86_inductor").engine.name == "x86_inductor"
    assert QuantizationAwareTraining(engine="xnnpack").engine.runtime == "executorch"
    with pytest.raises(ValueError, match=r"engine must be one of \[.*'x86_inductor', 'xnnpack'\], got 'arm'"):
        QuantizationAwareTraining(engine="arm")


class _BiasedConvs(torch.nn.Module):
    """Two biased convolutions, each followed by a ReLU: every output is an int8 kernel's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))


def test_xnnpack_graph_adds_the_int32_biases_the_executorch_program_adds():
    from lightning_compress.core.executorch import ExecuTorchNetwork, pte_bytes
    from lightning_compress.quantization.families import family_of

    torch.manual_seed(0)
    net, images = _BiasedConvs().eval(), random_images(256, seed=3).tensors[0] * 2
    prepared = pt2e.prepare(net, "xnnpack", "static", example_inputs=(images[:4],))
    pt2e.calibrate(prepared, [(images[i:i + 64],) for i in range(0, 256, 64)])
    rounded, float_bias = pt2e.convert(prepared, int32_bias=True), pt2e.convert(prepared)
    program = ExecuTorchNetwork(pte_bytes(rounded, images[:2]), quantized=True)
    with torch.no_grad():
        shipped = program(images)
        differing = {name: int((graph(images) != shipped).sum()) for name, graph in
                     (("rounded", rounded), ("float bias", float_bias))}
    # XNNPACK adds round(bias / (input scale x weight scale)) in int32: the float bias moves ~0.1 % of the codes
    assert differing["float bias"] > 20 and differing["rounded"] <= differing["float bias"] // 20, differing
    biases = [rounded.get_buffer(node.args[2].target) for node in rounded.graph.nodes
              if node.target is torch.ops.aten.conv2d.default]
    assert len(biases) == 2 and all(bias.abs().sum() > 0 for bias in biases)
    assert family_of("xnnpack").engine.int32_bias and not family_of("x86_inductor").engine.int32_bias
