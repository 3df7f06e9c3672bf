"""Pruning patterns: parsed once from their spelling, equal to it, and refused with the same message."""

import pytest

from lightning_compress.pruning import NM, Channel, MagnitudePruning, Unstructured, parse_pattern

ALLOWED = r"pattern must be 'unstructured', 'channel' or 'N:M' with integers 0 < N < M \(e\.g\. '2:4'\), got "


@pytest.mark.parametrize(
    ("spelling", "typed"),
    [("unstructured", Unstructured()), ("channel", Channel()), ("2:4", NM(2, 4)), (" 1 : 8 ", NM(1, 8))],
)
def test_a_spelling_parses_to_its_type_and_equals_it(spelling, typed):
    parsed = parse_pattern(spelling)
    assert parsed == typed and type(parsed) is type(typed)
    assert parsed == spelling.replace(" ", "") and hash(parsed) == hash(str(typed))
    assert parse_pattern(typed) is typed


def test_patterns_differ_by_what_they_prune():
    assert NM(2, 4) != NM(4, 8) and NM(2, 4) != "4:8" and Unstructured() != Channel()
    assert NM(2, 4).sparsity == NM(4, 8).sparsity == 0.5
    assert str(NM(2, 4)) == "2:4" and repr(NM(2, 4)) == "NM(n=2, m=4)"


@pytest.mark.parametrize("bad", ["block", "4:2", "2.5:4", "0:4", "2:4:8", "", None, 24])
def test_a_bad_pattern_names_the_argument_and_the_allowed_values(bad):
    with pytest.raises(ValueError, match="^" + ALLOWED + repr(bad).replace("(", r"\(")):
        parse_pattern(bad)
    with pytest.raises(ValueError, match="^" + ALLOWED):
        MagnitudePruning(final_sparsity=0.5, pattern=bad)


@pytest.mark.parametrize(("n", "m"), [(4, 2), (0, 4), (2, 2), (True, 4), (2.0, 4)])
def test_an_invalid_nm_is_refused_on_construction(n, m):
    with pytest.raises(ValueError, match="^" + ALLOWED + r"NM\(n="):
        NM(n, m)
