"""QuantizationAwareTraining on a user's own LightningModule, with real Trainers and checkpoints."""

import pytest
import torch
import torch.ao.nn.quantized as nnq
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.core.onnx import OnnxRuntimeNetwork
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.quantization import QuantizationAwareTraining
from lightning_compress.quantization.convert import convert
from lightning_compress.quantization.prepare import is_prepared
from lightning_compress.report import is_int8
from tests.toy import UserClassifier, random_loader


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class _GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = _Gate()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.gate(self.stem(x).mean((2, 3))))


class Untraceable(UserClassifier):
    def __init__(self):
        super().__init__()
        self.net = _GatedNet()


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "arm"}, r"engine must be one of \['x86', 'onednn', 'qnnpack', 'onnxruntime', 'onnxruntime_7bit', 'onnxruntime_symmetric', 'x86_inductor', 'xnnpack'\], got 'arm'"),
        ({"start": 0.5, "freeze_bn": 0.2}, "start must come before freeze_bn"),
        ({"start": "2ep", "freeze_observers": "1ep"}, "start must come before freeze_observers"),
        ({"start": 1.5}, "start must be a fraction in"),
        ({"log_every_n_steps": 0}, "log_every_n_steps must be an int >= 1"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_freeze_before_start_in_mixed_units_fails_before_training(make_trainer):
    model = UserClassifier()
    trainer = make_trainer([QuantizationAwareTraining(start=0.5, freeze_bn="1steps")], max_steps=8, max_epochs=None)
    with pytest.raises(ValueError, match=r"freeze_bn='1steps' \(step 1\) must come after start=0.5 \(step 4\)"):
        trainer.fit(model, random_loader())
    assert trainer.global_step == 0


class _NoisyInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x).mean((2, 3))
        return self.fc(x + torch.randn_like(x) if self.training else x)


class ModeDependent(UserClassifier):
    def __init__(self):
        super().__init__()
        self.net = _NoisyInTraining()


def test_start_late_network_whose_forward_depends_on_the_mode_fails_before_training(make_trainer):
    trainer = make_trainer([QuantizationAwareTraining(start=0.5)], max_steps=4)
    with pytest.raises(ValueError, match=r"cannot quantize 'net': its own forward behaves differently"):
        trainer.fit(ModeDependent(), random_loader())
    assert trainer.global_step == 0


def test_untraceable_model_fails_before_training_naming_the_module(make_trainer):
    model = Untraceable()
    trainer = make_trainer([QuantizationAwareTraining()], max_steps=2)
    with pytest.raises(ValueError, match=r"cannot trace module 'net.gate'.*skip=\['net.gate'\]"):
        trainer.fit(model, random_loader())
    assert trainer.global_step == 0
    trainer = make_trainer([QuantizationAwareTraining(skip="net.gate", engine="x86")], max_steps=2)
    trainer.fit(model, random_loader())  # the suggested skip works (torch's int8 graph keeps the gate in fp32)
    assert isinstance(model.net.gate, _Gate) and isinstance(model.net.stem, nnq.Conv2d)


def test_convert_without_preparation_fails():
    qat = QuantizationAwareTraining()
    with pytest.raises(ValueError, match="was never prepared"):
        qat.convert(UserClassifier())


# ------------------------------------------------------------------------------------------- training
class _Recorder(Callback):
    """Records, at each batch start, whether the network is fake-quantized and the optimizer's tensors."""

    def __init__(self):
        self.prepared, self.optimizer_holds_network = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prepared.append(is_prepared(pl_module.net))
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.optimizer_holds_network.append(held == {id(p) for p in pl_module.parameters()})


def test_qat_trains_real_weights_and_ends_with_int8_for_test_and_predict(make_trainer):
    model = UserClassifier()
    before = model.net.conv1.weight.detach().clone()
    recorder = _Recorder()
    qat = QuantizationAwareTraining(start="2steps", freeze_bn=0.5, freeze_observers=0.75, log_every_n_steps=2,
                                    engine="x86")
    trainer = make_trainer([qat, recorder], max_steps=8, max_epochs=None)  # callback order: QAT acts first
    trainer.fit(model, random_loader())
    assert recorder.prepared == [False, False] + [True] * 6
    assert all(recorder.optimizer_holds_network)
    assert isinstance(model.net.conv1, nnq.Conv2d) and not is_prepared(model.net)
    # the weights trained under QAT are what got quantized: not the initial ones
    trained = model.net.conv1.weight().dequantize()
    assert not torch.allclose(trained, before, atol=0.05)
    metrics = trainer.callback_metrics
    assert 0 < float(metrics["quant/weight_error/net.conv1"]) < 0.05
    assert float(metrics["quant/act_scale/net.x"]) > 0
    test_acc = trainer.test(model, random_loader(), verbose=False)[0]["test_acc"]
    assert test_acc > 0.4  # learnable data, 4 classes: int8 model works, not just runs
    predictions = trainer.predict(model, DataLoader(torch.randn(6, 3, 16, 16), batch_size=3))
    assert [p.shape for p in predictions] == [(3, 4), (3, 4)]


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
def test_onednn_engine_ends_with_an_int8_model_that_matches_its_fake_quantized_self(make_trainer):
    model, loader = UserClassifier(), random_loader()
    qat = QuantizationAwareTraining(engine="onednn", convert_on_fit_end=False)
    make_trainer([qat], max_steps=6, max_epochs=None).fit(model, loader)
    x = torch.cat([batch[0] for batch in loader])
    fake_quantized = model.net.eval()(x).detach()
    int8 = convert(model.net, "onednn")
    assert isinstance(int8.conv1, nnq.Conv2d)
    assert torch.backends.quantized.engine == "onednn"
    logits = int8(x)
    # oneDNN rounds differently from the fake-quant emulation (measured: up to ~13 % of the largest
    # logit on this toy net, vs ~4 % for x86/fbgemm); the predictions must still be the same
    assert (logits.argmax(1) == fake_quantized.argmax(1)).float().mean() >= 0.9
    assert float((logits - fake_quantized).abs().max()) < 0.25 * float(fake_quantized.abs().max())
    torch.backends.quantized.engine = "x86"


def test_freeze_points_take_effect(make_trainer):
    model = UserClassifier()
    qat = QuantizationAwareTraining(freeze_bn="2steps", freeze_observers="3steps", convert_on_fit_end=False)
    trainer = make_trainer([qat], max_steps=4, max_epochs=None)
    trainer.fit(model, random_loader())
    fused = [m for m in model.net.modules() if isinstance(m, torch.ao.nn.intrinsic.qat.ConvBn2d)]
    assert fused and all(m.freeze_bn for m in fused)
    observers = [m for m in model.net.modules() if hasattr(m, "observer_enabled")]
    assert observers and all(int(m.observer_enabled) == 0 for m in observers)
    assert qat.state_dict() == {"stage": "qat", "observers_frozen": True, "bn_frozen": True}


def test_start_never_reached_warns_and_keeps_fp32(make_trainer):
    model = UserClassifier()
    trainer = make_trainer([QuantizationAwareTraining(start=1.0)], max_steps=2, max_epochs=None)
    with pytest.warns(UserWarning, match="never started"):
        trainer.fit(model, random_loader())
    assert isinstance(model.net.conv1, nn.Conv2d) and not is_prepared(model.net)


def _fit_with_checkpoints(make_trainer, tmp_path, ckpt_path=None):
    torch.manual_seed(0)
    model = UserClassifier()
    qat = QuantizationAwareTraining(
        start="1steps", freeze_bn="3steps", freeze_observers="6steps", convert_on_fit_end=False, engine="x86"
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = make_trainer([qat, checkpoint], max_steps=8, max_epochs=None, enable_checkpointing=True)
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return model, qat


def test_resume_mid_qat_is_exact(make_trainer, tmp_path):
    full, _ = _fit_with_checkpoints(make_trainer, tmp_path / "a")
    ckpt = torch.load(tmp_path / "a" / "step=4.ckpt", weights_only=False)
    assert any("weight_fake_quant" in key for key in ckpt["state_dict"])
    assert ckpt["callbacks"]["QuantizationAwareTraining"] == {"stage": "qat", "observers_frozen": False, "bn_frozen": True}
    resumed, qat = _fit_with_checkpoints(make_trainer, tmp_path / "b", ckpt_path=tmp_path / "a" / "step=4.ckpt")
    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert all(m.freeze_bn for m in resumed.net.modules() if isinstance(m, torch.ao.nn.intrinsic.qat.ConvBn2d))
    int8_full, int8_resumed = qat.convert(full), qat.convert(resumed)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(int8_full(x), int8_resumed(x))


def test_checkpoint_from_before_start_resumes_in_fp32(make_trainer, tmp_path):
    model = UserClassifier()
    trainer = make_trainer(
        [QuantizationAwareTraining(start="6steps", convert_on_fit_end=False),
         ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")],
        max_steps=8, max_epochs=None, enable_checkpointing=True,
    )
    trainer.fit(model, random_loader())
    ckpt = torch.load(tmp_path / "step=2.ckpt", weights_only=False)
    assert not any("fake_quant" in key for key in ckpt["state_dict"])
    resumed = UserClassifier()
    recorder = _Recorder()
    trainer = make_trainer([QuantizationAwareTraining(start="6steps", convert_on_fit_end=False), recorder],
                           max_steps=8, max_epochs=None)
    trainer.fit(resumed, random_loader(), ckpt_path=tmp_path / "step=2.ckpt")
    assert recorder.prepared == [False] * 4 + [True] * 2


# ---------------------------------------------------------------------------------------- composition
def test_hand_pruned_weights_stay_zero_through_qat_training_and_int8(make_trainer):
    """Stands in for MagnitudePruning's contract: zero in place after every optimizer step."""

    class KeepZero(Callback):
        def __init__(self, mask):
            self.mask = mask

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                pl_module.net.conv2.weight[self.mask] = 0.0  # by name: the module was swapped by QAT

    model = UserClassifier()
    mask = torch.rand_like(model.net.conv2.weight) < 0.7
    with torch.no_grad():
        model.net.conv2.weight[mask] = 0.0
    trainer = make_trainer([QuantizationAwareTraining(engine="x86"), KeepZero(mask)], max_steps=4, max_epochs=None)
    trainer.fit(model, random_loader())
    int_weights = model.net.conv2.weight().int_repr()
    assert torch.all(int_weights[mask] == 0)
    assert (int_weights[~mask] != 0).float().mean() > 0.9


@pytest.mark.parametrize("qat_first", [True, False], ids=["qat-listed-first", "pruning-listed-first"])
def test_with_magnitude_pruning(make_trainer, qat_first):
    model = UserClassifier()
    callbacks = [MagnitudePruning(final_sparsity=0.5), QuantizationAwareTraining(engine="x86")]
    trainer = make_trainer(callbacks[::-1] if qat_first else callbacks, max_steps=8, max_epochs=None)
    trainer.fit(model, random_loader())
    int_weights = [model.net.get_submodule(name).weight().int_repr() for name in ("conv1", "conv2")]
    zeros = sum(int(w.eq(0).sum()) for w in int_weights)
    total = sum(w.numel() for w in int_weights)
    assert zeros >= 0.5 * total, f"pruned zeros did not survive int8 conversion: {zeros}/{total}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fit_ships_onnxruntime_and_tests_it_on_the_gpu_trainer(make_trainer):
    """The default engine's int8 network is the onnxruntime program: a GPU trainer tests it (inputs go to the
    CPU session, logits come back on the GPU) and reads what a CPU trainer reads."""
    model = UserClassifier()
    trainer = make_trainer([QuantizationAwareTraining()], accelerator="gpu", max_steps=4, max_epochs=None)
    trainer.fit(model, random_loader())
    assert isinstance(model.net, OnnxRuntimeNetwork) and is_int8(model.net)
    on_gpu = trainer.test(model, random_loader(), verbose=False)[0]["test_acc"]
    on_cpu = make_trainer([]).test(model, random_loader(), verbose=False)[0]["test_acc"]
    assert on_gpu == pytest.approx(on_cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fit_converts_torch_int8_on_cpu_and_refuses_gpu_test(make_trainer):
    model = UserClassifier()
    trainer = make_trainer([QuantizationAwareTraining(engine="x86")], accelerator="gpu", max_steps=4,
                           max_epochs=None)
    trainer.fit(model, random_loader())
    assert isinstance(model.net.conv1, nnq.Conv2d)
    with pytest.raises(RuntimeError, match="int8 kernels run on CPU only"):
        trainer.test(model, random_loader(), verbose=False)
    cpu_trainer = make_trainer([])
    assert cpu_trainer.test(model, random_loader(), verbose=False)[0]["test_acc"] >= 0.0


def test_validation_does_not_move_the_trained_quantization_ranges(tmp_path):
    """torch.ao's fake-quantizers observe in eval mode too: validation batches (here far outside the training
    range) must leave the ranges as training left them, and training must go on observing afterwards."""
    import lightning.pytorch as pl
    from torch.ao.quantization import FakeQuantizeBase

    from tests.toy import UserClassifier, random_loader

    def ranges(module):
        return [m.scale.clone() for m in module.modules() if isinstance(m, FakeQuantizeBase)]

    class Probe(pl.Callback):
        seen: list = []

        def on_validation_start(self, trainer, pl_module):
            self.before = ranges(pl_module.net)

        def on_validation_end(self, trainer, pl_module):
            if self.before:
                self.seen.append(all(torch.equal(a, b) for a, b in zip(self.before, ranges(pl_module.net))))

    class Loud(torch.utils.data.Dataset):  # validation inputs 20x the training scale
        def __init__(self):
            self.data = random_loader(16).dataset

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            x, y = self.data[i]
            return 20 * x, y

    model, probe = UserClassifier(), Probe()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[QuantizationAwareTraining(start=0.0, convert_on_fit_end=False), probe])
    trainer.fit(model, random_loader(32), torch.utils.data.DataLoader(Loud(), batch_size=8))
    assert probe.seen == [True, True]
    observing = [bool(m.observer_enabled[0]) for m in model.net.modules() if isinstance(m, FakeQuantizeBase)]
    assert any(observing)  # training observes again after validation
