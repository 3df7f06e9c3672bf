"""When a compression step happens: positions in a run resolved to optimizer steps, once per fit.

A position is a fraction of the run in ``[0, 1]``, ``"<n>ep"`` (``n`` may be fractional) or
``"<n>steps"``. Callbacks act on ``trainer.global_step``, so schedules survive a resume.

Example:
    >>> budget = StepBudget(total_steps=1000, steps_per_epoch=100)
    >>> [budget.resolve(p, "start") for p in (0.25, "3ep", "40steps", 1.0)]
    [250, 300, 40, 1000]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

import lightning.pytorch as pl

Position = Union[float, int, str]
"""A point in a training run: fraction in [0, 1], ``"<n>ep"`` or ``"<n>steps"``."""

_POSITION_FORMS = "a fraction in [0, 1] (e.g. 0.5), '<n>ep' (e.g. '3ep') or '<n>steps' (e.g. '200steps')"
_STRING_POSITION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ep|steps)\s*$")


def validate_position(position: Position, name: str) -> Position:
    """Return ``position`` unchanged, or raise ``ValueError`` naming the argument ``name`` if malformed."""
    if isinstance(position, bool):
        raise ValueError(f"{name} must be {_POSITION_FORMS}, got {position!r}")
    if isinstance(position, (int, float)):
        if not 0.0 <= float(position) <= 1.0:
            raise ValueError(f"{name} must be {_POSITION_FORMS}, got {position!r}")
        return position
    if isinstance(position, str) and _STRING_POSITION.match(position):
        return position
    raise ValueError(f"{name} must be {_POSITION_FORMS}, got {position!r}")


def position_order_key(position: Position) -> tuple[int, float] | None:
    """``(kind, value)`` of a validated position; kind is 0 for fractions, 1 for epochs, 2 for steps."""
    if isinstance(position, (int, float)):
        return (0, float(position))
    match = _STRING_POSITION.match(position)
    assert match is not None, "validate_position must be called first"
    return (1 if match.group(2) == "ep" else 2, float(match.group(1)))


def check_ordered(earlier: Position, later: Position, earlier_name: str, later_name: str) -> None:
    """Raise ``ValueError`` if two positions in the same unit are not strictly increasing."""
    key_a, key_b = position_order_key(earlier), position_order_key(later)
    if key_a[0] == key_b[0] and key_a[1] >= key_b[1]:
        raise ValueError(f"{earlier_name} must come before {later_name}, got {earlier_name}={earlier!r}, "
                         f"{later_name}={later!r}")


@dataclass(frozen=True)
class StepBudget:
    """The optimizer steps of a whole run and per epoch (after gradient accumulation)."""

    total_steps: int
    steps_per_epoch: float

    def resolve(self, position: Position, name: str) -> int:
        """The optimizer step in ``[0, total_steps]`` at which ``position`` (argument ``name``) is reached."""
        validate_position(position, name)
        kind, value = position_order_key(position)
        if kind == 0:
            step = value * self.total_steps
        elif kind == 1:
            step = value * self.steps_per_epoch
        else:
            step = value
        step = int(round(step))
        if step > self.total_steps:
            raise ValueError(f"{name}={position!r} resolves to optimizer step {step}, after the end of the "
                             f"run ({self.total_steps} steps)")
        return step


def step_budget(trainer: pl.Trainer) -> StepBudget:
    """The :class:`StepBudget` of the run ``trainer`` is about to fit (from ``estimated_stepping_batches``).

    Call it from ``setup`` (stage ``"fit"``) or ``on_fit_start``; ``ValueError`` if the run has no end.
    """
    loader_was_built = getattr(trainer.fit_loop, "_combined_loader", None) is not None
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("compression schedules need a finite run: set Trainer(max_epochs=...) or max_steps")
    if not math.isfinite(trainer.num_training_batches):
        # With ``max_steps`` Lightning answers ``estimated_stepping_batches`` without loading the
        # train dataloader; epochs still need its length. ``setup_data`` is idempotent.
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if not loader_was_built and hasattr(trainer.fit_loop, "_combined_loader"):
        # Lightning hands a resumed run's dataloader state (mid-epoch position) to the loader it builds
        # after the checkpoint is restored; a loader built this early would never receive it. Measured,
        # let it be built again at the usual time.
        trainer.fit_loop._combined_loader = None
    if math.isfinite(batches) and batches > 0:
        per_epoch = max(1.0, math.ceil(batches / trainer.accumulate_grad_batches))
    else:  # iterable dataset without a length: fall back to the whole run being one epoch
        per_epoch = float(total)
    return StepBudget(total_steps=int(total), steps_per_epoch=float(per_epoch))


Interval = Union[int, float, str]
"""How often something happens: an ``int`` is optimizer steps (``100``); otherwise a position-like
length: a fraction of the run (``0.05``), ``"<n>ep"`` or ``"<n>steps"``."""

_INTERVAL_FORMS = ("an integer number of optimizer steps >= 1 (e.g. 100), a fraction of the run in (0, 1] "
                   "(e.g. 0.05), '<n>ep' (e.g. '1ep') or '<n>steps' (e.g. '50steps')")


def validate_interval(interval: Interval, name: str = "update_every") -> Interval:
    """Return ``interval`` unchanged, or raise ``ValueError`` naming the argument ``name`` if malformed."""
    if isinstance(interval, bool):
        raise ValueError(f"{name} must be {_INTERVAL_FORMS}, got {interval!r}")
    if isinstance(interval, int):
        if interval < 1:
            raise ValueError(f"{name} must be {_INTERVAL_FORMS}, got {interval!r}")
        return interval
    if isinstance(interval, float) and not 0.0 < interval <= 1.0:
        raise ValueError(f"{name} must be {_INTERVAL_FORMS}, got {interval!r}")
    if isinstance(interval, float) or (isinstance(interval, str) and _STRING_POSITION.match(interval)):
        return interval
    raise ValueError(f"{name} must be {_INTERVAL_FORMS}, got {interval!r}")


@dataclass(frozen=True)
class StepWindow:
    """Where a callback acts: steps ``start`` to ``end`` inclusive (``None``: fit end), every ``every``.

    Example:
        >>> window = StepWindow(10, 50, 20)
        >>> [s for s in range(60) if window.is_update_step(s)]
        [10, 30, 50]
    """

    start: int
    end: int | None = None
    every: int = 1

    def is_update_step(self, step: int) -> bool:
        """Whether ``step`` is one of the window's update steps (``start``, every ``every``, and ``end``)."""
        if step < self.start or (self.end is not None and step > self.end):
            return False
        return (step - self.start) % self.every == 0 or step == self.end

    def overlaps(self, other: StepWindow) -> bool:
        """Whether two windows share a step (an open ``end`` reaches the end of the run).

        Example:
            >>> StepWindow(0, 10).overlaps(StepWindow(10, None)), StepWindow(0, 9).overlaps(StepWindow(10, 20))
            (True, False)
        """
        self_end = self.end if self.end is not None else math.inf
        other_end = other.end if other.end is not None else math.inf
        return self.start <= other_end and other.start <= self_end


def resolve_window(budget: StepBudget, start: Position, end: Position | None = None,
                   every: Interval = 1, names: tuple[str, str, str] = ("start", "end", "update_every")
                   ) -> StepWindow:
    """Resolve a callback's ``start``/``end``/``update_every`` to a :class:`StepWindow` once.

    Args:
        budget: The run's step budget.
        start: Where the window opens (a position).
        end: Where it closes (a position), or ``None`` for "until fit ends".
        every: Interval between updates.
        names: The callback's argument names for ``start``, ``end`` and ``every``, for errors.

    Raises:
        ValueError: If ``end`` does not come after ``start`` or ``every`` resolves to 0 steps.

    Example:
        >>> resolve_window(StepBudget(1000, 100), 0.1, "5ep", "50steps")
        StepWindow(start=100, end=500, every=50)
    """
    start_step = budget.resolve(start, names[0])
    end_step = None if end is None else budget.resolve(end, names[1])
    if end_step is not None and start_step >= end_step:
        raise ValueError(f"{names[0]}={start!r} (step {start_step}) must come before {names[1]}={end!r} "
                         f"(step {end_step}) in this run of {budget.total_steps} optimizer steps")
    validate_interval(every, names[2])
    every_steps = every if isinstance(every, int) else budget.resolve(every, names[2])
    if every_steps < 1:
        raise ValueError(f"{names[2]}={every!r} resolves to 0 optimizer steps in this run; use at least 1 "
                         "(an int means optimizer steps)")
    return StepWindow(start_step, end_step, every_steps)
