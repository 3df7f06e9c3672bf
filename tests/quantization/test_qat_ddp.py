"""QAT with magnitude pruning under DDP: two CPU processes (gloo) train in sync and end in int8."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    sys.path.insert(0, {root!r})
    from tests.toy import UserClassifier, random_loader
    from lightning_compress import MagnitudePruning, QuantizationAwareTraining

    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = UserClassifier()
    callbacks = [MagnitudePruning(final_sparsity=0.5, start=0.0, end=0.5, update_every=2),
                 QuantizationAwareTraining(start=0.25)]
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, random_loader(n=64, batch_size=8, shuffle=True))
    int8 = {{name: model.net.get_submodule(name).weight().int_repr() for name in ("conv1", "conv2")}}
    torch.save(int8, f"{out}/rank{{trainer.global_rank}}.pt")
    """
)


@pytest.mark.slow
def test_ddp_ranks_end_with_the_same_sparse_int8_weights(tmp_path):
    script = tmp_path / "ddp_qat.py"
    script.write_text(SCRIPT.format(root=str(Path(__file__).resolve().parents[2]), out=str(tmp_path)))
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=300)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, weights in rank0.items():
        assert torch.equal(weights, rank1[name]), name  # same fp32 weights and per-channel weight scales
    zeros = sum(int((weights == 0).sum()) for weights in rank0.values())
    assert zeros >= 0.5 * sum(weights.numel() for weights in rank0.values())  # global 50 % survives int8
