"""The images an export checks its artifacts on: a seeded sample in which every class keeps its share.

The first N images of a split stored class by class (an ImageFolder tree) are one class; a parity and an
accuracy measured on them describe that class only.

Example:
    >>> labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)  # sorted by class
    >>> sample = stratified_sample(labels, 4, seed=0)
    >>> sample.per_group
    {'0': 2, '1': 1, '2': 1}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CheckSample:
    """Which items of a population were drawn, and how.

    Attributes:
        indices: The drawn items, ascending.
        method: ``"stratified"`` (seeded, each group its share) or ``"all"``.
        seed: The seed of the draw (None for ``"all"``).
        population: How many items there were to draw from.
        per_group: Drawn items per group (class or folder), in group order.
        grouped_by: What the groups are, e.g. ``"label"`` or ``"folder"``.
    """

    indices: torch.Tensor
    method: str
    seed: int | None
    population: int
    per_group: dict[str, int] = field(default_factory=dict)
    grouped_by: str = "label"

    def to_dict(self) -> dict[str, Any]:
        """The description ``manifest.json`` records (the indices themselves are left out).

        Returns:
            ``{"method", "seed", "size", "population", "per_<group>"}``.
        """
        return {"method": self.method, "seed": self.seed, "size": len(self.indices), "population": self.population,
                f"per_{'class' if self.grouped_by == 'label' else self.grouped_by}": dict(self.per_group)}


def stratified_sample(groups: torch.Tensor | Sequence[int], count: int | None, seed: int = 0,
                      names: Sequence[str] | None = None, grouped_by: str = "label") -> CheckSample:
    """A seeded sample of ``count`` items in which each group keeps its share of the population.

    Each group gets ``count * size / population`` items, rounded by largest remainder (ties to the
    smaller group id), drawn uniformly within the group.

    Args:
        groups: The group (class) id of each item, integers >= 0.
        count: How many items to draw; None or at least the population: all of them.
        seed: Seed of the draw.
        names: Group names by id, for :attr:`CheckSample.per_group` (default: the ids).
        grouped_by: What the groups are, for the description.

    Returns:
        The sample.

    Raises:
        ValueError: If ``count < 1`` or ``groups`` is empty.
    """
    groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    if len(groups) == 0:
        raise ValueError("cannot sample check images from an empty split")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1 or None (all), got {count}")
    ids, sizes = torch.unique(groups, return_counts=True)
    population = len(groups)
    if count is None or count >= population:
        indices, method, seed, quotas = torch.arange(population), "all", None, sizes
    else:
        exact = sizes.double() * count / population
        quotas = exact.floor().long()
        remainder = count - int(quotas.sum())
        order = sorted(range(len(ids)), key=lambda i: (-(exact[i] - quotas[i]).item(), i))
        for i in order[:remainder]:
            quotas[i] += 1
        generator = torch.Generator().manual_seed(seed)
        drawn = []
        for group, quota in zip(ids.tolist(), quotas.tolist()):
            members = (groups == group).nonzero().flatten()
            drawn.append(members[torch.randperm(len(members), generator=generator)[:quota]])
        indices, method = torch.cat(drawn).sort().values, "stratified"
    per_group = {names[g] if names is not None and g < len(names) else str(g): int(q)
                 for g, q in zip(ids.tolist(), quotas.tolist())}
    return CheckSample(indices, method, seed, population, per_group, grouped_by)
