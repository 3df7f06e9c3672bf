"""A tiny CPU Trainer factory for the quantization tests."""

import lightning.pytorch as pl
import pytest


@pytest.fixture
def make_trainer(tmp_path):
    def make(callbacks, **kwargs):
        options = dict(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, max_epochs=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
        )
        options.update(kwargs)
        return pl.Trainer(callbacks=callbacks, **options)

    return make
