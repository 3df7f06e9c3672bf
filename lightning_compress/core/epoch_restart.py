"""A fit resumed from a checkpoint taken at an epoch's last training batch starts the next epoch cleanly.

Lightning 2.6 treats that next epoch as resumed mid-way: it hands the finished epoch's loader position
to the new epoch (a ``StatefulDataLoader`` replays the old epoch's tail) and neither counts the epoch
as started nor calls ``on_train_epoch_start``, so every later checkpoint carries a wrong position.
Compression callbacks call :func:`restart_finished_epoch` at ``on_train_start``, when the loaders are
built and not yet iterated.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.loops.fit_loop import RestartStage
from torchdata.stateful_dataloader import StatefulDataLoader


def restart_finished_epoch(trainer: pl.Trainer) -> None:
    """If the fit resumed at the end of an epoch, start the next one as an uninterrupted run would (idempotent).

    Args:
        trainer: The trainer at ``on_train_start``.
    """
    fit_loop, epoch_loop = trainer.fit_loop, trainer.fit_loop.epoch_loop
    if not (fit_loop.restarted_mid_epoch and epoch_loop.restarted_on_train_batch_end
            and epoch_loop.batch_progress.is_last_batch):
        return
    fit_loop._restart_stage = RestartStage.NONE  # the new epoch is counted and its hooks run
    for loader in fit_loop._combined_loader.flattened:
        if isinstance(loader, StatefulDataLoader):
            loader.load_state_dict({})  # forget the finished epoch's position
            _set_sampler_epoch(loader, fit_loop.epoch_progress.current.processed)  # workers draw at iter()
    iter(fit_loop._data_fetcher)
