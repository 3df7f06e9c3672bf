"""Exact resume of the whole set of callbacks: killed with SIGKILL inside the compression windows, resumed with
``fit(ckpt_path=...)`` from the last step checkpoint, the run ends with weights bitwise equal to the uninterrupted run.

The run (``resume_run.py``) chains ChannelPruning (steps 0-6; or CompressToTarget, which plans at step 0, and may
factorize the planned layers at step 6), MagnitudePruning (2-8; 7-8 after a factorization), QAT (from 9, BN frozen
at 13) and KnowledgeDistillation on a user's dict-batch module, with a dataloader that resumes mid-epoch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.composition.modules import same_entry

SCRIPT = Path(__file__).with_name("resume_run.py")


def run(out: Path, *args: str) -> dict:
    """``resume_run.py`` into ``out``: the exit code of its full run and what each segment of its cut run did."""
    completed = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], check=False, capture_output=True,
                               text=True, timeout=300, cwd=out.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((out / "runs.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("variant", [(), ("--planned",), ("--factorized",), ("--engine", "xnnpack"),
                                     ("--planned", "--engine", "onnxruntime_7bit")],
                         ids=["channel_pruning", "compress_to_target", "compress_to_target_factorized", "pt2e_xnnpack",
                              "compress_to_target_7bit"])
def test_killed_twice_inside_the_windows_ends_bitwise_equal(variant, tmp_path):
    # killed while channels are being removed and masks grow (step 3), then while fake-quantized (step 11)
    runs = run(tmp_path / "runs", *variant, "--kills", "3,11")
    assert runs == {"full": 0, "cut": [{"kill_at": 3, "resumed_at": None, "exit": -signal.SIGKILL},
                                       {"kill_at": 11, "resumed_at": 3, "exit": -signal.SIGKILL},
                                       {"kill_at": None, "resumed_at": 11, "exit": 0}]}
    full, interrupted = tmp_path / "runs" / "full", tmp_path / "runs" / "cut"
    expected, got = torch.load(full / "final.pt"), torch.load(interrupted / "final.pt")
    assert expected.keys() == got.keys()
    assert [key for key in expected if not same_entry(expected[key], got[key])] == []
    # the run really ended quantization-aware (FX: fake-quant modules; PT2E: its graph's observer modules)
    assert any("weight_fake_quant" in key or "activation_post_process" in key for key in got), list(got)[:8]
    if "--factorized" in variant:  # the layers were factorized (at step 6: after the first kill, before the second)
        assert any(key.startswith(("conv1.2.", "conv2.2.")) for key in got), list(got)[:8]  # a Tucker-2 block's last
