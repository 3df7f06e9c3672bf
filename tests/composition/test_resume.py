"""Exact resume of the whole set of callbacks: killed with SIGKILL inside the compression windows, resumed with
``fit(ckpt_path=...)`` from the last step checkpoint, the run ends with weights bitwise equal to the uninterrupted run.

The run (``resume_run.py``) chains ChannelPruning (steps 0-6; or CompressToTarget, which plans at step 0, and may
factorize the planned layers at step 6), MagnitudePruning (2-8; 7-8 after a factorization), QAT (from 9, BN frozen
at 13) and KnowledgeDistillation on a user's dict-batch module, with a dataloader that resumes mid-epoch.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.composition.modules import same_entry

SCRIPT = Path(__file__).with_name("resume_run.py")


def run(out: Path, *args: str) -> int:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *args], check=False, capture_output=True, timeout=300,
                          cwd=out).returncode


@pytest.mark.slow
@pytest.mark.parametrize("variant", [(), ("--planned",), ("--factorized",), ("--engine", "xnnpack"),
                                     ("--planned", "--engine", "onnxruntime_7bit")],
                         ids=["channel_pruning", "compress_to_target", "compress_to_target_factorized", "pt2e_xnnpack",
                              "compress_to_target_7bit"])
def test_killed_twice_inside_the_windows_ends_bitwise_equal(variant, tmp_path):
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    full.mkdir(), interrupted.mkdir()
    assert run(full, *variant) == 0
    # killed while channels are being removed and masks grow (step 3), then while fake-quantized (step 11)
    assert run(interrupted, *variant, "--kill-at", "3") == -signal.SIGKILL
    assert run(interrupted, *variant, "--resume", "--kill-at", "11") == -signal.SIGKILL
    assert not (interrupted / "final.pt").exists()
    assert run(interrupted, *variant, "--resume") == 0
    expected, got = torch.load(full / "final.pt"), torch.load(interrupted / "final.pt")
    assert expected.keys() == got.keys()
    assert [key for key in expected if not same_entry(expected[key], got[key])] == []
    # the run really ended quantization-aware (FX: fake-quant modules; PT2E: its graph's observer modules)
    assert any("weight_fake_quant" in key or "activation_post_process" in key for key in got), list(got)[:8]
    if "--factorized" in variant:  # the layers were factorized (at step 6: after the first kill, before the second)
        assert any(key.startswith(("conv1.2.", "conv2.2.")) for key in got), list(got)[:8]  # a Tucker-2 block's last
