"""LowRankFactorization with real Trainers: targets, exactness, optimizer, logs, checkpoints, bad input."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import LowRankFactorization
from lightning_compress.core.accounting import count_macs
from lightning_compress.core.architecture import ARCHITECTURE_KEY
from lightning_compress.module import ImageClassifier
from tests.toy import UserClassifier, random_loader


def _trainer(callbacks, tmp_path=None, **kw):
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=tmp_path is not None,
                      default_root_dir=tmp_path, callbacks=callbacks, **kw)


FULL_RANKS = {  # ToyConvNet: conv1 8->16 (3x3, stride 2), conv2 16->16 (3x3)
    "tucker2": {"*": 16},
    "spatial": {"net.conv1": 24, "net.conv2": 48},
    "depthwise_separable": {"*": 9},
}


@pytest.mark.parametrize("method", sorted(FULL_RANKS))
def test_full_rank_factorization_leaves_the_function_unchanged(method):
    torch.manual_seed(0)
    dense, model = UserClassifier(lr=1e-9), UserClassifier(lr=1e-9)
    model.load_state_dict(dense.state_dict())
    x = torch.randn(4, 3, 16, 16)
    _trainer([], max_steps=1).fit(dense, random_loader(16))  # BN statistics move the same way in both
    callback = LowRankFactorization(ranks=FULL_RANKS[method], method=method)
    _trainer([callback], max_steps=1).fit(model, random_loader(16))
    assert isinstance(model.net.conv1, nn.Sequential) and isinstance(model.net.conv2, nn.Sequential)
    assert set(callback.factorized) == {"conv1", "conv2"}
    torch.testing.assert_close(model.eval()(x), dense.eval()(x), atol=1e-4, rtol=1e-4)


class _Recorder(pl.Callback):
    def __init__(self):
        self.lrs, self.groups = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.groups.append([{id(p) for p in g["params"]} for g in optimizer.param_groups])


def test_kept_macs_ratio_on_a_zoo_model_with_rebuilt_optimizer_and_continued_schedule():
    torch.manual_seed(0)
    model = ImageClassifier("resnet20", num_classes=4, lr=0.05, warmup="2steps")
    reference = ImageClassifier("resnet20", num_classes=4, lr=0.05, warmup="2steps")
    example = torch.randn(1, 3, 16, 16)
    dense_macs = count_macs(model.model, example)
    callback, recorder, ref_recorder = LowRankFactorization(kept_macs_ratio=0.5, round_to=4), _Recorder(), _Recorder()
    _trainer([callback, recorder], max_steps=4).fit(model, random_loader(64))
    _trainer([ref_recorder], max_steps=4).fit(reference, random_loader(64))
    ratio = count_macs(model.model, example) / dense_macs
    assert 0.4 < ratio <= 0.5
    assert float(model.trainer.callback_metrics["macs/ratio"]) == pytest.approx(ratio, rel=1e-6)
    ranks = {k: float(v) for k, v in model.trainer.callback_metrics.items() if k.startswith("factorization/")}
    assert len(ranks) == len(callback.factorized) > 10
    assert all(rank % 4 == 0 or rank == 16 for rank in ranks.values())
    assert all(k.startswith("factorization/model.layer") and k.endswith("/rank") for k in ranks)
    # stem and classifier stay dense (the default layer rule)
    assert isinstance(model.model.conv1, nn.Conv2d) and isinstance(model.model.fc, nn.Linear)
    # every trainable parameter is in exactly the optimizer group of its kind (decay for weights)
    decay, no_decay = recorder.groups[-1]
    params = {id(p): p for p in model.parameters()}
    assert decay | no_decay == set(params) and not decay & no_decay
    assert all(params[i].ndim > 1 for i in decay) and all(params[i].ndim == 1 for i in no_decay)
    assert recorder.lrs == ref_recorder.lrs  # the LR schedule went on as in the dense run


def test_energy_target_and_start_later_in_the_run():
    model = UserClassifier()
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(isinstance(pl_module.net.conv2, nn.Sequential))

    callback = LowRankFactorization(energy=0.5, start="2steps", method="spatial")
    _trainer([callback, Spy()], max_steps=4).fit(model, random_loader(64))
    assert seen == [False, False, True, True]
    assert callback.factorized and all(method == "spatial" for method, _ in callback.factorized.values())


def test_checkpoint_loads_without_the_callback_and_fit_resumes(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier("resnet20", num_classes=4, lr=0.05)
    callback = LowRankFactorization(kept_macs_ratio=0.5, method="depthwise_separable")
    trainer = _trainer([callback], tmp_path, max_steps=2)
    trainer.fit(model, random_loader(32))
    path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=False)
    assert [r["kind"] for r in checkpoint[ARCHITECTURE_KEY]] == ["low_rank_factorization"]
    x = torch.randn(2, 3, 16, 16)
    loaded = ImageClassifier.load_from_checkpoint(path)  # no callback: the module replays the record
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))

    # resume with the callback on a user module (no RestoresArchitecture): the callback's hook rebuilds it
    user = UserClassifier()
    first = LowRankFactorization(ranks={"net.conv1": 4, "net.conv2": 8})
    trainer = _trainer([first], tmp_path / "user", max_steps=2)
    trainer.fit(user, random_loader(32))
    path = trainer.checkpoint_callback.best_model_path
    resumed_user, again = UserClassifier(), LowRankFactorization(ranks={"net.conv1": 4, "net.conv2": 8})
    trainer = _trainer([again], tmp_path / "user2", max_steps=4, max_epochs=4)
    trainer.fit(resumed_user, random_loader(32), ckpt_path=path)
    assert trainer.global_step == 4 and again.factorized == first.factorized
    assert resumed_user.net.conv1[1].weight.shape == (4, 4, 3, 3)  # rebuilt once, not factorized again
    assert len(trainer.optimizers[0].param_groups[0]["params"]) == len(list(resumed_user.parameters()))


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give exactly one of kept_macs_ratio"),
    ({"kept_macs_ratio": 0.5, "energy": 0.9}, "give exactly one of kept_macs_ratio"),
    ({"kept_macs_ratio": 1.0}, r"kept_macs_ratio must be a number in \(0, 1\)"),
    ({"energy": 0.0}, r"energy must be a number in \(0, 1\]"),
    ({"ranks": 0}, "ranks must be an integer >= 1"),
    ({"ranks": {"*": 2.5}}, "ranks must be an integer >= 1"),
    ({"ranks": 4, "method": "cp"}, r"method must be one of \('tucker2', 'spatial', 'depthwise_separable'\)"),
    ({"ranks": 4, "round_to": 0}, "round_to must be an integer >= 1"),
    ({"ranks": 4, "start": "soon"}, "start must be"),
])
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankFactorization(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"ranks": 17}, r"rank 17 for layer 'net.conv1' is larger than possible: tucker2 of .* allows ranks 1..16"),
    ({"ranks": 10, "method": "depthwise_separable"}, r"larger than possible: depthwise_separable .* ranks 1..9"),
    ({"ranks": {"net.conv1": 4}}, r"layer 'net.conv2' matches no ranks key"),
    ({"ranks": {"*": 4, "net.nothing": 2}}, r"ranks key 'net.nothing' matches no selected layer"),
    ({"ranks": 4, "exclude": "net.missing"}, r"exclude pattern 'net.missing' matches no layer"),
    ({"ranks": 4, "start": 1.0}, "leave at least one step of fine-tuning"),
    ({"kept_macs_ratio": 0.05}, r"kept_macs_ratio=0.05: the MACs target is unreachable"),
    ({"kept_macs_ratio": 0.3, "round_to": 16, "start": 0.5}, r"kept_macs_ratio=0.3: the MACs target is unreachable"),
])
def test_bad_setups_fail_before_any_training_step(kwargs, match):
    model = UserClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = _trainer([LowRankFactorization(**kwargs)], max_steps=4)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, random_loader(32))
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _fit_with_checkpoints(root, ckpt_path=None):
    torch.manual_seed(0)
    model = UserClassifier()
    factorization = LowRankFactorization(kept_macs_ratio=0.5, method="spatial", start="3steps")
    checkpoints = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer([factorization, checkpoints], root, max_epochs=4)
    trainer.fit(model, random_loader(32), ckpt_path=ckpt_path)
    return model, factorization


@pytest.mark.parametrize("epoch", [0, 1])  # step 2: before the factorization at step 3; step 4: after it
def test_a_resumed_run_ends_with_bitwise_equal_weights(tmp_path, epoch):
    uninterrupted, factorization = _fit_with_checkpoints(tmp_path / "a")
    resumed, again = _fit_with_checkpoints(tmp_path / "b", ckpt_path=tmp_path / "a" / f"epoch={epoch}.ckpt")
    assert again.factorized == factorization.factorized
    assert uninterrupted.state_dict().keys() == resumed.state_dict().keys()
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(precision):
    model = UserClassifier()
    callback = LowRankFactorization(kept_macs_ratio=0.5)
    _trainer([callback], max_steps=2, precision=precision).fit(model, random_loader(32))
    assert callback.factorized and all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()
