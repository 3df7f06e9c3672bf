"""Runs of the whole set of callbacks on the dict-batch module, for the resume test (a subprocess).

Usage: ``python resume_run.py OUT_DIR [--kills STEP,STEP] [--planned | --factorized] [--engine NAME]``;
``--planned`` puts ``CompressToTarget(macs_ratio=0.5)`` in ChannelPruning's place, ``--factorized`` the same with
``factorize=True`` (its plan made to factorize: every channel cut priced dear; the layers are factorized at its end,
step 6, so MagnitudePruning masks from step 7), ``--engine`` trains QAT with that engine (default: the callback's,
``onnxruntime``). It runs the fit uninterrupted into ``OUT_DIR/full``, then into ``OUT_DIR/cut`` killed with SIGKILL
when each step of ``--kills`` starts (after ``ModelCheckpoint`` saved the previous one) and resumed each time from
``OUT_DIR/cut/last.ckpt`` (``fit(ckpt_path=...)``) until it ends; every segment in a process forked from this one
(:mod:`tests.forked`). Each run saves the network's weights as they leave training (before the fit-end
int8 conversion) to ``final.pt`` in its folder; ``OUT_DIR/runs.json`` holds the full run's exit code and what each
segment of the cut one did.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lightning_compress import (
    ChannelPruning,
    CompressToTarget,
    KnowledgeDistillation,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from tests.forked import in_child, killed_chain
from tests.composition.modules import DictBatchModule, KillAt, dict_loader
from tests.toy import ToyConvNet, channels_dear

STEPS = 16


class SaveTrained(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        state = pl_module.backbone.state_dict()  # a PT2E graph keeps its mode flags as extra state (a dict)
        torch.save({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}, self.path)


def fit(out: Path, planned: bool, factorized: bool, engine: dict, kill_at: int | None, resume: bool) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    teacher = ToyConvNet(num_classes=4)
    callbacks = [
        # the trained state is compared; converting it at fit end (seconds to a minute per run for PT2E engines)
        # has its own tests
        QuantizationAwareTraining(start="9steps", freeze_bn="13steps", convert_on_fit_end=False, **engine),
        KnowledgeDistillation(teacher, alpha=0.5),
        MagnitudePruning(final_sparsity=0.6, start="7steps" if factorized else "2steps", end="8steps", update_every=2),
        CompressToTarget(macs_ratio=0.5, start=0.0, end="6steps", update_every=2, round_to=2, factorize=factorized)
        if planned else ChannelPruning(channel_ratio=0.5, start=0.0, end="6steps", update_every=2),
        ModelCheckpoint(dirpath=out, save_last=True, every_n_train_steps=1, save_top_k=0),
        SaveTrained(out / "final.pt"),
    ]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(DictBatchModule(), dict_loader(n=80, batch_size=16),
                ckpt_path=str(out / "last.ckpt") if resume else None)


def main() -> None:
    out = Path(sys.argv[1])
    kills = tuple(int(k) for k in sys.argv[sys.argv.index("--kills") + 1].split(",")) if "--kills" in sys.argv else ()
    factorized = "--factorized" in sys.argv
    planned = factorized or "--planned" in sys.argv
    engine = {"engine": sys.argv[sys.argv.index("--engine") + 1]} if "--engine" in sys.argv else {}
    if factorized:
        from lightning_compress.planning import target

        target.width_sensitivity = channels_dear
    (out / "full").mkdir(parents=True)
    (out / "cut").mkdir()
    runs = {"full": in_child(fit, out / "full", planned, factorized, engine, None, False),
            "cut": killed_chain(functools.partial(fit, out / "cut", planned, factorized, engine), out / "cut", kills)}
    (out / "runs.json").write_text(json.dumps(runs))


if __name__ == "__main__":
    main()
