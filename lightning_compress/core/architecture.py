"""What shape the network has: replayable records of structural changes, and the one replay.

Callbacks that change a network's structure -- channel slimming, QAT preparation, low-rank
factorization -- append an :class:`ArchitectureRecord` to the LightningModule when they act. The
records travel in every checkpoint under ``checkpoint["compression_architecture"]``, and
:func:`restore_architecture` replays them onto a freshly built module *before* its weights load,
so a compressed checkpoint loads wherever a dense one would:

* ``ImageClassifier.load_from_checkpoint`` and ``Trainer.fit/validate/test/predict(ckpt_path=...)``
  with or without the callbacks (the module's ``on_load_checkpoint`` replays them);
* a user's own LightningModule: inherit :class:`RestoresArchitecture` (one line), or call
  :func:`restore_architecture` from ``on_load_checkpoint``; while a compression callback is in the
  Trainer it installs the same call for the duration of the fit
  (:class:`~lightning_compress.core.callback.CompressionCallback`);
* the ``report``/``export``/``predict``/``sensitivity`` commands and distillation teachers, which
  rebuild a bare network with :func:`replay_records`.

Each technique registers how to replay its own kind with :func:`register_replay`; core knows no
technique, and no technique knows another. Records carry a ``version``; a replay function refuses
versions it does not know, so an old library never misreads a newer checkpoint.

Example:
    >>> import torch
    >>> from torch import nn
    >>> @register_replay("doctest_widen", version=1)
    ... def _widen(network, payload):
    ...     return nn.Linear(2, payload["width"])
    >>> holder = nn.Module(); holder.net = nn.Linear(2, 3)
    >>> record = ArchitectureRecord("doctest_widen", "net", {"width": 5})
    >>> checkpoint = {ARCHITECTURE_KEY: [record.to_dict()]}
    >>> restore_architecture(holder, checkpoint)
    >>> holder.net.out_features, [r.kind for r in applied_records(holder)]
    (5, ['doctest_widen'])
    >>> restore_architecture(holder, checkpoint)  # idempotent: already applied
    >>> len(applied_records(holder))
    1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

ARCHITECTURE_KEY = "compression_architecture"
"""Top-level checkpoint key holding the list of :class:`ArchitectureRecord` dictionaries."""

_APPLIED = "_compression_architecture"

ReplayFunction = Callable[[nn.Module, Mapping[str, Any]], nn.Module]
"""``(network, payload) -> network``: rebuild one structural change on a network (returns the new
network object, or the same one changed in place). Weights are meaningless until a state dict loads."""

_REPLAYS: dict[str, tuple[int, ReplayFunction]] = {}


@dataclass(frozen=True)
class ArchitectureRecord:
    """One structural change of a network, enough to rebuild it on a fresh copy.

    Args:
        kind: Which replay function rebuilds it (see :func:`register_replay`).
        network: Attribute of the LightningModule holding the network it changed.
        payload: JSON-like description the replay function reads.
        version: Format version of ``payload`` for this ``kind``.
    """

    kind: str
    network: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The record as checkpoints store it.

        Returns:
            A plain dictionary.
        """
        return {"kind": self.kind, "network": self.network, "payload": dict(self.payload), "version": self.version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchitectureRecord:
        """Read a record back from a checkpoint.

        Args:
            data: What :meth:`to_dict` wrote.

        Returns:
            The record.

        Raises:
            ValueError: If ``data`` is not a record.
        """
        if not isinstance(data, Mapping) or not {"kind", "network", "payload", "version"} <= set(data):
            raise ValueError(f"not an architecture record (expected kind/network/payload/version): {data!r}")
        return cls(data["kind"], data["network"], dict(data["payload"]), int(data["version"]))


def register_replay(kind: str, version: int = 1) -> Callable[[ReplayFunction], ReplayFunction]:
    """Register the function that replays records of ``kind`` (a decorator).

    Args:
        kind: The record kind, unique across techniques.
        version: The newest payload version the function reads.

    Returns:
        The decorator, which returns the function unchanged.
    """

    def decorator(function: ReplayFunction) -> ReplayFunction:
        _REPLAYS[kind] = (version, function)
        return function

    return decorator


def _replay_function(record: ArchitectureRecord) -> ReplayFunction:
    # importing any lightning_compress module first runs the package's __init__, which imports every
    # technique: their replays are registered before any record can be read
    if record.kind not in _REPLAYS:
        raise ValueError(f"the checkpoint's architecture record {record.kind!r} has no replay; known kinds: "
                         f"{sorted(_REPLAYS)} (a newer lightning-compress, or a custom technique not imported)")
    version, function = _REPLAYS[record.kind]
    if record.version > version:
        raise ValueError(f"architecture record {record.kind!r} has version {record.version}, this "
                         f"lightning-compress reads up to {version}: upgrade lightning-compress")
    return function


def applied_records(module: nn.Module) -> list[ArchitectureRecord]:
    """The structural changes applied to ``module``'s networks so far, in order.

    Args:
        module: The LightningModule (or any holder of networks).

    Returns:
        A copy of the list.
    """
    return list(module.__dict__.get(_APPLIED, []))


def append_record(module: nn.Module, record: ArchitectureRecord) -> None:
    """Note that ``record``'s change was just applied to ``module`` (callbacks call this when they act).

    Args:
        module: The LightningModule whose network changed.
        record: The change.
    """
    module.__dict__[_APPLIED] = applied_records(module) + [record]


def checkpoint_records(checkpoint: Mapping[str, Any]) -> list[ArchitectureRecord]:
    """The records a checkpoint carries (none for a dense checkpoint).

    Args:
        checkpoint: A loaded checkpoint dictionary.

    Returns:
        The records, in the order they were applied.
    """
    return [ArchitectureRecord.from_dict(data) for data in checkpoint.get(ARCHITECTURE_KEY) or []]


def write_records(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Store ``module``'s applied records in ``checkpoint`` (every compression callback does, idempotently).

    Args:
        module: The LightningModule being saved.
        checkpoint: The checkpoint dictionary being written.
    """
    records = applied_records(module)
    if records:
        checkpoint[ARCHITECTURE_KEY] = [record.to_dict() for record in records]


def replay_records(module: nn.Module, records: list[ArchitectureRecord]) -> None:
    """Apply ``records`` to ``module``'s networks, in order, and note them as applied.

    Args:
        module: The holder of the networks (a LightningModule, or an ``nn.Module`` holding the network
            under the attribute the records name).
        records: Records not yet applied to ``module``.

    Raises:
        ValueError: If a record names a network attribute ``module`` does not have, or has no replay.
    """
    for record in records:
        function = _replay_function(record)
        network = getattr(module, record.network, None)
        if not isinstance(network, nn.Module):
            raise ValueError(f"architecture record {record.kind!r} changes the network {record.network!r}, but "
                             f"{type(module).__name__} has no such submodule")
        setattr(module, record.network, function(network, record.payload))
        append_record(module, record)


def replay_onto_network(network: nn.Module, records: list[ArchitectureRecord]) -> nn.Module:
    """Replay records onto a bare network (no LightningModule around it), for commands and teachers.

    Args:
        network: A freshly built network.
        records: A checkpoint's records; all must name the same network attribute.

    Returns:
        The rebuilt network (possibly a new object, e.g. a QAT-prepared ``GraphModule``).

    Raises:
        ValueError: If the records change more than one network.
    """
    attributes = sorted({record.network for record in records})
    if len(attributes) > 1:
        raise ValueError(f"the checkpoint's architecture records change several networks {attributes}; "
                         "rebuild the whole LightningModule instead")
    if not attributes:
        return network
    holder = nn.Module()
    holder.add_module(attributes[0], network)
    replay_records(holder, records)
    return getattr(holder, attributes[0])


def restore_architecture(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Rebuild ``module``'s networks to the architecture ``checkpoint`` recorded, before its weights load.

    Records already applied to ``module`` are skipped, so calling it twice (the module's own hook and a
    callback's) is harmless.

    Args:
        module: The freshly built LightningModule.
        checkpoint: The loaded checkpoint dictionary.

    Raises:
        ValueError: If ``module`` already went through changes the checkpoint does not start with.

    Example:
        >>> # class MyModule(pl.LightningModule):
        >>> #     def on_load_checkpoint(self, checkpoint):
        >>> #         restore_architecture(self, checkpoint)
    """
    saved, applied = checkpoint_records(checkpoint), applied_records(module)
    if saved[: len(applied)] != applied:
        raise ValueError(f"the module's network was already changed by {[r.kind for r in applied]}, which the "
                         f"checkpoint (records {[r.kind for r in saved]}) does not start with: load it into a "
                         "freshly built module")
    replay_records(module, saved[len(applied):])


class RestoresArchitecture:
    """Mixin for a LightningModule: compressed checkpoints load back without the callbacks.

    Put it before ``LightningModule`` in the bases. Its ``on_load_checkpoint`` replays the
    checkpoint's architecture records; its ``on_save_checkpoint`` writes them, so a compressed
    module fine-tuned without compression callbacks still saves loadable checkpoints. Override either
    hook and call ``super()`` to keep this.

    Example:
        >>> import lightning.pytorch as pl
        >>> class MyModule(RestoresArchitecture, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(4, 2)
        >>> MyModule().net.out_features
        2
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replay the checkpoint's architecture records before its weights load."""
        restore_architecture(self, checkpoint)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the module's architecture records into the checkpoint."""
        write_records(self, checkpoint)  # type: ignore[arg-type]
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
