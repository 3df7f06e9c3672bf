"""ChannelPruning with real Trainers: targets, schedule, optimizer, logging, checkpoints, composition."""

import pytest
import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress.core.accounting import count_macs
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.module import ImageClassifier
from lightning_compress.core.architecture import ARCHITECTURE_KEY
from lightning_compress.pruning.channel import ChannelPruning
from lightning_compress.quantization import QuantizationAwareTraining
from tests.toy import ToyConvNet, UserClassifier, random_loader


def _trainer(callbacks, tmp_path=None, **kw):
    kw.setdefault("max_epochs", 2)
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=tmp_path is not None,
                      default_root_dir=tmp_path, callbacks=callbacks, **kw)


class _Recorder(pl.Callback):
    """Records channel counts and the scheduler's view of the optimizer at every step."""

    def __init__(self):
        self.widths, self.lrs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.widths.append(pl_module.net.conv1.out_channels)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(channel_ratio=1.0), r"channel_ratio must be a number in \(0, 1\)"),
    (dict(channel_ratio=0.0), r"channel_ratio must be a number in \(0, 1\)"),
    (dict(kept_macs_ratio=1.5), r"kept_macs_ratio must be a number in \(0, 1\)"),
    (dict(), "exactly one of channel_ratio"),
    (dict(channel_ratio=0.5, kept_macs_ratio=0.5), "exactly one of channel_ratio"),
    (dict(channel_ratio=0.5, importance="l3"), "importance must be one of"),
    (dict(channel_ratio=0.5, schedule="steep"), "schedule must be one of"),
    (dict(channel_ratio=0.5, start=0.6, end=0.5), "start must come before end"),
    (dict(channel_ratio=0.5, update_every="often"), "update_every must be"),
    (dict(channel_ratio=0.5, round_to=0), "round_to must be an integer >= 1"),
    (dict(channel_ratio=0.5, round_to=8.0), "round_to must be an integer >= 1"),
])
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelPruning(**kwargs)


def test_bad_setups_fail_before_any_training_step():
    model = UserClassifier()
    with pytest.raises(ValueError, match=r"ignore pattern 'net.nothing\*' matches no layer; candidate layers"):
        _trainer([ChannelPruning(channel_ratio=0.5, ignore="net.nothing*")]).fit(model, random_loader())
    with pytest.raises(ValueError, match="leave at least one step of fine-tuning"):
        _trainer([ChannelPruning(channel_ratio=0.5, end=1.0)]).fit(model, random_loader())

    class HardCodedReshape(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4 * 16 * 16, 4)

        def forward(self, x):
            return self.head(self.conv(x).view(x.shape[0], 4 * 16 * 16))

    class Unslimmable(UserClassifier):
        def __init__(self):
            super().__init__()
            self.net = HardCodedReshape()

    model = Unslimmable()
    trainer = _trainer([ChannelPruning(channel_ratio=0.5, end="2steps", update_every="1steps")])
    with pytest.raises(ValueError, match=r"removing a channel of 'conv' \(Conv2d\).*fixed reshape, a grouped "
                                         r"convolution\); leave the layer alone with ignore=\['\*\.conv'\]"):
        trainer.fit(model, random_loader())
    assert trainer.global_step == 0



def test_channel_shuffle_is_refused_before_any_training_step_naming_the_module():
    class ShuffleBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):  # torchvision's shufflenetv2.channel_shuffle with 2 groups
            n, c, h, w = x.shape
            return self.conv(x).view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    class Shuffled(UserClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ShuffleBlock(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(8, 4))

    trainer = _trainer([ChannelPruning(channel_ratio=0.5, end="2steps", update_every="1steps")])
    with pytest.raises(ValueError, match=r"module '1' \(ShuffleBlock\) views its \(1, 8, 16, 16\) activation as "
                                         r"\(1, 2, 4, 16, 16\), a channel shuffle.*MagnitudePruning\(pattern='channel'\)"):
        trainer.fit(Shuffled(), random_loader())
    assert trainer.global_step == 0


def test_a_conv_classifier_keeps_the_output_shape():
    class ConvClassifier(UserClassifier):  # SqueezeNet's head: a 1x1 conv to the classes, then pooling
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())

    model = ConvClassifier()
    trainer = _trainer([ChannelPruning(channel_ratio=0.5, end="2steps", update_every="1steps", round_to=1)])
    trainer.fit(model, random_loader())
    assert (model.net[0].out_channels, model.net[2].in_channels, model.net[2].out_channels) == (8, 8, 4)
    assert trainer.global_step == 8

def test_user_module_is_slimmed_on_schedule_with_optimizer_and_scheduler_carried_over():
    model = UserClassifier()
    recorder = _Recorder()
    pruning = ChannelPruning(channel_ratio=0.5, schedule="linear", start=0.0, end="4steps", update_every="2steps",
                             ignore="net.stem", round_to=1)  # exact widths on request

    def configure_optimizers():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5), "interval": "step"}}

    model.configure_optimizers = configure_optimizers
    trainer = _trainer([pruning, recorder])  # 2 epochs x 4 batches = 8 steps
    trainer.fit(model, random_loader())
    net = model.net
    # conv1 (16 channels): removed at steps 0, 2, 4 -> linear 0, 25 %, 50 %; the stem is left alone
    assert recorder.widths == [16, 16, 12, 12, 8, 8, 8, 8]
    assert (net.stem.out_channels, net.conv1.out_channels, net.conv2.out_channels, net.fc.in_features) == (8, 8, 8, 8)
    optimizer = trainer.optimizers[0]
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], model.parameters()))
    assert all(optimizer.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is optimizer and scheduler.last_epoch == 8
    assert recorder.lrs == pytest.approx([0.1 * 0.5 ** (s + 1) for s in range(8)])  # never restarted
    x = torch.randn(1, 3, 16, 16)
    metrics = trainer.callback_metrics
    assert metrics["channels/net.conv1"] == 8 and metrics["channels/net.conv2"] == 8
    assert "channels/net.stem" not in metrics
    assert metrics["macs/ratio"].item() == pytest.approx(count_macs(net, x) / count_macs(ToyConvNet(), x), rel=1e-6)


def test_kept_macs_ratio_reaches_the_target_on_a_residual_zoo_model():
    model = ImageClassifier("resnet20", num_classes=4, lr=0.05)
    pruning = ChannelPruning(kept_macs_ratio=0.5, importance="bn_scale", start=0.0, end="2steps", update_every="1steps",
                             round_to=1)
    data = random_loader(n=24, batch_size=8, size=32)
    dense = count_macs(ImageClassifier("resnet20", num_classes=4).model, torch.randn(1, 3, 32, 32))
    _trainer([pruning], max_epochs=1).fit(model, data)
    ratio = count_macs(model.model, torch.randn(1, 3, 32, 32)) / dense
    assert 0.45 <= ratio <= 0.5 * 1.005


def test_default_round_to_keeps_channel_counts_in_blocks_of_8_and_still_reaches_the_macs_target():
    model = ImageClassifier("resnet20", num_classes=4, lr=0.05)
    pruning = ChannelPruning(kept_macs_ratio=0.5, start=0.0, end="2steps", update_every="1steps")
    assert pruning.round_to == 8
    dense = count_macs(ImageClassifier("resnet20", num_classes=4).model, torch.randn(1, 3, 32, 32))
    _trainer([pruning], max_epochs=1).fit(model, random_loader(n=24, batch_size=8, size=32))
    widths = {m.out_channels for m in model.model.modules() if isinstance(m, nn.Conv2d)}
    assert widths and all(w % 8 == 0 for w in widths), widths
    assert widths != {16, 32, 64}  # something was removed
    assert count_macs(model.model, torch.randn(1, 3, 32, 32)) / dense <= 0.5 * 1.005


def _fit_and_checkpoint(tmp_path, importance="l1"):
    model = ImageClassifier(ToyConvNet(num_classes=4), num_classes=4, lr=0.05, lr_schedule="constant")
    pruning = ChannelPruning(channel_ratio=0.5, importance=importance, start=0.0, end="4steps", update_every="2steps",
                             round_to=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _trainer([pruning, checkpoint], tmp_path=tmp_path, max_epochs=2)
    trainer.fit(model, random_loader())
    return model, trainer, tmp_path / "last.ckpt"


def test_checkpoint_loads_back_and_resumes_fit(tmp_path):
    model, trainer, path = _fit_and_checkpoint(tmp_path, importance="taylor")
    assert model.model.conv1.out_channels == 8
    records = torch.load(path, weights_only=False)[ARCHITECTURE_KEY]
    assert {r["kind"] for r in records} == {"channel_slimming"} and len(records) >= 2
    assert all(r["network"] == "model" and r["payload"]["input_shape"] == [1, 3, 16, 16] for r in records)
    history = [entry for r in records for entry in r["payload"]["history"]]
    assert [entry[0] for entry in history][:3] == ["conv2", "conv1", "stem"]

    # load_from_checkpoint: a fresh dense module is slimmed before the weights load (strict)
    loaded = ImageClassifier.load_from_checkpoint(path, model=ToyConvNet(num_classes=4))
    assert loaded.model.conv1.out_channels == 8 and loaded.model.fc.in_features == 8
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(loaded.eval()(x), model.eval()(x))

    # resume fit: same architecture, steps continue, nothing pruned twice
    resumed_model = ImageClassifier(ToyConvNet(num_classes=4), num_classes=4, lr=0.05, lr_schedule="constant")
    pruning = ChannelPruning(channel_ratio=0.5, start=0.0, end="4steps", update_every="2steps", round_to=1)
    trainer = _trainer([pruning], tmp_path=tmp_path, max_epochs=3)
    trainer.fit(resumed_model, random_loader(), ckpt_path=path)
    assert trainer.global_step == 12
    assert resumed_model.model.conv1.out_channels == 8 and resumed_model.model.stem.out_channels == 4
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)[ARCHITECTURE_KEY]
    assert saved == records  # nothing pruned twice, the records carried over


def test_quantization_aware_training_must_start_after_the_last_removal():
    qat = QuantizationAwareTraining(start=0.25)
    pruning = ChannelPruning(channel_ratio=0.5, start=0.0, end=0.5, update_every="1steps")
    with pytest.raises(ValueError, match="ChannelPruning.*QuantizationAwareTraining"):
        _trainer([qat, pruning]).fit(UserClassifier(), random_loader())


def test_composes_with_knowledge_distillation():
    model = UserClassifier()
    pruning = ChannelPruning(channel_ratio=0.5, start=0.0, end="2steps", update_every="1steps")
    trainer = _trainer([KnowledgeDistillation(ToyConvNet(), alpha=0.5), pruning], max_steps=4)
    trainer.fit(model, random_loader())
    assert model.net.conv1.out_channels == 8
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_user_module_resumes_a_channel_pruned_fit(tmp_path):
    """No on_load_checkpoint of its own: the callback slims the network before the weights load."""
    def run(ckpt_path=None):
        model = UserClassifier()
        pruning = ChannelPruning(channel_ratio=0.5, start=0.0, end="4steps", update_every="2steps")
        trainer = _trainer([pruning, ModelCheckpoint(dirpath=tmp_path, save_last=True)], tmp_path=tmp_path,
                           max_epochs=3 if ckpt_path else 2)
        trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
        return model, trainer

    first, _ = run()
    resumed, trainer = run(ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 12
    assert resumed.net.conv1.out_channels == first.net.conv1.out_channels == 8
    assert "on_load_checkpoint" not in vars(resumed)  # the wrapper is gone after fit
    # loading without the callback needs the module's own hook: the dense class does not fit the weights
    with pytest.raises(RuntimeError, match="size mismatch"):
        UserClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
