"""The training_step wrapper is a visible patch: named in the log line and repr during a fit, gone after."""

import logging

import lightning.pytorch as pl
import pytest

from lightning_compress.distillation import KnowledgeDistillation
from tests.distillation.test_callback import _trainer
from tests.toy import ToyConvNet, UserClassifier, random_loader


class Spy(pl.Callback):
    """Records ``repr(kd)`` and whether ``training_step`` is patched at each batch; can fail at a step."""

    def __init__(self, kd, fail_at=None):
        self.kd, self.fail_at = kd, fail_at
        self.reprs, self.patched = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.reprs.append(repr(self.kd))
        self.patched.append("training_step" in pl_module.__dict__)
        if trainer.global_step == self.fail_at:
            raise RuntimeError(f"stopped at step {self.fail_at}")


def test_patch_named_during_fit_and_removed_after(caplog):
    student = UserClassifier()
    kd = KnowledgeDistillation(ToyConvNet())
    spy = Spy(kd)
    with caplog.at_level(logging.INFO):
        _trainer([kd, spy], max_steps=2).fit(student, random_loader(32, batch_size=16))
    assert spy.patched == [True, True]
    patch = "UserClassifier.training_step (adds the distillation term to the loss)"
    assert patch in spy.reprs[0] and "network='net'" in spy.reprs[0]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KnowledgeDistillation: changes")]
    assert len(lines) == 1 and "on 'net'" in lines[0] and patch in lines[0]
    assert "training_step" not in student.__dict__
    assert "on_load_checkpoint" not in student.__dict__
    assert kd.patches == []
    assert "training_step" not in repr(kd)
    assert not student.net._forward_hooks


def test_patch_removed_after_a_fit_that_fails_mid_training():
    student = UserClassifier()
    kd = KnowledgeDistillation(ToyConvNet())
    spy = Spy(kd, fail_at=1)
    with pytest.raises(RuntimeError, match="stopped at step 1"):
        _trainer([kd, spy], max_steps=4).fit(student, random_loader(64, batch_size=16))
    assert spy.patched == [True, True]
    assert all("training_step" in r for r in spy.reprs)
    assert "training_step" not in student.__dict__
    assert "on_load_checkpoint" not in student.__dict__
    assert kd.patches == []
    assert not student.net._forward_hooks


def test_a_users_own_instance_training_step_is_put_back():
    student = UserClassifier()
    calls = []

    def training_step(batch, batch_idx):
        calls.append(batch_idx)
        return UserClassifier.training_step(student, batch, batch_idx)

    student.training_step = training_step
    kd = KnowledgeDistillation(ToyConvNet())
    _trainer([kd], max_steps=2).fit(student, random_loader(32, batch_size=16))
    assert calls == [0, 1]  # distillation wrapped the user's own patch
    assert student.__dict__["training_step"] is training_step
    assert kd.patches == []
