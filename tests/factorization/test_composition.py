"""LowRankFactorization with the other techniques: QAT, MagnitudePruning, KnowledgeDistillation(teacher="self")."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress import (
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.core.architecture import ARCHITECTURE_KEY
from lightning_compress.module import ImageClassifier
from tests.toy import UserClassifier, random_loader


def _trainer(callbacks, tmp_path=None, **kw):
    kw.setdefault("max_epochs", 4)
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=tmp_path is not None,
                      default_root_dir=tmp_path, callbacks=callbacks, **kw)


def test_factorized_layers_quantize_and_the_checkpoint_replays_both_changes(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier("resnet20", num_classes=4, lr=0.02)
    callbacks = [QuantizationAwareTraining(start="1steps", engine="x86"), LowRankFactorization(kept_macs_ratio=0.5, round_to=4)]
    trainer = _trainer(callbacks, tmp_path, max_steps=3)
    trainer.fit(model, random_loader(48))
    int8_modules = {type(m).__module__ for m in model.model.modules()}
    assert any("quantized" in name for name in int8_modules)
    int8_convs = [n for n, m in model.model.named_modules() if type(m).__name__.startswith("Conv") and
                  "quantized" in type(m).__module__]
    assert any(n.startswith("layer1.0.conv1.") for n in int8_convs)  # a factor of a factorized layer is int8
    x = torch.randn(2, 3, 16, 16)
    assert model.eval()(x).shape == (2, 4)
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert [r["kind"] for r in checkpoint[ARCHITECTURE_KEY]] == ["low_rank_factorization",
                                                                 "quantization_aware_training"]
    loaded = ImageClassifier.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert any(n.startswith("layer1.0.conv1.") for n, _ in loaded.model.named_modules())
    assert loaded.eval()(x).shape == (2, 4)


def test_quantization_must_start_after_the_factorization_step():
    trainer = _trainer([LowRankFactorization(ranks=4), QuantizationAwareTraining(start=0.0)], max_steps=4)
    with pytest.raises(ValueError, match="the architecture must be final before quantization starts"):
        trainer.fit(UserClassifier(), random_loader(32))


def test_magnitude_pruning_masks_the_factor_layers_after_the_factorization():
    torch.manual_seed(0)
    model = UserClassifier()
    pruning = MagnitudePruning(final_sparsity=0.5, schedule="constant", start="1steps", end="3steps",
                               update_every=1)
    factorization = LowRankFactorization(ranks=8)
    _trainer([pruning, factorization], max_steps=4).fit(model, random_loader(64))
    factors = [m.weight for m in (*model.net.conv1, *model.net.conv2)]
    sparsity = sum(int((w == 0).sum()) for w in factors) / sum(w.numel() for w in factors)
    assert sparsity == pytest.approx(0.5, abs=0.02)


def test_masks_taken_after_the_factorization_resume_onto_the_rebuilt_factor_layers(tmp_path):
    """A checkpoint saved once masks exist on the factor layers resumes: the rebuilt factors are re-selected."""

    class Stopped(Exception):
        pass

    class StopAtStep4(pl.Callback):  # the next epoch's first batch (a plain DataLoader restarts its epoch)
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 4:
                raise Stopped

    def run(*extra, folder, ckpt_path=None):
        torch.manual_seed(0)
        model = UserClassifier()
        pruning = MagnitudePruning(final_sparsity=0.5, start="1steps", end="6steps", update_every=1)
        saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1,
                                             save_top_k=0)
        trainer = _trainer([pruning, LowRankFactorization(ranks=8), saver, *extra], tmp_path, max_steps=8)
        trainer.fit(model, random_loader(64), ckpt_path=ckpt_path)
        return model, pruning

    straight, _ = run(folder="straight")
    with pytest.raises(Stopped):  # factorized at step 0, masks on the factors from step 1, saved after step 4
        run(StopAtStep4(), folder="stopped")
    resumed, pruning = run(folder="resumed", ckpt_path=tmp_path / "stopped" / "last.ckpt")
    assert [name for name in pruning._names if ".conv" in name] == [f"net.conv{i}.{j}.weight" for i in (1, 2)
                                                                     for j in range(3)]
    factors = [m.weight for m in (*resumed.net.conv1, *resumed.net.conv2)]
    assert sum(int((w == 0).sum()) for w in factors) / sum(w.numel() for w in factors) == pytest.approx(0.5, abs=0.02)
    expected, got = straight.state_dict(), resumed.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    finished, _ = run(folder="again", ckpt_path=tmp_path / "straight" / "last.ckpt")  # nothing left to train
    assert [k for k in expected if not torch.equal(expected[k], finished.state_dict()[k])] == []


def test_magnitude_pruning_may_not_mask_before_the_factorization():
    trainer = _trainer([MagnitudePruning(final_sparsity=0.5, start=0.0, end=0.5), LowRankFactorization(ranks=4)],
                       max_steps=4)
    with pytest.raises(ValueError, match="replaces layers until step 0"):
        trainer.fit(UserClassifier(), random_loader(32))


class _TeacherProbe(pl.Callback):
    """Records the teacher's logits and the student's on a fixed input after every step."""

    def __init__(self, kd, x):
        self.kd, self.x, self.teacher_logits = kd, x, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.teacher_logits.append(self.kd.teacher(self.x).clone())


def test_self_teacher_is_the_network_before_compression_and_survives_a_resume(tmp_path):
    torch.manual_seed(0)
    model = UserClassifier()
    dense = copy.deepcopy(model.net).eval()
    x = torch.randn(4, 3, 16, 16)
    kd = KnowledgeDistillation(teacher="self", alpha=0.5)
    probe = _TeacherProbe(kd, x)
    trainer = _trainer([kd, LowRankFactorization(ranks=4), probe], tmp_path, max_steps=2, max_epochs=1)
    trainer.fit(model, random_loader(32))
    assert isinstance(model.net.conv1, nn.Sequential)
    with torch.no_grad():
        expected = dense(x)
    for logits in probe.teacher_logits:  # frozen: the dense network's outputs at every step
        torch.testing.assert_close(logits, expected)
    assert all(not p.requires_grad for p in kd.teacher.module.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())
    assert 0.0 <= float(trainer.callback_metrics["distill/agreement"]) <= 1.0

    # resumed on a freshly built module: the student is rebuilt factorized, the teacher is the saved dense one
    kd_again = KnowledgeDistillation(teacher="self", alpha=0.5)
    probe_again = _TeacherProbe(kd_again, x)
    trainer = _trainer([kd_again, LowRankFactorization(ranks=4), probe_again], tmp_path / "resume", max_steps=4)
    trainer.fit(UserClassifier(), random_loader(32), ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"))
    assert trainer.global_step == 4
    torch.testing.assert_close(probe_again.teacher_logits[-1], expected)


def test_self_teacher_rejects_checkpoint_arguments():
    with pytest.raises(ValueError, match="teacher='self' copies the student network at fit start"):
        KnowledgeDistillation(teacher="self", checkpoint="teacher.ckpt")
