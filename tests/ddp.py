"""Run a training script as two CPU DDP processes (gloo) and read back what each rank saved."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

_PREAMBLE = """
import sys
sys.path.insert(0, {root!r})
import lightning.pytorch as pl
import torch
torch.set_num_threads(1)
pl.seed_everything(0)
"""

_EPILOGUE = """
# both ranks saved: leave without running C++ static destructors, where gloo's threads now and then
# abort the process ("terminate called without an active exception") after everything was done
if torch.distributed.is_initialized():
    torch.distributed.barrier()
import os
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def run_two_ranks(tmp_path: Path, body: str) -> tuple[Any, Any]:
    """Run ``body`` under ``python`` (it launches ``Trainer(strategy="ddp", devices=2)`` itself).

    ``body`` must end by calling ``save(obj, trainer)``, which writes ``obj`` for the current rank.

    Returns:
        What rank 0 and rank 1 saved.
    """
    script = tmp_path / "two_ranks.py"
    save = f"def save(obj, trainer):\n    torch.save(obj, f'{tmp_path}/rank{{trainer.global_rank}}.pt')\n"
    script.write_text(_PREAMBLE.format(root=str(ROOT)) + save + textwrap.dedent(body) + _EPILOGUE)
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=300)
    return tuple(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))


def run_two_ranks_launched_externally(tmp_path: Path, body: str) -> tuple[Any, Any]:
    """As :func:`run_two_ranks`, but the two processes are started here, as ``torchrun`` or a cluster would
    (``LOCAL_RANK`` set): Lightning launches nothing, and neither rank kills the other when one fails.

    Returns:
        What rank 0 and rank 1 saved.
    """
    import os
    import socket

    script = tmp_path / "each_rank.py"
    save = f"def save(obj, trainer):\n    torch.save(obj, f'{tmp_path}/rank{{trainer.global_rank}}.pt')\n"
    script.write_text(_PREAMBLE.format(root=str(ROOT)) + save + textwrap.dedent(body) + _EPILOGUE)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    ranks = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                              env={**env, "LOCAL_RANK": str(rank), "RANK": str(rank)}) for rank in (0, 1)]
    try:
        codes = [rank.wait(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert codes == [0, 0], codes
    return tuple(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
