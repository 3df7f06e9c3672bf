"""QAT with magnitude pruning under DDP: two CPU processes (gloo) train in sync and end in int8."""

import pytest
import torch

from tests.ddp import run_two_ranks

BODY = """
from tests.toy import UserClassifier, random_loader
from lightning_compress import MagnitudePruning, QuantizationAwareTraining

model = UserClassifier()
callbacks = [MagnitudePruning(final_sparsity=0.5, start=0.0, end=0.5, update_every=2),
             QuantizationAwareTraining(start=0.25, engine="x86")]  # torch int8 weights compared
trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2, callbacks=callbacks,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
trainer.fit(model, random_loader(n=64, batch_size=8, shuffle=True))
save({name: model.net.get_submodule(name).weight().int_repr() for name in ("conv1", "conv2")}, trainer)
"""


@pytest.mark.slow
def test_ddp_ranks_end_with_the_same_sparse_int8_weights(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, BODY)
    for name, weights in rank0.items():
        assert torch.equal(weights, rank1[name]), name  # same fp32 weights and per-channel weight scales
    zeros = sum(int((weights == 0).sum()) for weights in rank0.values())
    assert zeros >= 0.5 * sum(weights.numel() for weights in rank0.values())  # global 50 % survives int8
