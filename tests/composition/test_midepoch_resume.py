"""Exact mid-epoch resume: each callback alone and the whole set, SIGKILLed mid-epoch before, inside and after
its compression window and resumed with ``fit(ckpt_path=...)``, end with weights bitwise equal to the
uninterrupted run, having trained on the same batches.

Two data paths: ``CIFARDataModule`` on a fake CIFAR tree (shuffle and augmentation on), and a shuffling torchdata
``StatefulDataLoader`` over random images. Runs: 3 epochs of 6 steps (``limit_train_batches``, 10 batches per
epoch), killed at steps 3, 9 and 15 (see ``midepoch_run.py`` for the windows).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.data.cifar_fakes import write_cifar_pickles

SCRIPT = Path(__file__).with_name("midepoch_run.py")
CONFIGS = ["none", "magnitude", "channel", "lowrank", "qat", "kd", "all"]


def _run(out: Path, data: str, *specs: str) -> Path:
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), data, *specs], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cifar_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("midepoch_cifar")
    write_cifar_pickles(root / "data", per_batch=16, n_test=4)  # 80 training images: 10 batches of 8
    specs = [*CONFIGS[:-1], "all=3,9,15+6+6,9"]
    return _run(root / "out", str(root / "data"), *specs)


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("midepoch_plain")
    return _run(root / "out", "plain", *CONFIGS[:-1], "all=3,9,15+6,9")


def _batches(run: Path) -> dict[int, str]:
    """Digest of the batch each step trained on (a resumed segment's record replaces the killed one's)."""
    return {r["step"]: r["digest"] for r in map(json.loads, (run / "batches.jsonl").read_text().splitlines())}


def assert_resumed_exactly(runs: Path, config: str, kills: tuple[int, ...] = (3, 9, 15)) -> dict:
    folder = runs / config
    name = "cut-" + "-".join(map(str, kills))
    record = json.loads((folder / "runs.json").read_text())
    assert record["full"] == 0
    # killed at each step (by then the checkpoint of that step is on disk), resumed there, then ran to the end
    assert record[name] == [
        {"kill_at": kill, "resumed_at": resumed, "exit": -signal.SIGKILL}
        for kill, resumed in zip(kills, (None, *kills))
    ] + [{"kill_at": None, "resumed_at": kills[-1], "exit": 0}]
    full, cut = _batches(folder / "full"), _batches(folder / name)
    assert sorted(full) == list(range(18)) and len(set(full.values())) == 18
    assert [step for step in full if cut.get(step) != full[step]] == []  # same batches, same augmentation
    expected = torch.load(folder / "full" / "final.pt", weights_only=True)
    got = torch.load(folder / name / "final.pt", weights_only=True)
    assert expected.keys() == got.keys()
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []
    return got


def assert_compressed(runs: Path, config: str, weights: dict) -> None:
    """The callbacks really acted by the end of the run."""
    dense = torch.load(runs / "none" / "full" / "final.pt", weights_only=True)
    convs = [w for w in weights.values() if w.dim() == 4]
    sparsity = sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    assert (sparsity > 0.4) == (config in ("magnitude", "all"))

    def size(state: dict) -> int:
        return sum(w.numel() for w in state.values() if w.dim() >= 2)

    assert (size(weights) < size(dense)) == (config in ("channel", "lowrank", "all"))
    assert any("weight_fake_quant" in key for key in weights) == (config in ("qat", "all"))
    callbacks = torch.load(runs / config / "full" / "last.ckpt", weights_only=True)["callbacks"]
    assert any("self_teacher" in state for state in callbacks.values()) == (config in ("kd", "all"))


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_cifar_datamodule_resumes_mid_epoch_exactly(cifar_runs, config):
    weights = assert_resumed_exactly(cifar_runs, config)
    assert_compressed(cifar_runs, config, weights)
    # what carried the position: the sampler's epoch and offset in the loader state, the augmentation counter
    checkpoint = torch.load(cifar_runs / config / "cut-3-9-15" / "last.ckpt", weights_only=True)
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["_sampler_iter_state"]["sampler_state"] == {"epoch": 2, "yielded": 6 * 8}
    assert checkpoint["CIFARDataModule"] == {"augmented": {"epoch": 2, "batches": 6}}


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_stateful_dataloader_resumes_mid_epoch_exactly(plain_runs, config):
    weights = assert_resumed_exactly(plain_runs, config)
    assert_compressed(plain_runs, config, weights)


@pytest.mark.slow
def test_cifar_datamodule_resumes_from_the_last_batch_of_an_epoch(cifar_runs):
    """The checkpoint of step 6 is taken at epoch 0's last batch: epoch 1 starts afresh, in its own order."""
    assert_resumed_exactly(cifar_runs, "all", kills=(6,))


@pytest.mark.slow
def test_cifar_datamodule_resumed_after_an_epoch_boundary_resume(cifar_runs):
    """Lightning 2.6 alone counts the epoch after a last-batch checkpoint as resumed mid-way
    (core/epoch_restart.py): a second resume later in it would restart from the wrong batch."""
    assert_resumed_exactly(cifar_runs, "all", kills=(6, 9))


@pytest.mark.slow
def test_stateful_dataloader_resumed_from_the_last_batch_of_an_epoch(plain_runs):
    """Lightning 2.6 alone would replay the finished epoch's tail from the restored loader position."""
    assert_resumed_exactly(plain_runs, "all", kills=(6, 9))
