"""Teacher logits cached by sample index, for ``KnowledgeDistillation(cache_logits=True)``.

Training batches carry each sample's index as their last element (:class:`IndexedDataset`), which
:func:`split_indices` removes before the module's ``training_step`` sees the batch.

Example:
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(IndexedDataset(TensorDataset(torch.zeros(4, 2), torch.zeros(4))), batch_size=2)
    >>> (x, y), indices = split_indices(next(iter(loader)))
    >>> indices
    tensor([0, 1])
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that ``(x, y)`` becomes ``(x, y, index)`` and ``x``, ``(x, index)``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.arange(3)))[2][2]
        2
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        sample = self.dataset[index]
        if isinstance(sample, (tuple, list)):
            return (*sample, index)
        return (sample, index)


def split_indices(batch: Any) -> tuple[Any, torch.Tensor]:
    """Split the sample indices off the end of a batch: ``(the rest, or its only element; indices)``.

    Raises ``ValueError`` unless the last element is a vector of distinct integers (labels almost always
    repeat within a batch; indices never do).

    Example:
        >>> split_indices((torch.zeros(2, 3), torch.tensor([4, 7])))[1]
        tensor([4, 7])
    """
    last = batch[-1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
    if not (isinstance(last, torch.Tensor) and not last.is_floating_point() and last.ndim == 1
            and last.unique().numel() == last.numel()):
        raise ValueError(
            "cache_logits=True needs training batches whose last element is the sample indices (distinct "
            "integers); wrap the training dataset in lightning_compress.distillation.IndexedDataset(dataset) or "
            "use CIFARDataModule(with_indices=True, augment=False)"
        )
    rest = batch[:-1]
    return (rest[0] if len(rest) == 1 else type(batch)(rest)), last


class TeacherLogitCache:
    """Teacher logits stored by sample index, grown on demand, on the device of the logits.

    Example:
        >>> cache = TeacherLogitCache()
        >>> cache.lookup(torch.tensor([0, 1])) is None
        True
        >>> cache.store(torch.tensor([0, 1]), torch.eye(2))
        >>> cache.lookup(torch.tensor([1]))
        tensor([[0., 1.]])
    """

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.filled is None else int(self.filled.sum())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The cached logits of every index, or ``None`` if any of them is missing."""
        if self.filled is None or int(indices.max()) >= len(self.filled):
            return None
        indices = indices.to(self.filled.device)
        if not bool(self.filled[indices].all()):
            return None
        return self.logits[indices]

    def store(self, indices: torch.Tensor, logits: torch.Tensor) -> None:
        """Remember ``logits[i]`` as the teacher's output for sample ``indices[i]``."""
        needed = int(indices.max()) + 1
        if self.logits is None or needed > len(self.filled):
            size = max(needed, 2 * (0 if self.filled is None else len(self.filled)))
            grown = logits.new_zeros((size, *logits.shape[1:]))
            filled = torch.zeros(size, dtype=torch.bool, device=logits.device)
            if self.logits is not None:
                grown[: len(self.logits)] = self.logits
                filled[: len(self.filled)] = self.filled
            self.logits, self.filled = grown, filled
        indices = indices.to(self.logits.device)
        self.logits[indices] = logits.detach()
        self.filled[indices] = True
