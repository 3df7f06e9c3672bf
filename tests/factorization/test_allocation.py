"""Rank choice: greedy error per MAC saved, slack spent back, energy per layer, unreachable targets."""

import pytest

from lightning_compress.factorization.allocation import (
    LayerOptions,
    Option,
    allocate_by_energy,
    allocate_by_macs,
    candidate_ranks,
)


def test_candidate_ranks_are_multiples_up_to_full_rank():
    assert candidate_ranks(64, 16) == [16, 32, 48, 64]
    assert candidate_ranks(20, 8) == [8, 16, 20]
    assert candidate_ranks(3, 1) == [1, 2, 3]


def test_cuts_where_error_per_mac_saved_is_lowest_and_meets_the_budget():
    # a: cutting saves 50 MACs for 0.05 error (0.001/MAC); b: saves 50 MACs for 0.5 (0.01/MAC)
    a = LayerOptions("a", 100, [Option(4, 50, 0.05), Option(2, 25, 0.3)])
    b = LayerOptions("b", 100, [Option(4, 50, 0.5)])
    assert allocate_by_macs([a, b], fixed_macs=10, budget_macs=160) == {"a": 4}
    ranks = allocate_by_macs([a, b], fixed_macs=10, budget_macs=110)
    assert ranks == {"a": 4, "b": 4}
    total = 10 + sum(o.macs for layer, r in ((a, ranks["a"]), (b, ranks["b"])) for o in layer.options if o.rank == r)
    assert total <= 110


def test_slack_left_by_a_coarse_step_is_spent_back():
    # the cheapest path jumps a to rank 1 (25 MACs); the budget allows rank 2 (50), which has less error
    a = LayerOptions("a", 100, [Option(1, 25, 0.2), Option(2, 50, 0.15), Option(3, 120, 0.0)])
    assert allocate_by_macs([a], fixed_macs=0, budget_macs=60) == {"a": 2}


def test_unreachable_budget_names_the_reachable_minimum():
    a = LayerOptions("a", 100, [Option(1, 40, 0.5)])
    with pytest.raises(ValueError, match="unreachable: 50 MACs wanted, but the smallest ranks still leave 60 "
                                         r"\(of which 20 in layers not factorized\)"):
        allocate_by_macs([a], fixed_macs=20, budget_macs=50)


def test_energy_takes_the_smallest_rank_that_keeps_it_and_only_if_cheaper():
    a = LayerOptions("a", 100, [Option(1, 20, 0.5), Option(2, 40, 0.05), Option(3, 120, 0.0)])
    b = LayerOptions("b", 10, [Option(1, 20, 0.0)])  # factorizing b never saves MACs
    assert allocate_by_energy([a, b], 0.9) == {"a": 2}
    assert allocate_by_energy([a, b], 0.4) == {"a": 1}
    assert allocate_by_energy([a, b], 1.0) == {}
