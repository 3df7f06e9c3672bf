"""CompressionCallback: one step budget and one composition check per fit, visible patches removed at
teardown, a user's own technique as a short subclass, every hook marked @override."""

from __future__ import annotations

import inspect
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_compress
from lightning_compress import ChannelPruning, CompressionCallback, CompressionReport, Effect, StepWindow
from lightning_compress.core import callback as callback_module
from tests.toy import UserClassifier, random_loader


class ZeroSmallestHalf(CompressionCallback):
    """The README's example: zero the smaller half of every Conv2d weight once, at step ``at``."""

    effect = Effect.MASKS

    def __init__(self, at: int = 2) -> None:
        super().__init__()
        self.at = at

    def declaration(self, budget):
        return self.declare(StepWindow(self.at, self.at))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.window.start:
            return
        with torch.no_grad():
            for module in pl_module.modules():
                if isinstance(module, torch.nn.Conv2d):
                    w = module.weight
                    w.mul_(w.abs() >= w.abs().flatten().median())


def _trainer(callbacks, tmp_path, **kwargs):
    return pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=callbacks, **kwargs)


def test_user_subclass_acts_at_its_step_and_declares_its_window(tmp_path):
    zeros = []

    class ZerosSeen(Callback):  # listed after the technique: sees each batch's weights after it acted
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            zeros.append(round(float((pl_module.net.conv1.weight == 0).float().mean()), 2))

    model, custom = UserClassifier(), ZeroSmallestHalf(at=2)
    _trainer([custom, ZerosSeen()], tmp_path).fit(model, random_loader())
    assert custom.window == StepWindow(2, 2)
    assert custom.network_name == "net"
    assert zeros[:2] == [0.0, 0.0] and zeros[2] >= 0.5 and zeros[3] < 0.5  # once, at step 2, then trained


def test_one_step_budget_and_one_composition_check_per_fit(tmp_path, monkeypatch):
    budgets, checks = [], []
    real_budget, real_check = callback_module.step_budget, callback_module.check_declarations
    monkeypatch.setattr(callback_module, "step_budget", lambda trainer: budgets.append(1) or real_budget(trainer))
    monkeypatch.setattr(callback_module, "check_declarations", lambda found: checks.append(list(found)) or real_check(found))
    callbacks = [ZeroSmallestHalf(), ChannelPruning(channel_ratio=0.25, start=0.0, end=0.5, update_every=1),
                 CompressionReport(latency_batch_sizes=(), dirpath=str(tmp_path))]
    _trainer(callbacks, tmp_path).fit(UserClassifier(), random_loader())
    assert len(budgets) == 1 and len(checks) == 1
    assert [d.callback for d in checks[0]] == ["ZeroSmallestHalf", "ChannelPruning", "CompressionReport"]
    assert all(cb.composition == checks[0] for cb in callbacks)
    assert callbacks[1].window == StepWindow(0, 2, 1)


def test_composition_error_names_both_callbacks_before_training(tmp_path):
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    callbacks = [ZeroSmallestHalf(at=1), ChannelPruning(channel_ratio=0.25, start=0.0, end=0.5, update_every=1,
                                                         round_to=3)]
    from lightning_compress import MagnitudePruning

    callbacks.append(MagnitudePruning(pattern="2:4", start=0.0, end=0.5, update_every=1))
    with pytest.raises(ValueError, match="MagnitudePruning.*ChannelPruning.*round_to"):
        _trainer(callbacks + [Count()], tmp_path).fit(UserClassifier(), random_loader())
    assert steps == []


class _Probe(Callback):
    def __init__(self, watched, fail_at=None):
        self.watched, self.fail_at, self.seen = watched, fail_at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((repr(self.watched), "on_load_checkpoint" in pl_module.__dict__))
        if trainer.global_step == self.fail_at:
            raise RuntimeError("stop here")


def test_restore_patch_is_visible_during_fit_and_gone_after(tmp_path, caplog):
    model, custom = UserClassifier(), ZeroSmallestHalf()
    probe = _Probe(custom)
    with caplog.at_level("INFO"):
        _trainer([custom, probe], tmp_path).fit(model, random_loader())
    text, patched = probe.seen[0]
    assert patched and "UserClassifier.on_load_checkpoint" in text
    assert any("ZeroSmallestHalf: masks weights on 'net', steps 2..2; patches UserClassifier.on_load_checkpoint"
               in r.getMessage() for r in caplog.records)
    assert "on_load_checkpoint" not in model.__dict__ and custom.patches == []
    assert "patches" not in repr(custom)


def test_patches_are_removed_when_fit_fails(tmp_path):
    model, custom = UserClassifier(), ZeroSmallestHalf()
    with pytest.raises(RuntimeError, match="stop here"):
        _trainer([custom, _Probe(custom, fail_at=1)], tmp_path).fit(model, random_loader())
    assert "on_load_checkpoint" not in model.__dict__ and custom.patches == []
    assert not callback_module._VERDICTS  # a later fit checks its own composition


def test_declaration_is_abstract():
    class NoDeclaration(CompressionCallback):
        effect = Effect.MASKS

    with pytest.raises(TypeError, match="declaration"):
        NoDeclaration()


def _shipped_callbacks():
    return [getattr(lightning_compress, name) for name in lightning_compress.__all__
            if inspect.isclass(getattr(lightning_compress, name))
            and issubclass(getattr(lightning_compress, name), Callback)]


def test_every_shipped_callback_subclasses_the_base():
    shipped = _shipped_callbacks()
    assert len(shipped) >= 8
    assert all(issubclass(cls, CompressionCallback) for cls in shipped)


def test_every_hook_override_is_marked():
    hooks = {name for name in dir(Callback) if not name.startswith("_")} | {"declaration", "setup_fit"}
    subclasses = [cls for cls in _shipped_callbacks() if cls is not CompressionCallback]
    unmarked = [f"{cls.__name__}.{name}" for cls in subclasses + [CompressionCallback]
                for name, value in vars(cls).items()
                if name in hooks - ({"declaration", "setup_fit"} if cls is CompressionCallback else set()) and inspect.isfunction(value) and not getattr(value, "__override__", False)]
    assert unmarked == []


def test_a_sharding_strategy_is_refused_before_training(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    from lightning_compress import MagnitudePruning

    callbacks = [MagnitudePruning(final_sparsity=0.5), ZeroSmallestHalf(), Count()]
    trainer = _trainer(callbacks, tmp_path, strategy=ModelParallelStrategy(), accelerator="cpu", devices=1)
    environment = dict(os.environ)
    try:
        with pytest.raises(ValueError, match=r"strategy=ModelParallelStrategy shards .* \(needed by "
                                             r"MagnitudePruning, ZeroSmallestHalf\); .* 'ddp'"):
            trainer.fit(UserClassifier(), random_loader())
    finally:  # the strategy set up a process group and its variables before the callbacks' setup: later DDP tests
        if torch.distributed.is_initialized():  # in this process would find its port taken
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    assert steps == []


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "model_parallel", "single", "ddp", "ddp_spawn"])
def test_strategies_that_keep_whole_parameters_are_accepted_the_rest_refused(strategy):
    from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                              SingleDeviceStrategy)

    built = {"fsdp": FSDPStrategy, "model_parallel": ModelParallelStrategy, "single": lambda: SingleDeviceStrategy("cpu"),
             "ddp": DDPStrategy, "ddp_spawn": lambda: DDPStrategy(start_method="spawn"),
             # DeepSpeed itself is not installed here; the check looks only at the strategy's type
             "deepspeed": lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy)}[strategy]()
    if strategy in ("fsdp", "deepspeed", "model_parallel"):
        with pytest.raises(ValueError, match=f"strategy={type(built).__name__} shards or wraps"):
            callback_module.check_strategy(built, [ZeroSmallestHalf()])
    else:
        callback_module.check_strategy(built, [ZeroSmallestHalf()])
