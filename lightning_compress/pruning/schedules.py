"""How much to prune as training progresses: pure functions ``schedule(progress, initial, final)``.

Progress runs from 0 at the start of the pruning window to 1 at its end (clamped outside); the
amount goes from ``initial`` to ``final`` and may be a sparsity or a fraction of channels alike.
Any callable with that signature can replace the built-in ones (:func:`resolve_schedule`).

Example:
    >>> [round(cubic_sparsity(p, 0.0, 0.9), 4) for p in (0.0, 0.5, 1.0)]
    [0.0, 0.7875, 0.9]
"""

from __future__ import annotations

import math
from typing import Callable, Union

Schedule = Callable[[float, float, float], float]
"""``schedule(progress, initial, final) -> amount``."""

ScheduleLike = Union[str, Schedule]
"""A schedule name from :data:`SCHEDULES` or a :data:`Schedule` callable."""


def _clamp(progress: float) -> float:
    return min(1.0, max(0.0, float(progress)))


def cubic_sparsity(progress: float, initial: float, final: float) -> float:
    """Zhu & Gupta (2017): ``final + (initial - final) * (1 - p) ** 3``, fast early and slow at the end.

    Example:
        >>> round(cubic_sparsity(0.5, 0.0, 0.8), 6)
        0.7
    """
    return final + (initial - final) * (1.0 - _clamp(progress)) ** 3


def linear_sparsity(progress: float, initial: float, final: float) -> float:
    """Straight line from ``initial`` to ``final``.

    Example:
        >>> linear_sparsity(0.25, 0.0, 0.8)
        0.2
    """
    return initial + (final - initial) * _clamp(progress)


def exponential_sparsity(progress: float, initial: float, final: float) -> float:
    """The kept fraction decays geometrically: equal slices of progress prune equal fractions of what is left.

    Needs ``initial, final < 1``.

    Example:
        >>> round(exponential_sparsity(0.5, 0.0, 0.75), 6)
        0.5
    """
    p = _clamp(progress)
    return 1.0 - math.exp((1.0 - p) * math.log1p(-initial) + p * math.log1p(-final))


def constant_sparsity(progress: float, initial: float, final: float) -> float:
    """One-shot: ``final`` from the start of the window, whatever ``progress`` and ``initial``.

    Example:
        >>> constant_sparsity(0.0, 0.0, 0.9)
        0.9
    """
    return final


SCHEDULES: dict[str, Schedule] = {
    "cubic": cubic_sparsity,
    "linear": linear_sparsity,
    "exponential": exponential_sparsity,
    "constant": constant_sparsity,
}
"""Built-in schedules by name."""


def resolve_schedule(schedule: ScheduleLike, name: str = "schedule") -> Schedule:
    """Turn a name from :data:`SCHEDULES` or a callable into a schedule, checking it on the way.

    A callable is probed at progress 0, 0.5 and 1 and must return amounts in ``[0, 1]``; a curve of
    progress alone fits as ``lambda p, initial, final: my_curve(p)``. Raises ``ValueError`` (naming
    argument ``name``) for an unknown name or a callable that does not behave like a schedule.

    Example:
        >>> resolve_schedule("linear")(0.5, 0.0, 1.0)
        0.5
        >>> resolve_schedule(lambda p, initial, final: 0.5 * p)(1.0, 0.0, 0.9)
        0.5
    """
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"{name} must be one of {sorted(SCHEDULES)} or a callable "
                             f"(progress, initial, final) -> amount, got {schedule!r}")
        return SCHEDULES[schedule]
    if not callable(schedule):
        raise ValueError(f"{name} must be one of {sorted(SCHEDULES)} or a callable "
                         f"(progress, initial, final) -> amount, got {schedule!r}")
    for progress in (0.0, 0.5, 1.0):
        try:
            value = float(schedule(progress, 0.0, 0.5))
        except Exception as error:  # noqa: BLE001 -- any failure means the callable is not a schedule
            raise ValueError(f"{name} callable must accept (progress, initial, final); calling it with "
                             f"({progress}, 0.0, 0.5) raised {error!r}") from error
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} callable must return an amount in [0, 1], got {value} at "
                             f"progress {progress}")
    return schedule
