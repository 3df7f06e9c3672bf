"""Run positions -> optimizer steps, pure and against a real Trainer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_compress.core.progress import StepBudget, check_ordered, step_budget, validate_position
from tests.toy import UserClassifier, random_loader


@pytest.mark.parametrize(
    ("position", "step"),
    [(0, 0), (0.0, 0), (1, 200), (0.25, 50), ("0ep", 0), ("1ep", 20), ("2.5ep", 50), ("7steps", 7), (".5ep", 10)],
)
def test_resolve(position, step):
    assert StepBudget(total_steps=200, steps_per_epoch=20).resolve(position, "start") == step


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "3", "3 epochs", "ep", "-1ep", None, [0.5]])
def test_invalid_positions_name_the_argument_and_forms(bad):
    with pytest.raises(ValueError, match=r"end must be a fraction in \[0, 1\].*'<n>ep'.*'<n>steps'"):
        validate_position(bad, "end")


def test_position_past_the_run_is_an_error():
    with pytest.raises(ValueError, match="start='30ep' resolves to optimizer step 600, after the end"):
        StepBudget(200, 20).resolve("30ep", "start")


def test_check_ordered_same_unit_only():
    check_ordered(0.1, 0.9, "start", "end")
    check_ordered("5ep", 0.1, "start", "end")  # different units: checked after resolving
    with pytest.raises(ValueError, match="start must come before end"):
        check_ordered("3ep", "3ep", "start", "end")


class RecordBudget(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.budget = step_budget(trainer)


@pytest.mark.parametrize(
    ("trainer_kwargs", "expected"),
    [
        ({"max_epochs": 3}, StepBudget(12, 4.0)),  # 64 samples / 16 per batch = 4 steps per epoch
        ({"max_epochs": 3, "accumulate_grad_batches": 2}, StepBudget(6, 2.0)),
        ({"max_epochs": 3, "limit_train_batches": 3}, StepBudget(9, 3.0)),
        ({"max_steps": 5, "max_epochs": -1}, StepBudget(5, 4.0)),
    ],
)
def test_step_budget_matches_what_the_trainer_will_do(trainer_kwargs, expected):
    record = RecordBudget()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record], **trainer_kwargs,
    )
    trainer.fit(UserClassifier(), random_loader(64, batch_size=16, size=8))
    assert record.budget == expected
    assert trainer.global_step == expected.total_steps
