import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelPruning
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tests.toy import UserClassifier, random_loader
from torch import nn

from lightning_compress.core.progress import StepBudget
from lightning_compress.pruning import NM, Channel, MagnitudePruning, Unstructured, linear_sparsity
from lightning_compress.pruning.masks import pack_mask

PRUNED = ["net.conv1.weight", "net.conv2.weight"]  # the default rule skips the stem and the classifier


def make_trainer(callbacks, max_epochs=3, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **{**defaults, **kwargs})


def sparsity(model, name):
    return (model.get_parameter(name) == 0).float().mean().item()


def pruning_of(trainer):
    return next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))


class MaskCheckingClassifier(UserClassifier):
    """Asserts at every training forward that every masked weight is exactly zero."""

    checked_batches = 0

    def training_step(self, batch, batch_idx):
        masks = pruning_of(self.trainer).masks
        for name, mask in masks.items():
            assert (self.get_parameter(name)[~mask] == 0).all(), f"{name} regrew at step {self.global_step}"
        self.checked_batches += bool(masks)
        return super().training_step(batch, batch_idx)


class GradientProbe(Callback):
    """Runs after MagnitudePruning: pruned weights must reach the optimizer with zero gradient."""

    checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, mask in pruning_of(trainer).masks.items():
            grad = pl_module.get_parameter(name).grad
            assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
            self.checked += 1


# ---------------------------------------------------------------- bad input -> ValueError before training
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(final_sparsity=1.0), r"final_sparsity must be a number in \[0, 1\)"),
        (dict(final_sparsity=-0.1), "final_sparsity must be"),
        (dict(), "final_sparsity is required"),
        (dict(final_sparsity=0.5, initial_sparsity=0.6), "initial_sparsity .* must not exceed"),
        (dict(final_sparsity=0.5, start=0.5, end=0.5), "start must come before end"),
        (dict(final_sparsity=0.5, start="3ep", end="2ep"), "start must come before end"),
        (dict(final_sparsity=0.5, end=1.5), "end must be"),
        (dict(final_sparsity=0.5, update_every=0), "update_every must be an integer number of optimizer steps"),
        (dict(final_sparsity=0.5, update_every=2.5), r"update_every must be .* got 2.5"),
        (dict(final_sparsity=0.5, update_every="often"), r"update_every must be .*'<n>ep'"),
        (dict(pattern="4:2"), "pattern must be"),
        (dict(pattern="2.5:4"), "pattern must be"),
        (dict(pattern="0:4"), "pattern must be"),
        (dict(pattern="block"), "pattern must be"),
        (dict(pattern="2:4", final_sparsity=0.9), "fixes final_sparsity to 0.5"),
        (dict(final_sparsity=0.5, scope="local"), "scope must be one of"),
        (dict(final_sparsity={"net.conv1": 0.5}), "needs scope='layerwise'"),
        (dict(final_sparsity={"net.conv1": 1.2}, scope="layerwise"), r"final_sparsity\['net.conv1'\]"),
        (dict(final_sparsity=0.5, schedule="quadratic"), "schedule must be one of"),
        (dict(final_sparsity=0.5, channel_norm="l3"), "channel_norm must be one of"),
        (dict(final_sparsity=0.5, histogram_every=0), "histogram_every must be"),
        (dict(final_sparsity=0.5, include=[3]), "include must be"),
    ],
)
def test_invalid_arguments_raise_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(final_sparsity=0.5, include="net.conv9"),
         r"include pattern 'net.conv9' matches no layer.*net.conv1"),
        (dict(final_sparsity={"net.conv1": 0.5, "*.nothing": 0.2}, scope="layerwise"),
         r"key '\*.nothing' matches no pruned layer.*'net.conv1', 'net.conv2'"),
        (dict(final_sparsity={"net.conv1": 0.5}, scope="layerwise"),
         "layer 'net.conv2' matches no final_sparsity key"),
        (dict(pattern="1:3"), r"layer 'net.conv1' has weight shape \(16, 8, 3, 3\).*multiple of M=3"),
        (dict(final_sparsity=0.5, start="2ep", end=0.1), r"start='2ep' \(step 8\) must come before end=0.1"),
    ],
)
def test_invalid_arguments_for_this_model_raise_before_training(kwargs, message):
    trainer = make_trainer([MagnitudePruning(**kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(UserClassifier(), random_loader())
    assert trainer.global_step == 0


def test_conflicts_with_lightning_model_pruning():
    lightning_pruning = ModelPruning("l1_unstructured", amount=0.5)
    trainer = make_trainer([MagnitudePruning(final_sparsity=0.5), lightning_pruning])
    with pytest.raises(ValueError, match="ModelPruning"):
        trainer.fit(UserClassifier(), random_loader())


# ---------------------------------------------------------------- behaviour during fit
def test_prunes_gradually_keeps_zeros_through_fine_tuning_and_leaves_plain_model(caplog):
    model = MaskCheckingClassifier()
    pruning = MagnitudePruning(final_sparsity=0.8, end=0.5, update_every=2)
    probe = GradientProbe()
    trainer = make_trainer([pruning, probe], max_epochs=4)  # 16 steps, window [0, 8]
    with caplog.at_level(logging.INFO):
        trainer.fit(model, random_loader())
    assert model.checked_batches == 16 and probe.checked == 2 * 16  # every forward and step after step 0
    total = sum(model.get_parameter(n).numel() for n in PRUNED)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in PRUNED)
    assert zeros == round(0.8 * total)
    assert sparsity(model, "net.stem.weight") == 0.0 and sparsity(model, "net.fc.weight") == 0.0
    # fit end: masks dropped, no hooks, ordinary parameters, state_dict loads into the plain class
    assert pruning.masks == {}
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    plain = UserClassifier()
    plain.load_state_dict(model.state_dict(), strict=True)
    assert sparsity(plain, "net.conv2.weight") == sparsity(model, "net.conv2.weight") > 0.5
    assert "net.conv1 | 16x8x3x3 | 1152 |" in caplog.text
    assert f"**total** | | 3456 | {zeros} | 80.01% |" in caplog.text


def test_logs_schedule_and_sparsity_to_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    pruning = MagnitudePruning(final_sparsity=0.8, schedule="linear", start=0.0, end="8steps", update_every=2,
                               histogram_every=4)
    trainer = make_trainer([pruning], logger=logger, log_every_n_steps=1)
    trainer.fit(UserClassifier(), random_loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    expected = {"sparsity/global", "sparsity/target", "sparsity/net.conv1", "sparsity/net.conv2"}
    assert expected <= set(tags["scalars"])
    target = {e.step: e.value for e in events.Scalars("sparsity/target")}
    achieved = {e.step: e.value for e in events.Scalars("sparsity/global")}
    assert sorted(target) == list(range(12))  # every step (log_every_n_steps=1) of 3 epochs x 4 batches
    for tb_step, value in target.items():
        global_step = tb_step + 1  # Lightning records batch-end metrics under the step before the increment
        last_update = min(8, global_step - global_step % 2)
        assert value == pytest.approx(linear_sparsity(last_update / 8, 0.0, 0.8), abs=1e-6)
        assert achieved[tb_step] == pytest.approx(value, abs=1 / 3456)
    conv2 = {e.step: e.value for e in events.Scalars("sparsity/net.conv2")}
    assert conv2[11] > achieved[11] > 0.79  # one global threshold: the wider layer is pruned harder
    assert {"sparsity/weights/net.conv1", "sparsity/weights/net.conv2"} <= set(tags["histograms"])
    assert [e.step for e in events.Histograms("sparsity/weights/net.conv2")] == [4, 8, 12]
    text = events.Tensors("sparsity/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| net.conv2 | 16x16x3x3 | 2304 |" in text


def test_positions_in_optimizer_steps_under_gradient_accumulation():
    model = MaskCheckingClassifier()
    pruning = MagnitudePruning(final_sparsity=0.6, schedule="linear", start="1ep", end="2ep", update_every=1)
    updates = []

    class UpdateSpy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            updates.append((trainer.global_step, pruning._last_update_step, pruning._target))

    trainer = make_trainer([pruning, UpdateSpy()], accumulate_grad_batches=2)  # 2 optimizer steps per epoch
    trainer.fit(model, random_loader())
    assert (pruning._window.start, pruning._window.end) == (2, 4)
    done = sorted({(u, t) for _, u, t in updates if u is not None})
    assert done == [(2, 0.0), (3, pytest.approx(0.3)), (4, pytest.approx(0.6))]
    assert sum(int((model.get_parameter(n) == 0).sum()) for n in PRUNED) == round(0.6 * 3456)


def test_layerwise_per_layer_targets():
    model = UserClassifier()
    pruning = MagnitudePruning(final_sparsity={"*.conv1": 0.25, "*": 0.75}, scope="layerwise", update_every=3)
    make_trainer([pruning], max_epochs=2).fit(model, random_loader())
    assert sparsity(model, "net.conv1.weight") == 0.25 and sparsity(model, "net.conv2.weight") == 0.75


def test_include_exclude_and_one_shot_schedule():
    model = MaskCheckingClassifier()
    pruning = MagnitudePruning(final_sparsity=0.5, schedule="constant", include=["net.*"],
                               exclude="net.conv1")
    make_trainer([pruning], max_epochs=1).fit(model, random_loader())
    assert model.checked_batches == 4  # pruned before the very first forward
    assert sparsity(model, "net.conv1.weight") == 0.0
    pruned = [model.get_parameter(n) for n in ("net.stem.weight", "net.conv2.weight", "net.fc.weight")]
    total = sum(w.numel() for w in pruned)
    zeros = sum(int((w == 0).sum()) for w in pruned)
    assert zeros == round(0.5 * total)


def test_two_to_four_pattern():
    model = MaskCheckingClassifier()
    make_trainer([MagnitudePruning(pattern="2:4", update_every=2)]).fit(model, random_loader())
    for name in PRUNED:
        w = model.get_parameter(name)
        groups = (w != 0).movedim(1, -1).reshape(*w.shape[:1], *w.shape[2:], w.shape[1] // 4, 4)
        assert (groups.sum(-1) == 2).all()


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_channel_pattern_zeroes_whole_filters(scope):
    model = MaskCheckingClassifier()
    make_trainer([MagnitudePruning(final_sparsity=0.5, pattern="channel", scope=scope, channel_norm="l2")],
                 max_epochs=2).fit(model, random_loader())
    zero_weights = 0
    for name in PRUNED:
        rows = model.get_parameter(name).reshape(16, -1) == 0
        assert torch.equal(rows.all(1), rows.any(1))  # every filter is entirely zero or entirely kept
        zero_weights += int(rows.sum())
        if scope == "layerwise":
            assert int(rows.all(1).sum()) == 8
    assert 0.45 <= zero_weights / 3456 <= 0.5  # global: filters pruned while they fit in half the weights


class MaskSpy(Callback):
    """Keeps a copy of the masks at train end (they are dropped at fit end)."""

    def on_train_end(self, trainer, pl_module):
        self.masks = {name: mask.clone() for name, mask in pruning_of(trainer).masks.items()}


@pytest.mark.parametrize(
    ("spelling", "typed", "final"),
    [("unstructured", Unstructured(), 0.6), ("2:4", NM(2, 4), None), ("channel", Channel(), 0.5)],
)
def test_a_typed_pattern_gives_the_same_masks_as_its_spelling(spelling, typed, final):
    found = []
    for pattern in (spelling, typed):
        torch.manual_seed(0)
        model, spy = UserClassifier(), MaskSpy()
        pruning = MagnitudePruning(final_sparsity=final, pattern=pattern, end="3steps", update_every=1)
        make_trainer([pruning, spy], max_epochs=1).fit(model, random_loader())
        assert pruning.pattern == spelling and str(pruning.pattern) == spelling
        found.append(spy.masks)
    assert sorted(found[0]) == sorted(found[1]) == PRUNED
    assert all(torch.equal(found[0][name], found[1][name]) for name in PRUNED)
    assert not all(found[0][name].all() for name in PRUNED)  # something was pruned


def test_declares_the_nm_pattern_for_the_composition_check():
    budget = StepBudget(100, 10)
    pruning = MagnitudePruning(pattern=NM(2, 4), start="1ep", end=0.5, update_every=5)
    window = pruning.declaration(budget).window
    assert (window.start, window.end, window.every) == (10, 50, 5)
    assert MagnitudePruning(pattern="2:4").declaration(budget).details == {"nm": (2, 4)}
    assert MagnitudePruning(final_sparsity=0.5, pattern="channel").declaration(budget).details == {"nm": None}

def test_bf16_mixed_precision():
    model = MaskCheckingClassifier()
    make_trainer([MagnitudePruning(final_sparsity=0.7, update_every=1)], precision="bf16-mixed").fit(
        model, random_loader())
    assert model.checked_batches == 12
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in PRUNED)
    assert zeros == round(0.7 * 3456)


def test_masks_follow_parameters_when_modules_are_replaced():
    """Another callback (QAT preparation, surgery) swaps a module: the mask must apply to the new tensor."""

    class SwapConv2(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                old = pl_module.net.conv2
                new = nn.Conv2d(16, 16, 3, padding=1, bias=False)
                new.weight = nn.Parameter(old.weight.detach().clone())  # a new tensor object, same values
                pl_module.net.conv2 = new
                trainer.optimizers[0].param_groups[0]["params"] = list(pl_module.parameters())

    model = MaskCheckingClassifier()
    make_trainer([SwapConv2(), MagnitudePruning(final_sparsity=0.8, end=0.5, update_every=2)]).fit(
        model, random_loader())
    assert model.checked_batches == 12
    assert sum(int((model.get_parameter(n) == 0).sum()) for n in PRUNED) == round(0.8 * 3456)


# ---------------------------------------------------------------- checkpoints
def _fit_with_checkpoints(tmp_path, ckpt_path=None):
    torch.manual_seed(0)
    model = UserClassifier()
    pruning = MagnitudePruning(final_sparsity=0.8, start="1steps", end="3ep", update_every=3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = make_trainer([pruning, checkpoints], max_epochs=4, enable_checkpointing=True)
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return model


def test_resume_mid_schedule_ends_identical_to_uninterrupted_run(tmp_path):
    uninterrupted = _fit_with_checkpoints(tmp_path / "a")
    mid = tmp_path / "a" / "epoch=1.ckpt"  # step 8 of a [1, 12] schedule, between updates at 7 and 10
    callbacks = torch.load(mid, weights_only=True)["callbacks"]
    state = next(v for k, v in callbacks.items() if "MagnitudePruning" in k)
    assert state["last_update_step"] == 7 and state["masks"]["net.conv2.weight"].dtype == torch.uint8
    assert state["masks"]["net.conv2.weight"].numel() == 2304 // 8
    resumed = _fit_with_checkpoints(tmp_path / "b", ckpt_path=mid)
    for name, param in uninterrupted.named_parameters():
        assert torch.equal(param, resumed.get_parameter(name)), name
    assert sum(int((resumed.get_parameter(n) == 0).sum()) for n in PRUNED) == round(0.8 * 3456)


def test_checkpoint_with_masks_of_wrong_shape_names_the_layer(tmp_path):
    _fit_with_checkpoints(tmp_path / "a")
    checkpoint = torch.load(tmp_path / "a" / "epoch=1.ckpt", weights_only=True)
    state = next(v for k, v in checkpoint["callbacks"].items() if "MagnitudePruning" in k)
    state["masks"]["net.conv1.weight"] = pack_mask(torch.ones(8, 8, 3, 3, dtype=torch.bool))
    state["shapes"]["net.conv1.weight"] = [8, 8, 3, 3]
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"layer 'net.conv1' has shape \(8, 8, 3, 3\).*\(16, 8, 3, 3\)"):
        _fit_with_checkpoints(tmp_path / "b", ckpt_path=tmp_path / "bad.ckpt")
