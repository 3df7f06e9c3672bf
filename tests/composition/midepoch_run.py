"""Runs for the mid-epoch resume test: for each configuration, one uninterrupted fit, then the same fit
SIGKILLed at several steps and resumed each time with ``fit(ckpt_path=...)`` until it ends.

Usage: ``python midepoch_run.py OUT_DIR {ROOT | plain} CONFIG[=KILLS[+KILLS...]] ...``: the CIFAR tree at ROOT
through ``CIFARDataModule``, or ``plain``: a shuffling ``StatefulDataLoader`` over random images. ``KILLS`` is
a comma-separated list of steps (default ``3,9,15``); ``all=3,9,15+6`` runs two interrupted chains.

Every segment runs in a process forked from this one (which has imported everything and trained nothing), so
a kill costs no interpreter start-up; a killed segment leaves only its checkpoints. Per configuration it
writes ``OUT_DIR/CONFIG/full`` and one ``OUT_DIR/CONFIG/cut-K1-K2...`` per chain, each with ``final.pt`` (the
LightningModule's weights as they leave training) and ``batches.jsonl`` (a digest of every training batch as
the model received it, per step), and ``OUT_DIR/CONFIG/runs.json``: the exit code of the full run and, per
chain, each segment's kill step, resume step and exit code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchdata.stateful_dataloader import StatefulDataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lightning_compress import (
    ChannelPruning,
    CIFARDataModule,
    ImageClassifier,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.models.resnet import ResNet
from tests.forked import in_child, killed_chain
from tests.composition.modules import KillAt
from tests.toy import random_images

EPOCHS, BATCHES, BATCH_SIZE = 3, 6, 8  # epochs are steps 0-5, 6-11, 12-17
KILLS = (3, 9, 15)  # mid-epoch in each epoch: before, inside and after the compression windows


def _magnitude(start: int = 5, end: int = 11) -> pl.Callback:
    return MagnitudePruning(final_sparsity=0.5, start=f"{start}steps", end=f"{end}steps", update_every=2)


def _channel(start: int = 5, end: int = 11) -> pl.Callback:
    return ChannelPruning(channel_ratio=0.5, start=f"{start}steps", end=f"{end}steps", update_every=2, round_to=1)


def _lowrank(at: int = 9) -> pl.Callback:
    return LowRankFactorization(kept_macs_ratio=0.7, start=f"{at}steps")


def _qat(start: int = 7) -> pl.Callback:
    return QuantizationAwareTraining(start=f"{start}steps", freeze_observers="11steps", freeze_bn="13steps",
                                     convert_on_fit_end=False)


def _kd() -> pl.Callback:
    return KnowledgeDistillation(teacher="self", alpha=0.5, final_alpha=0.9, alpha_schedule="linear")


CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "none": list,
    "magnitude": lambda: [_magnitude()],
    "channel": lambda: [_channel()],
    "lowrank": lambda: [_lowrank()],
    "qat": lambda: [_qat()],
    "kd": lambda: [_kd()],
    # the architecture changes in disjoint windows (channels 1-4, factorized at 5) before masks (6-12) and QAT (9)
    "all": lambda: [_channel(1, 4), _lowrank(5), _magnitude(6, 12), _qat(9), _kd()],
}


class RecordBatches(pl.Callback):
    """Append ``{"step", "epoch", "digest"}`` of each training batch, as the model receives it, to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images, labels = batch[0], batch[1]
        digest = hashlib.sha1(images.detach().cpu().numpy().tobytes() + labels.cpu().numpy().tobytes()).hexdigest()
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, "digest": digest[:16]}))
            f.write("\n")


def fit(config: str, data: str, out: Path, kill_at: int | None, resume: bool) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = ImageClassifier(ResNet(stage_blocks=(1, 1), stage_widths=(8, 16), num_classes=10), num_classes=10,
                            lr=0.05)
    callbacks = [*CONFIGS[config](), RecordBatches(out / "batches.jsonl"),
                 ModelCheckpoint(dirpath=out, save_last=True, every_n_train_steps=1, save_top_k=0)]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    trainer = pl.Trainer(max_epochs=EPOCHS, limit_train_batches=BATCHES, accelerator="cpu", callbacks=callbacks,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         limit_val_batches=0 if data == "plain" else 1, num_sanity_val_steps=1)
    ckpt_path = str(out / "last.ckpt") if resume else None
    if data == "plain":
        loader = StatefulDataLoader(random_images(80, num_classes=10, size=16), batch_size=BATCH_SIZE, shuffle=True)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    else:
        datamodule = CIFARDataModule(data, download=False, batch_size=BATCH_SIZE, val_size=8,
                                     cache_dir=str(out.parent.parent / "cache"))
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "final.pt")


def main() -> None:
    out, data = Path(sys.argv[1]), sys.argv[2]
    for spec in sys.argv[3:]:
        config, _, chains = spec.partition("=")
        (out / config / "full").mkdir(parents=True)
        runs = {"full": in_child(fit, config, data, out / config / "full", None, False)}
        for kills in chains.split("+") if chains else [",".join(map(str, KILLS))]:
            folder = out / config / ("cut-" + kills.replace(",", "-"))
            folder.mkdir(parents=True)
            runs[folder.name] = killed_chain(functools.partial(fit, config, data, folder), folder,
                                             tuple(int(k) for k in kills.split(",")))
        (out / config / "runs.json").write_text(json.dumps(runs))


if __name__ == "__main__":
    main()
