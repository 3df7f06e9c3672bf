"""Pruning patterns: which weights a mask removes together, parsed once from their string spelling.

A pattern is a small immutable value whose ``str`` is the spelling the API and YAML recipes accept,
and which equals that spelling.

Example:
    >>> parse_pattern("2:4")
    NM(n=2, m=4)
    >>> print(NM(2, 4))
    2:4
    >>> NM(2, 4).sparsity, parse_pattern("channel") == "channel"
    (0.5, True)
    >>> parse_pattern("4:2")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: pattern must be 'unstructured', 'channel' or 'N:M' with integers 0 < N < M ..., got '4:2'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

_NM_SPELLING = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
ALLOWED = "'unstructured', 'channel' or 'N:M' with integers 0 < N < M (e.g. '2:4')"
"""The accepted spellings, for error messages."""


class PruningPattern:
    """Base of the pattern types: a pattern equals (and hashes as) its string spelling."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, PruningPattern)):
            return str(self) == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))


@dataclass(frozen=True, eq=False)
class Unstructured(PruningPattern):
    """Any weight may be pruned on its own (ranked by magnitude)."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True, eq=False)
class Channel(PruningPattern):
    """Whole output filters (dim 0) are pruned, ranked by a filter norm."""

    def __str__(self) -> str:
        return "channel"


@dataclass(frozen=True, eq=False)
class NM(PruningPattern):
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension (``0 < n < m``, e.g. 2:4)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m))
        if not integers or not 0 < self.n < self.m:
            raise ValueError(f"pattern must be {ALLOWED}, got NM(n={self.n!r}, m={self.m!r})")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """The fraction of weights the pattern prunes, ``1 - n/m``."""
        return 1.0 - self.n / self.m


PatternLike = Union[str, PruningPattern]
"""A pattern or its spelling: ``"unstructured"``, ``"channel"`` or ``"N:M"``."""


def parse_pattern(pattern: PatternLike) -> PruningPattern:
    """The pattern ``"unstructured"``, ``"channel"`` or ``"N:M"`` names; a pattern is returned as it is.

    Raises ``ValueError`` naming ``pattern`` and the allowed spellings for anything else.
    """
    if isinstance(pattern, PruningPattern):
        return pattern
    if pattern == "unstructured":
        return Unstructured()
    if pattern == "channel":
        return Channel()
    match = _NM_SPELLING.match(pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"pattern must be {ALLOWED}, got {pattern!r}")
    return NM(int(match.group(1)), int(match.group(2)))
