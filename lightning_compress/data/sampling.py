"""Training order and augmentation randomness that a checkpoint taken mid-epoch can resume exactly.

Every random draw is a function of ``(seed, epoch, position)``; nothing depends on the global RNG, which a
resumed process does not have back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from typing_extensions import override

_SHUFFLE_STREAM, _AUGMENTATION_STREAM = 1, 2


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream ``keys`` of ``seed``: distinct keys give independent streams.

    Example:
        >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
        True
    """
    state = np.random.SeedSequence(seed, spawn_key=keys).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ResumableShuffle(DistributedSampler):
    """``DistributedSampler``'s shuffle (by ``seed`` and epoch, this rank's share) that resumes mid-epoch.

    ``state_dict`` (epoch, indices handed out) travels in torchdata's ``StatefulDataLoader`` state, which
    Lightning checkpoints. The restored position applies only if the epoch still matches when the first index
    is drawn: Lightning restores a checkpoint taken at an epoch's last batch into the next epoch (its
    ``set_epoch`` comes after the restore), which must start afresh. Being a ``DistributedSampler``, it is
    kept by Lightning under DDP instead of replaced.

    Args:
        dataset: What is sampled (only its length is used).
        seed: Shuffle seed; the order of epoch ``e`` is a permutation drawn with ``seed + e``.
        num_replicas: Number of ranks; each gets ``ceil(len(dataset) / num_replicas)`` indices.
        rank: This rank.

    Example:
        >>> sampler = ResumableShuffle(range(6), seed=0)
        >>> order = iter(sampler)
        >>> first, state = [next(order), next(order)], sampler.state_dict()
        >>> resumed = ResumableShuffle(range(6), seed=0)
        >>> resumed.load_state_dict(state)
        >>> first + list(resumed) == list(ResumableShuffle(range(6), seed=0)), state
        (True, {'epoch': 0, 'yielded': 2})
    """

    def __init__(self, dataset: Sized, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self._position = {"epoch": 0, "yielded": 0}
        self._restored: dict[str, int] | None = None
        self._epoch_was_set = False

    @override
    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch_was_set = True

    @override
    def __iter__(self) -> Iterator[int]:
        # A generator: nothing is decided until the first index is asked for, after Lightning's set_epoch.
        start = 0
        if self._restored is not None and self._restored["epoch"] == self.epoch:
            start = self._restored["yielded"]
        self._restored = None
        indices = list(super().__iter__())
        self._position = {"epoch": self.epoch, "yielded": start}
        for index in indices[start:]:
            self._position["yielded"] += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "yielded": n}``: the epoch being iterated and how many indices it has handed out."""
        return dict(self._restored if self._restored is not None else self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch at the saved position (unless ``set_epoch`` moves on first)."""
        if not isinstance(state, dict) or not {"epoch", "yielded"} <= state.keys():
            raise ValueError(f"ResumableShuffle state must have 'epoch' and 'yielded', got {state!r}")
        self._restored = {"epoch": int(state["epoch"]), "yielded": int(state["yielded"])}
        if not self._epoch_was_set:
            self.epoch = self._restored["epoch"]


def shuffle_seed(seed: int) -> int:
    """The seed of the training order for a datamodule ``seed`` (a stream apart from the validation split)."""
    return derive_seed(seed, _SHUFFLE_STREAM)


def augmentation_generator(seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """The CPU generator that draws the augmentation of one training batch (independent of every other).

    Example:
        >>> a, b = augmentation_generator(0, 0, 1, 5), augmentation_generator(0, 0, 1, 5)
        >>> torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
        True
    """
    return torch.Generator().manual_seed(derive_seed(seed, _AUGMENTATION_STREAM, rank, epoch, batch))
