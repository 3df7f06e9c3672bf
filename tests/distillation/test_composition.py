"""KnowledgeDistillation in one Trainer with the other techniques, and under DDP."""

import pytest
import torch

from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.quantization import QuantizationAwareTraining
from tests.ddp import run_two_ranks
from tests.distillation.test_callback import Recorder, _trainer
from tests.toy import ToyConvNet, UserClassifier, random_loader


def test_with_magnitude_pruning():
    student, rec = UserClassifier(), Recorder()
    pruning = MagnitudePruning(final_sparsity=0.5, start=0.0, end=0.5, update_every=1)
    _trainer([KnowledgeDistillation(ToyConvNet(), alpha=0.5), pruning, rec], max_steps=4).fit(
        student, random_loader(64, batch_size=16))
    assert len(rec.metrics) == 4 and all(m["distill/kd_loss"] > 0 for m in rec.metrics)
    pruned = torch.cat([student.net.conv1.weight.flatten(), student.net.conv2.weight.flatten()])
    assert (pruned == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert "training_step" not in student.__dict__


@pytest.mark.parametrize("kd_first", [True, False])
def test_with_quantization_aware_training(kd_first):
    student, rec = UserClassifier(), Recorder()
    original = student.net
    kd, qat = KnowledgeDistillation(ToyConvNet(), alpha=0.5), QuantizationAwareTraining()
    callbacks = [kd, qat, rec] if kd_first else [qat, kd, rec]
    _trainer(callbacks, max_steps=3).fit(student, random_loader(48, batch_size=16))
    # QAT swapped the network object; the capture hook followed it, so every step was distilled
    assert student.net is not original
    assert len(rec.metrics) == 3 and all(torch.isfinite(torch.tensor(m["distill/kd_loss"])) for m in rec.metrics)
    assert rec.metrics[-1]["distill/kd_loss"] > 0
    assert "training_step" not in student.__dict__


DDP_BODY = """
from lightning_compress.distillation import KnowledgeDistillation
from tests.toy import ToyConvNet, UserClassifier, random_loader

student = UserClassifier()
before = student.net.fc.weight.detach().clone()
trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[KnowledgeDistillation(ToyConvNet(), alpha=0.5)])
trainer.fit(student, random_loader(64, batch_size=8))
save({"kd_loss": float(trainer.callback_metrics["distill/kd_loss"]), "fc": student.net.fc.weight.detach(),
      "before": before}, trainer)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """Each rank runs its own teacher on its shard; nothing is synchronised beyond DDP's gradients.

    Two processes as the other DDP tests run them (``tests/ddp.py``): a ``ddp_spawn`` worker inside pytest
    once aborted at exit ("terminate called without an active exception") after a finished fit.
    """
    rank0, rank1 = run_two_ranks(tmp_path, DDP_BODY)
    assert rank0["kd_loss"] > 0 and rank1["kd_loss"] > 0
    assert torch.equal(rank0["fc"], rank1["fc"])  # DDP kept the students identical
    assert not torch.equal(rank0["fc"], rank0["before"])  # and they trained
