"""ImageClassifier end to end: real Trainer, real TensorBoard event file, checkpoint round trip."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress.module import ImageClassifier, split_weight_decay, warmup_cosine_factor
from tests.events import read_scalars
from tests.toy import ToyConvNet, random_loader


def make_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=TensorBoardLogger(tmp_path, name="tb"),
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def test_fit_test_logs_metrics_to_tensorboard(tmp_path):
    model = ImageClassifier("resnet20", num_classes=4, lr=0.05, warmup="1ep", model_kwargs=None)
    trainer = make_trainer(tmp_path)
    trainer.fit(model, random_loader(64, size=16), random_loader(32, size=16, seed=1))
    results = trainer.test(model, random_loader(32, size=16, seed=2), verbose=False)
    assert 0.0 <= results[0]["test/acc"] <= 1.0
    scalars = read_scalars(tmp_path / "tb")
    for tag in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
    assert len(scalars["train/loss"]) == 8  # 4 steps/epoch x 2 epochs, logged every step
    assert scalars["test/acc"][-1][1] == pytest.approx(results[0]["test/acc"])


def test_learns_a_learnable_task(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(ToyConvNet(num_classes=4), num_classes=4, lr=0.05, lr_schedule="constant")
    trainer = make_trainer(tmp_path, max_epochs=6, logger=False, enable_checkpointing=False)
    trainer.fit(model, random_loader(128, batch_size=32, shuffle=True))
    accuracy = trainer.test(model, random_loader(128, batch_size=64, seed=3), verbose=False)[0]["test/acc"]
    assert accuracy > 0.6  # chance is 0.25


def test_load_from_checkpoint_rebuilds_zoo_model(tmp_path):
    model = ImageClassifier("resnet20", num_classes=4, label_smoothing=0.1, channels_last=True)
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False)
    trainer.fit(model, random_loader(32, size=16))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path)
    assert restored.hparams.label_smoothing == 0.1 and restored.hparams.channels_last
    x = torch.randn(3, 3, 16, 16)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))


def test_load_from_checkpoint_with_user_module_needs_it_again(tmp_path):
    model = ImageClassifier(ToyConvNet(num_classes=4), num_classes=4)
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False)
    trainer.fit(model, random_loader(32, size=16))
    trainer.save_checkpoint(tmp_path / "user.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "user.ckpt", model=ToyConvNet(num_classes=4))
    torch.testing.assert_close(restored.model.fc.weight, model.model.fc.weight)


def test_predict_returns_probabilities(tmp_path):
    model = ImageClassifier("resnet20", num_classes=4)
    trainer = make_trainer(tmp_path, logger=False)
    batches = trainer.predict(model, random_loader(20, batch_size=8, size=16))
    probs = torch.cat(batches)
    assert probs.shape == (20, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(20))


def test_no_weight_decay_on_bias_and_batchnorm():
    groups = split_weight_decay(ToyConvNet(), weight_decay=5e-4)
    decayed, plain = groups
    assert all(p.ndim > 1 for p in decayed["params"]) and decayed["weight_decay"] == 5e-4
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0


def test_onecycle_schedule_peaks_at_lr(tmp_path):
    model = ImageClassifier(ToyConvNet(num_classes=4), num_classes=4, lr=0.2, lr_schedule="onecycle", warmup=0.5)
    lrs = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = make_trainer(tmp_path, max_epochs=2, logger=False, callbacks=[RecordLR()], enable_checkpointing=False)
    trainer.fit(model, random_loader(64, size=16))
    assert max(lrs) == pytest.approx(0.2, rel=0.05) and lrs[0] < 0.05 and lrs[-1] < 0.05


def test_warmup_cosine_factor_monotone_after_warmup():
    factors = [warmup_cosine_factor(s, 5, 50) for s in range(51)]
    assert factors[:5] == sorted(factors[:5]) and factors[5:] == sorted(factors[5:], reverse=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "resnet9000"}, "resnet20"),
        ({"num_classes": 1}, "num_classes"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"warmup": "3 epochs"}, "warmup must be"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_bad_arguments_fail_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier(**kwargs)
