"""With whom a technique composes: declared effects and step windows, checked once before training.

Each compression callback declares what it does (:class:`Effect`) and over which optimizer steps;
:func:`check_declarations` refuses a combination that cannot work, naming both callbacks and the fix.
Effects apply in this order, whatever the callback list's order:

1. ``ARCHITECTURE`` (channel pruning, factorization): windows disjoint, all ending before quantization;
2. ``MASKS`` (magnitude pruning): masks follow architecture changes;
3. ``QUANTIZES``: fake-quantize, then convert at fit end; one per Trainer;
4. ``LOSS`` (distillation): one per Trainer;
5. ``REPORTS``: measure what fit produced, last.

Example:
    >>> from lightning_compress.core.progress import StepWindow
    >>> pruning = Declaration("ChannelPruning", Effect.ARCHITECTURE, StepWindow(0, 50, 10))
    >>> qat = Declaration("QuantizationAwareTraining", Effect.QUANTIZES, StepWindow(40))
    >>> check_declarations([pruning, qat])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ChannelPruning changes the architecture until step 50, but QuantizationAwareTraining quantizes from step 40: ...
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_compress.core.progress import StepWindow


class Effect(enum.Enum):
    """What a compression callback does to the model, in the order the effects apply."""

    ARCHITECTURE = "changes the architecture"
    MASKS = "masks weights"
    QUANTIZES = "quantizes"
    LOSS = "changes the loss"
    REPORTS = "reports"


@dataclass(frozen=True)
class Declaration:
    """What one callback does, and when.

    Args:
        callback: The callback's class name, for messages.
        effect: What it does.
        window: The optimizer steps over which it acts (``end=None``: until fit ends).
        details: Facts the rules need: ``channel_multiple`` (channel counts kept multiples of this),
            ``nm`` (an N:M pattern ``(n, m)``), ``replaces_layers`` (swaps layers for new parameters),
            ``layers`` (the layer names acted on).
    """

    callback: str
    effect: Effect
    window: StepWindow
    details: Mapping[str, Any] = field(default_factory=dict)


def _single(found: Sequence[Declaration], effect: Effect, fix: str) -> None:
    same = [d for d in found if d.effect is effect]
    if len(same) > 1:
        raise ValueError(f"{same[0].callback} and {same[1].callback} each {effect.value}; a Trainer takes one "
                         f"such callback: {fix}")


def _window_text(declaration: Declaration) -> str:
    window = declaration.window
    return f"steps {window.start}..{window.end if window.end is not None else 'fit end'}"


def check_declarations(found: Sequence[Declaration]) -> None:
    """Raise ``ValueError`` naming both callbacks and the fix if declarations break a rule (see module)."""
    _single(found, Effect.QUANTIZES, "use QuantizationAwareTraining for trained int8, or PostTrainingQuantization "
            "for calibrated int8, not both")
    _single(found, Effect.LOSS, "distil from one teacher per run")
    changers = [d for d in found if d.effect is Effect.ARCHITECTURE]
    for index, first in enumerate(changers):
        for second in changers[index + 1:]:
            if first.window.overlaps(second.window):
                raise ValueError(
                    f"{first.callback} ({_window_text(first)}) and {second.callback} ({_window_text(second)}) both "
                    "change the architecture and their windows overlap: give them disjoint windows (one's end "
                    "before the other's start)")
    for changer in changers:
        changer_end = changer.window.end if changer.window.end is not None else changer.window.start
        for quantizer in (d for d in found if d.effect is Effect.QUANTIZES):
            if quantizer.window.start <= changer_end:
                raise ValueError(
                    f"{changer.callback} changes the architecture until step {changer_end}, but {quantizer.callback} "
                    f"quantizes from step {quantizer.window.start}: the architecture must be final before "
                    f"quantization starts; set {changer.callback}(end=...) earlier or {quantizer.callback}"
                    "(start=...) later")
        for masker in (d for d in found if d.effect is Effect.MASKS):
            nm, multiple = masker.details.get("nm"), changer.details.get("channel_multiple")
            if nm is not None and multiple is not None and multiple % nm[1]:
                raise ValueError(
                    f"{masker.callback} keeps a {nm[0]}:{nm[1]} pattern along input channels, but {changer.callback} "
                    f"keeps channel counts multiples of {multiple} only: set {changer.callback}(round_to=...) to a "
                    f"multiple of {nm[1]}")
            if changer.details.get("replaces_layers") and masker.window.start <= changer_end:
                raise ValueError(
                    f"{masker.callback} starts masking at step {masker.window.start}, but {changer.callback} replaces "
                    f"layers until step {changer_end}, after which the masked weights no longer exist: set "
                    f"{masker.callback}(start=...) after {changer.callback}'s last change")

