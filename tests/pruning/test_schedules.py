import math

import pytest

from lightning_compress.pruning import (
    SCHEDULES,
    constant_sparsity,
    cubic_sparsity,
    exponential_sparsity,
    linear_sparsity,
    resolve_schedule,
)


@pytest.mark.parametrize("name", ["cubic", "linear", "exponential"])
def test_schedules_go_from_initial_to_final_monotonically(name):
    schedule = SCHEDULES[name]
    values = [schedule(i / 20, 0.1, 0.9) for i in range(21)]
    assert values[0] == pytest.approx(0.1) and values[-1] == pytest.approx(0.9)
    assert all(a < b for a, b in zip(values, values[1:]))


def test_cubic_matches_zhu_gupta_formula():
    for p in (0.0, 0.3, 0.7, 1.0):
        assert cubic_sparsity(p, 0.2, 0.8) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - p) ** 3)
    # front-loaded: more than half of the final amount after a quarter of the window
    assert cubic_sparsity(0.25, 0.0, 0.9) > 0.5 * 0.9


def test_linear_and_exponential_values():
    assert linear_sparsity(0.5, 0.0, 0.6) == pytest.approx(0.3)
    # kept fraction decays geometrically: 1 -> 0.25 over the window, 0.5 half-way
    assert exponential_sparsity(0.5, 0.0, 0.75) == pytest.approx(0.5)
    assert exponential_sparsity(0.25, 0.0, 0.75) == pytest.approx(1 - 0.25 ** 0.25)


def test_progress_is_clamped_and_constant_is_one_shot():
    assert cubic_sparsity(-1.0, 0.1, 0.9) == pytest.approx(0.1)
    assert linear_sparsity(2.0, 0.1, 0.9) == pytest.approx(0.9)
    assert constant_sparsity(0.0, 0.0, 0.7) == 0.7 == constant_sparsity(1.0, 0.0, 0.7)


def test_resolve_schedule_accepts_names_and_callables():
    assert resolve_schedule("exponential") is exponential_sparsity
    custom = resolve_schedule(lambda p, initial, final: initial + (final - initial) * math.sqrt(p))
    assert custom(0.25, 0.0, 0.8) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [("quadratic", "schedule must be one of"), (3, "schedule must be one of"),
     (lambda p: p, "must accept"), (lambda p, i, f: 2.0, r"in \[0, 1\]")],
)
def test_resolve_schedule_rejects_bad_schedules(schedule, message):
    with pytest.raises(ValueError, match=message):
        resolve_schedule(schedule)
