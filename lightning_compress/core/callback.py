"""CompressionCallback: the base of every callback lightning-compress ships.

The base owns what every technique needs around its own work: the network lookup, one step budget
and one composition check per fit (the first compression callback's ``setup`` checks every
declaration in the Trainer, the others reuse the verdict), the architecture-restore hook, writing
architecture records into checkpoints, the non-finite loss guard and the run-time patches a
technique installs on the user's objects (named in the start-of-fit log line and ``repr``, removed
in ``teardown``). A technique is a subclass that implements :meth:`~CompressionCallback.declaration`,
:meth:`~CompressionCallback.setup_fit` and the hooks of its own work, calling ``super()`` in the
Lightning hooks the base defines.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_compress.core.composition import Effect
    >>> class CountSteps(CompressionCallback):
    ...     effect = Effect.REPORTS
    ...     def declaration(self, budget):
    ...         return self.declare(StepWindow(budget.total_steps))
    >>> CountSteps()
    CountSteps(network=None)
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_compress.core.architecture import RestoresArchitecture, restore_architecture, write_records
from lightning_compress.core.composition import Declaration, Effect, check_declarations
from lightning_compress.core.epoch_restart import restart_finished_epoch
from lightning_compress.core.guards import check_step_loss
from lightning_compress.core.layers import find_network, unwrap_compiled
from lightning_compress.core.optimizer_order import ORDER_KEY, parameter_order, restore_parameter_order
from lightning_compress.core.progress import StepBudget, StepWindow, step_budget


_ABSENT = object()


@dataclass
class RuntimePatch:
    """An attribute of a user's object replaced for the duration of a fit, and how to put it back.

    Args:
        target: The patched object (e.g. the LightningModule).
        attribute: The replaced attribute (e.g. ``"training_step"``).
        reason: Why, for the log line and ``repr``.
        previous: The instance attribute it replaced (``_ABSENT``: the class's own was in use).
    """

    target: Any
    attribute: str
    reason: str
    previous: Any = _ABSENT

    def __str__(self) -> str:
        return f"{type(self.target).__name__}.{self.attribute} ({self.reason})"

    def remove(self) -> None:
        """Put back what the instance had before the patch."""
        if self.previous is _ABSENT:
            self.target.__dict__.pop(self.attribute, None)
        else:
            self.target.__dict__[self.attribute] = self.previous


@dataclass(frozen=True)
class _Verdict:
    budget: StepBudget
    declarations: dict[int, Declaration]


_VERDICTS: weakref.WeakKeyDictionary[pl.Trainer, _Verdict] = weakref.WeakKeyDictionary()


class CompressionCallback(Callback, abc.ABC):
    """Base class of compression callbacks: subclass it to add a technique.

    A subclass sets :attr:`effect`, implements :meth:`declaration` (what it does over which steps,
    computed from its arguments and the run's step budget only) and the hooks of its own work. The
    base resolves, in ``setup`` (stage ``"fit"``): :attr:`network_name` (the LightningModule's child
    the technique acts on, when :attr:`acts_on_network`), :attr:`budget`, :attr:`window` (this
    callback's declared steps) and :attr:`composition` (every compression callback's declaration,
    checked together once per fit).

    Args:
        network: Attribute of the LightningModule holding the network; ``None`` finds the only child
            with Conv/Linear layers.
    """

    effect: ClassVar[Effect]
    """What the technique does to the model (orders it among the others)."""
    acts_on_network: ClassVar[bool] = True
    """Whether ``setup`` looks up one network (``False``: the technique selects layers in the whole module)."""
    guards_loss: ClassVar[bool] = False
    """Whether a non-finite loss inside the window stops the run, naming this callback."""

    def __init__(self, network: str | None = None) -> None:
        self.network = network
        self.network_name: str | None = None
        self.budget: StepBudget | None = None
        self.window: StepWindow | None = None
        self.composition: list[Declaration] = []
        self.patches: list[RuntimePatch] = []
        self._saved_parameter_order: list | None = None

    # ------------------------------------------------------------------------------------ contract
    @abc.abstractmethod
    def declaration(self, budget: StepBudget) -> Declaration:
        """What this callback does to the model and over which optimizer steps.

        Args:
            budget: The run's step budget.

        Returns:
            The declaration (see :meth:`declare`).
        """

    def declare(self, window: StepWindow, **details: Any) -> Declaration:
        """A :class:`~lightning_compress.core.composition.Declaration` of this callback's :attr:`effect`.

        Args:
            window: The optimizer steps it acts over.
            **details: Facts the composition rules read (``channel_multiple``, ``nm``, ``replaces_layers``).

        Returns:
            The declaration.
        """
        return Declaration(type(self).__name__, self.effect, window, details)

    def is_guarded_step(self, step: int) -> bool:
        """Whether the loss of optimizer ``step`` is checked for NaN/inf (from the window's start on).

        Args:
            step: The optimizer step.

        Returns:
            True when :attr:`guards_loss` and ``step`` is at or after the window's start.
        """
        return self.guards_loss and self.window is not None and step >= self.window.start

    def network_of(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network this callback acts on (inside a ``torch.compile`` wrapper, which then follows it).

        Args:
            pl_module: The LightningModule.

        Returns:
            The network module.
        """
        return unwrap_compiled(getattr(pl_module, self.network_name))

    @staticmethod
    def rewrap_distributed(trainer: pl.Trainer) -> None:
        """Wrap the module again after its parameters were replaced (DDP holds the old ones).

        Args:
            trainer: The trainer whose strategy wraps the module.
        """
        if isinstance(trainer.strategy, DDPStrategy):
            trainer.strategy.model = trainer.lightning_module
            trainer.strategy.configure_ddp()

    # ------------------------------------------------------------------------------------ patches
    def patch(self, target: Any, attribute: str, replacement: Callable[..., Any], reason: str) -> None:
        """Replace ``target.attribute`` by ``replacement`` until ``teardown`` (a visible, reversible patch).

        Args:
            target: The object to patch (an instance: the patch is an instance attribute).
            attribute: The attribute to replace.
            replacement: The new value.
            reason: Why, named in the start-of-fit log line and ``repr``.
        """
        previous = target.__dict__.get(attribute, _ABSENT)
        setattr(target, attribute, replacement)
        self.patches.append(RuntimePatch(target, attribute, reason, previous))

    def remove_patches(self) -> None:
        """Undo every patch this callback installed, newest first."""
        while self.patches:
            self.patches.pop().remove()

    def __repr__(self) -> str:
        patches = f", patches=[{', '.join(map(str, self.patches))}]" if self.patches else ""
        return f"{type(self).__name__}(network={self.network_name or self.network!r}{patches})"

    # ------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Arm the architecture restore; for a fit, find the network and check the composition once."""
        self._arm_restore(trainer, pl_module)
        if stage != "fit":
            return
        if self.acts_on_network:
            self.network_name, _ = find_network(pl_module, self.network_name or self.network)
        verdict = _VERDICTS.get(trainer)
        if verdict is None or id(self) not in verdict.declarations:
            verdict = _check(trainer)
        self.budget = verdict.budget
        self.window = verdict.declarations[id(self)].window
        self.composition = list(verdict.declarations.values())
        self.setup_fit(trainer, pl_module)

    def setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set up the technique for a fit: select its layers, refuse what only it can check (default: nothing).

        Runs at the end of ``setup("fit")``, after the network lookup and the composition check, before
        any training step.

        Args:
            trainer: The trainer about to fit.
            pl_module: The LightningModule.
        """

    def _arm_restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make ``pl_module.on_load_checkpoint`` replay architecture records first, unless the module does
        (:class:`~lightning_compress.core.architecture.RestoresArchitecture`) or another callback patched it:
        Lightning loads the weights right after that hook, before any callback hook."""
        if isinstance(pl_module, RestoresArchitecture) or any(
            patch.target is pl_module and patch.attribute == "on_load_checkpoint"
            for cb in trainer.callbacks if isinstance(cb, CompressionCallback) for patch in cb.patches
        ):
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            restore_architecture(pl_module, checkpoint)
            original(checkpoint)

        self.patch(pl_module, "on_load_checkpoint", on_load_checkpoint,
                   "replays architecture records before the weights load")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log what this callback will do and what it patched."""
        window = self.window
        span = f"steps {window.start}..{window.end if window.end is not None else 'fit end'}" if window else "fit"
        patched = f"; patches {', '.join(map(str, self.patches))}" if self.patches else ""
        network = f" on {self.network_name!r}" if self.network_name else ""
        rank_zero_info(f"{type(self).__name__}: {self.effect.value}{network}, {span}{patched}")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Stop on a non-finite loss inside the guarded steps (see :mod:`lightning_compress.core.guards`)."""
        if self.is_guarded_step(trainer.global_step):
            check_step_loss(trainer, outputs, type(self).__name__)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume: start a finished epoch's successor cleanly, give the optimizer state loaded by
        position back to the parameters it belongs to."""
        restart_finished_epoch(trainer)
        if self._saved_parameter_order is not None:
            restore_parameter_order(trainer.optimizers, pl_module, self._saved_parameter_order)
            self._saved_parameter_order = None

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Write the architecture records (the checkpoint reloads without callbacks) and the optimizer order."""
        write_records(pl_module, checkpoint)
        checkpoint[ORDER_KEY] = parameter_order(trainer.optimizers, pl_module)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Keep the saved optimizer order until the optimizer state is loaded (``on_train_start``)."""
        self._saved_parameter_order = checkpoint.get(ORDER_KEY)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Undo the patches and forget the composition verdict of the interrupted fit."""
        self.remove_patches()
        _VERDICTS.pop(trainer, None)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Undo the patches; after a fit, forget its composition verdict."""
        self.remove_patches()
        if stage == "fit":
            _VERDICTS.pop(trainer, None)


def _check(trainer: pl.Trainer) -> _Verdict:
    """Refuse a sharded strategy, measure the step budget once, collect every compression callback's declaration,
    check them together."""
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback)]
    check_strategy(trainer.strategy, callbacks)
    budget = step_budget(trainer)
    declarations = {id(cb): cb.declaration(budget) for cb in callbacks}
    check_declarations(list(declarations.values()))
    verdict = _Verdict(budget, declarations)
    _VERDICTS[trainer] = verdict
    return verdict


def check_strategy(strategy: Strategy, callbacks: list[CompressionCallback]) -> None:
    """Refuse a strategy that shards the network or wraps it in its own engine (FSDP, DeepSpeed, ModelParallel,
    ...): masks, channel removal, factorization, fake-quantization and the reports work on whole parameters of the
    user's modules on every process.

    Args:
        strategy: The Trainer's strategy.
        callbacks: The compression callbacks in the Trainer, named in the message.

    Raises:
        ValueError: Naming the strategy and the supported ones (a single device and the DDP family).

    Example:
        >>> from lightning.pytorch.strategies import FSDPStrategy
        >>> check_strategy(FSDPStrategy(), [])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: strategy=FSDPStrategy shards or wraps the network's parameters, and lightning-compress ...
    """
    if isinstance(strategy, SingleDeviceStrategy) or (
            isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)):
        return
    users = f" (needed by {', '.join(type(cb).__name__ for cb in callbacks)})" if callbacks else ""
    raise ValueError(f"strategy={type(strategy).__name__} shards or wraps the network's parameters, and "
                     f"lightning-compress works on whole parameters on every process{users}; use a single device or "
                     "the DDP family: strategy='auto', 'ddp', 'ddp_spawn', 'ddp_fork' or 'ddp_notebook'")
