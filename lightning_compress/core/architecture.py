"""What shape the network has: replayable records of structural changes, and the one replay.

Callbacks that change a network's structure append an :class:`ArchitectureRecord` to the
LightningModule; checkpoints carry the records, and :func:`restore_architecture` replays them onto a
freshly built module before its weights load, so a compressed checkpoint loads wherever a dense one
would. Each technique registers the replay of its own kind with :func:`register_replay`.

Example:
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
from typing_extensions import override

from lightning_compress.core.layers import uncompiled_name, unwrap_compiled

ARCHITECTURE_KEY = "compression_architecture"
"""Top-level checkpoint key holding the list of :class:`ArchitectureRecord` dictionaries."""

APPLIED_ATTRIBUTE = "compression_architecture"
"""The module attribute listing the records applied to its networks (travels with copies of the module)."""

ReplayFunction = Callable[[nn.Module, Mapping[str, Any]], nn.Module]
"""``(network, payload) -> network``: rebuild one structural change on a network (returns the new
network object, or the same one changed in place). Weights are meaningless until a state dict loads."""

_REPLAYS: dict[str, tuple[int, ReplayFunction]] = {}


@dataclass(frozen=True)
class ArchitectureRecord:
    """One structural change, enough to rebuild it on a fresh copy.

    Args:
        kind: Which registered replay function rebuilds it.
        network: Attribute of the LightningModule holding the network it changed.
        payload: JSON-like description the replay function reads, in format ``version``.
    """

    kind: str
    network: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dictionary, as checkpoints store it."""
        return {"kind": self.kind, "network": self.network, "payload": dict(self.payload), "version": self.version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchitectureRecord:
        """Read back what :meth:`to_dict` wrote; raise ``ValueError`` if ``data`` is not a record."""
        if not isinstance(data, Mapping) or not {"kind", "network", "payload", "version"} <= set(data):
            raise ValueError(f"not an architecture record (expected kind/network/payload/version): {data!r}")
        return cls(data["kind"], data["network"], dict(data["payload"]), int(data["version"]))


def register_replay(kind: str, version: int = 1) -> Callable[[ReplayFunction], ReplayFunction]:
    """Decorator registering the replay of records of ``kind`` (unique), up to payload ``version``."""

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
    """A copy of the structural changes applied to ``module``'s networks so far, in order."""
    return list(getattr(module, APPLIED_ATTRIBUTE, []))


def append_record(module: nn.Module, record: ArchitectureRecord) -> None:
    """Note that ``record``'s change was just applied to ``module`` (callbacks call this when they act)."""
    setattr(module, APPLIED_ATTRIBUTE, applied_records(module) + [record])


def checkpoint_records(checkpoint: Mapping[str, Any]) -> list[ArchitectureRecord]:
    """The records a loaded checkpoint carries, in the order they were applied (none if dense)."""
    return [ArchitectureRecord.from_dict(data) for data in checkpoint.get(ARCHITECTURE_KEY) or []]


def write_records(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Store ``module``'s applied records in the ``checkpoint`` being written (idempotent)."""
    records = applied_records(module)
    if records:
        checkpoint[ARCHITECTURE_KEY] = [record.to_dict() for record in records]


def replay_records(module: nn.Module, records: list[ArchitectureRecord]) -> None:
    """Apply ``records`` (not yet applied) to ``module``'s networks, in order, and note them as applied.

    Raises ``ValueError`` if a record names a network ``module`` does not have, or has no replay.
    """
    for record in records:
        function = _replay_function(record)
        network = getattr(module, record.network, None)
        if not isinstance(network, nn.Module):
            raise ValueError(f"architecture record {record.kind!r} changes the network {record.network!r}, but "
                             f"{type(module).__name__} has no such submodule")
        inner = unwrap_compiled(network)  # records name layers as users write them, not inside the wrapper
        rebuilt = function(inner, record.payload)
        if rebuilt is not inner:  # a new network (e.g. QAT-prepared) replaces the wrapper too
            setattr(module, record.network, rebuilt)
        append_record(module, record)


def replay_onto_network(network: nn.Module, records: list[ArchitectureRecord]) -> nn.Module:
    """Replay a checkpoint's records onto a bare network; return it, or the new object that replaces it.

    Raises ``ValueError`` if the records change more than one network.
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

    Call it from ``on_load_checkpoint``; records already applied are skipped. Raises ``ValueError`` if
    ``module`` went through changes the checkpoint does not start with.
    """
    saved, applied = checkpoint_records(checkpoint), applied_records(module)
    if saved[: len(applied)] != applied:
        raise ValueError(f"the module's network was already changed by {[r.kind for r in applied]}, which the "
                         f"checkpoint (records {[r.kind for r in saved]}) does not start with: load it into a "
                         "freshly built module")
    replay_records(module, saved[len(applied):])
    if isinstance(checkpoint.get("state_dict"), dict):
        match_compiled_names(module, checkpoint["state_dict"])


def match_compiled_names(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Rename ``state_dict`` keys in place to ``module``'s own, where they differ only by ``torch.compile``'s
    ``_orig_mod`` parts: a checkpoint of a compiled network loads into an uncompiled one and vice versa.

    Example:
        >>> import torch
        >>> holder = nn.Module(); holder.net = torch.compile(nn.Linear(2, 2))
        >>> state = {"net.weight": torch.zeros(2, 2), "net.bias": torch.zeros(2)}
        >>> match_compiled_names(holder, state); sorted(state)
        ['net._orig_mod.bias', 'net._orig_mod.weight']
    """
    own = {uncompiled_name(key): key for key in module.state_dict()}
    for key in [key for key in state_dict if key not in own.values()]:
        target = own.get(uncompiled_name(key))
        if target is not None and target not in state_dict:
            state_dict[target] = state_dict.pop(key)


class RestoresArchitecture:
    """Mixin for a LightningModule: compressed checkpoints load back, and save, without the callbacks.

    Put it first: ``class MyModule(RestoresArchitecture, pl.LightningModule)``; an override of its hooks
    must call ``super()``.
    """

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replay the checkpoint's architecture records before its weights load."""
        restore_architecture(self, checkpoint)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the module's architecture records into the checkpoint."""
        write_records(self, checkpoint)  # type: ignore[arg-type]
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
