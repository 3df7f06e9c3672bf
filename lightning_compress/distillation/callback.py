"""KnowledgeDistillation: adds a teacher's soft targets to any LightningModule's training loss.

Example:
    >>> from torch import nn
    >>> kd = KnowledgeDistillation(teacher=nn.Linear(8, 4), temperature=4.0, alpha=0.9)
    >>> trainer = pl.Trainer(callbacks=[kd], max_epochs=1, logger=False, enable_progress_bar=False)
    >>> (kd.temperature, kd.alpha)
    (4.0, 0.9)
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import Dataset

from lightning_compress.core.composition import Declaration, Effect, check_composition
from lightning_compress.core.guards import check_step_loss
from lightning_compress.core.layers import find_network
from lightning_compress.core.progress import StepWindow, step_budget
from lightning_compress.distillation.losses import (
    ALPHA_SCHEDULES,
    AlphaSchedule,
    combined_loss,
    distillation_loss,
    scheduled_alpha,
    top1_agreement,
)
from lightning_compress.distillation.teacher import (
    SELF,
    FrozenTeacher,
    TeacherPrecision,
    copy_network,
    load_teacher,
)


class IndexedDataset(Dataset):
    """Wraps a dataset so that each sample also carries its index, as the last element.

    ``(x, y)`` becomes ``(x, y, index)``; a sample that is not a tuple/list ``x`` becomes
    ``(x, index)``. This is how :class:`KnowledgeDistillation` (``cache_logits=True``) learns which
    sample each row of a batch is; the callback strips the index off again before the module's
    ``training_step`` sees the batch, so the module is unchanged.

    Args:
        dataset: A map-style dataset.

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


class _CaptureHook:
    """Forward hook that records the student network's inputs and output while its callback is armed.

    Holds the callback weakly and checks the module's identity, so that a copy of the network
    (``deepcopy``, QAT preparation) neither drags the teacher along nor records anything.
    """

    def __init__(self, callback: KnowledgeDistillation) -> None:
        self.callback = weakref.ref(callback)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        callback = self.callback()
        if callback is not None and callback._armed and module is callback._hooked:
            callback._captured.append((args, kwargs, output))

    @staticmethod
    def remove_all(module: nn.Module) -> None:
        """Remove every capture hook from ``module``, including ones copied along with it."""
        for key in [key for key, hook in module._forward_hooks.items() if isinstance(hook, _CaptureHook)]:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


class KnowledgeDistillation(pl.Callback):
    """Distil a frozen teacher into the model being trained, without touching its ``training_step``.

    The training loss becomes ``(1 − α)·task_loss + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``,
    where ``task_loss`` is whatever the module's ``training_step`` returns (a tensor, or a dict's
    ``"loss"``).

    **The wrapper contract.** At fit start the callback finds the student network — the submodule
    named ``network``, or the only child with Conv/Linear layers (``model`` in
    :class:`~lightning_compress.ImageClassifier`, ``net`` or whatever a user called it) — and

    1. registers a forward hook on it that, during ``training_step`` only, captures the inputs the
       network was called with and the logits it returned;
    2. replaces ``pl_module.training_step`` (an instance attribute, removed again at fit end or on
       error) by a wrapper that calls the original, then runs the teacher on exactly the captured
       inputs (the same augmented batch) and mixes the losses.

    So the network must be called exactly once per ``training_step`` and return a logits tensor
    whose shape equals the teacher's; automatic optimization is required. Each violation fails with
    a message saying which, the shape check on the first batch before any optimizer step. If
    another callback replaces the network object (QAT swaps in an FX ``GraphModule``) the hook
    follows it: the wrapper checks the network's identity every step and re-hooks.

    The teacher is frozen (eval, no grad, optional bf16), moved to the student's device, and is not
    a submodule of the LightningModule: it is never saved in the student's weights. Under DDP
    every rank runs its own copy of the teacher on its own shard of the batch; there is nothing to
    synchronise (the KD term is part of each rank's loss, whose gradients DDP already averages).

    **Self-distillation** (``teacher="self"``): the teacher is a frozen copy of the student network
    as it was at fit start, before any compression callback acted on it -- the natural teacher for
    pruning, factorization and quantization-aware fine-tuning of a trained network. Its weights are
    saved in this callback's checkpoint state, so a run resumed with ``ckpt_path`` distils from the
    same dense teacher even though the student network it restores is already compressed.

    **Logit cache** (``cache_logits=True``): the teacher's logits are computed once per sample and
    reused in later epochs. Only correct when a sample's input is the same every epoch (no random
    augmentation, or one seeded per sample); the first cache hit of each fit is checked against a
    fresh teacher forward and a mismatch raises. Samples are identified by index: wrap the training
    dataset in :class:`IndexedDataset`, use ``CIFARDataModule(with_indices=True, augment=False)``, or
    return ``(..., index)`` yourself; the callback removes the index before the module's
    ``training_step`` sees the batch. Each DDP rank caches the samples it sees; a sample first seen
    on a rank is computed there.

    Logs ``distill/kd_loss``, ``distill/task_loss``, ``distill/agreement`` (teacher–student top-1
    agreement) and ``distill/alpha`` every training step.

    Args:
        teacher: ``"self"`` (see above), an ``nn.Module``, the path of a Lightning checkpoint, or a zoo
            model name (with ``checkpoint``); see :func:`~lightning_compress.distillation.teacher.load_teacher`.
        checkpoint: Weights of a zoo-name teacher (Lightning checkpoint or plain state dict).
        teacher_class: LightningModule class path a checkpoint-path teacher is rebuilt with
            (default ``lightning_compress.module.ImageClassifier``).
        temperature: Softening temperature ``T > 0``.
        alpha: Weight of the distillation term in ``[0, 1]`` (at the start of the run if scheduled).
        final_alpha: Weight at the end of the run, in ``[0, 1]``; only with a non-constant schedule.
        alpha_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` from ``alpha`` to ``final_alpha``
            over the run's optimizer steps.
        network: Attribute name of the student network in the LightningModule; ``None`` detects it.
        teacher_precision: ``"32"``, ``"bf16"`` or ``"16"``.
        cache_logits: Compute the teacher's logits once per sample and reuse them (see above).

    Raises:
        ValueError: For an argument outside its allowed values, or an unreadable checkpoint.
        FileNotFoundError: For a missing checkpoint.

    Example:
        >>> kd = KnowledgeDistillation(nn.Linear(8, 4), temperature=4.0, alpha=0.9, alpha_schedule="linear",
        ...                            final_alpha=0.5)
        >>> kd.alpha_at(0.5)
        0.7
    """

    def __init__(
        self,
        teacher: nn.Module | str,
        checkpoint: str | None = None,
        teacher_class: str | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        final_alpha: float | None = None,
        alpha_schedule: AlphaSchedule = "constant",
        network: str | None = None,
        teacher_precision: TeacherPrecision = "32",
        cache_logits: bool = False,
    ) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        for name, value in (("alpha", alpha), ("final_alpha", final_alpha)):
            if value is not None and (isinstance(value, bool) or not 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {alpha_schedule!r}")
        if (alpha_schedule == "constant") != (final_alpha is None):
            raise ValueError(
                "final_alpha goes with alpha_schedule='linear' or 'cosine' and only with them, got "
                f"alpha_schedule={alpha_schedule!r}, final_alpha={final_alpha!r}"
            )
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.final_alpha = final_alpha
        self.alpha_schedule = alpha_schedule
        self.network = network
        self.cache_logits = cache_logits
        self.teacher_precision = teacher_precision
        self.is_self_teacher = isinstance(teacher, str) and teacher == SELF
        if self.is_self_teacher and (checkpoint is not None or teacher_class is not None):
            raise ValueError(f"teacher={SELF!r} copies the student network at fit start: checkpoint and "
                             f"teacher_class do not apply, got checkpoint={checkpoint!r}, teacher_class={teacher_class!r}")
        self.teacher: FrozenTeacher | None = None if self.is_self_teacher else FrozenTeacher(
            load_teacher(teacher, checkpoint, teacher_class), teacher_precision)
        self._self_structure: nn.Module | None = None  # the network as set up, before a checkpoint restores it
        self._saved_self_teacher: dict[str, torch.Tensor] | None = None
        self.cache = TeacherLogitCache()
        self._total_steps = 1
        self._network_name: str | None = None
        self._hooked: nn.Module | None = None
        self._wrapped: pl.LightningModule | None = None
        self._armed = False
        self._captured: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []
        self._checked_shapes = False
        self._checked_cache = False

    def alpha_at(self, progress: float) -> float:
        """The distillation weight at a fraction ``progress`` of the run.

        Args:
            progress: Fraction of optimizer steps done, in ``[0, 1]``.

        Returns:
            ``alpha``, or the scheduled value between ``alpha`` and ``final_alpha``.
        """
        if self.final_alpha is None:
            return self.alpha
        return scheduled_alpha(progress, self.alpha, self.final_alpha, self.alpha_schedule)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "KnowledgeDistillation needs automatic optimization: with manual optimization the module "
                "calls backward itself, so the distillation term cannot be added to its loss"
            )
        self._network_name, network = find_network(pl_module, self.network)
        if self.is_self_teacher:
            self._self_structure = copy_network(network)
        check_composition(trainer)

    def compression_declaration(self, trainer: pl.Trainer) -> Declaration:
        """Changes the loss throughout the fit.

        Args:
            trainer: The trainer about to fit.

        Returns:
            The declaration :func:`~lightning_compress.core.composition.check_composition` reads.
        """
        return Declaration(type(self).__name__, Effect.LOSS, StepWindow(0))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total_steps = max(1, step_budget(trainer).total_steps) if self.final_alpha is not None else 1
        if self.is_self_teacher:
            self._take_self_teacher(pl_module)
        self.teacher.to(pl_module.device)
        self._checked_shapes = False
        self._checked_cache = False
        self._wrap(pl_module)
        rank_zero_info(
            f"KnowledgeDistillation: teacher {type(self.teacher.module).__name__} -> student network "
            f"{self._network_name!r}, T={self.temperature}, alpha={self.alpha}"
            + (f"->{self.final_alpha} ({self.alpha_schedule})" if self.final_alpha is not None else "")
            + (", teacher logits cached by sample index" if self.cache_logits else "")
        )

    def _take_self_teacher(self, pl_module: pl.LightningModule) -> None:
        """Freeze a copy of the network as it is now (fit start), or the one a resumed checkpoint saved."""
        if self._saved_self_teacher is not None:  # resumed: the network is restored compressed, the teacher dense
            network = self._self_structure
            network.load_state_dict(self._saved_self_teacher)
        else:
            network = copy_network(getattr(pl_module, self._network_name))
        _CaptureHook.remove_all(network)
        self.teacher = FrozenTeacher(network, self.teacher_precision)
        self._self_structure, self._saved_self_teacher = None, None

    @property
    def state_key(self) -> str:
        """Only a ``"self"`` teacher has state; other instances get distinct keys so that two of them in a
        Trainer reach the composition check (one loss changer per run) instead of Lightning's key check."""
        return self._generate_state_key(teacher=SELF) if self.is_self_teacher else self._generate_state_key(id=id(self))

    def state_dict(self) -> dict[str, Any]:
        """The weights of a ``"self"`` teacher (other teachers are not saved)."""
        if not self.is_self_teacher or self.teacher is None:
            return {}
        return {"self_teacher": {k: v.detach().cpu() for k, v in self.teacher.module.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a ``"self"`` teacher's weights until fit start, when they load into the set-up network's copy."""
        if self.is_self_teacher and "self_teacher" in state_dict:
            self._saved_self_teacher = state_dict["self_teacher"]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Stop on a non-finite distilled loss, naming the step (see :mod:`lightning_compress.core.guards`)."""
        check_step_loss(trainer, outputs, type(self).__name__)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._unwrap()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()

    # ------------------------------------------------------------------ the wrapper

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        self._unwrap()
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._distilled_step(pl_module, original, args, kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module
        self._follow_network(pl_module)

    def _unwrap(self) -> None:
        if self._hooked is not None:
            _CaptureHook.remove_all(self._hooked)
        self._hooked, self._armed, self._captured = None, False, []
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    def _follow_network(self, pl_module: pl.LightningModule) -> None:
        network = getattr(pl_module, self._network_name)
        if network is self._hooked:
            return
        if self._hooked is not None:
            _CaptureHook.remove_all(self._hooked)
        _CaptureHook.remove_all(network)  # stale copies that came with a deep-copied network
        network.register_forward_hook(_CaptureHook(self), with_kwargs=True)
        self._hooked = network

    def _split_indices(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], torch.Tensor | None]:
        if not self.cache_logits:
            return args, None
        batch = args[0]
        last = batch[-1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
        # labels are integer vectors too; unlike indices they repeat within a batch (almost always)
        if not (isinstance(last, torch.Tensor) and not last.is_floating_point() and last.ndim == 1
                and last.unique().numel() == last.numel()):
            raise ValueError(
                "cache_logits=True needs training batches whose last element is the sample indices (distinct "
                "integers); wrap the training dataset in lightning_compress.distillation.IndexedDataset(dataset) or "
                "use CIFARDataModule(with_indices=True, augment=False)"
            )
        rest = batch[:-1]
        stripped = rest[0] if len(rest) == 1 else type(batch)(rest)
        return (stripped, *args[1:]), batch[-1]

    def _teacher_logits(
        self, inputs: tuple[Any, ...], kwargs: dict[str, Any], indices: torch.Tensor | None
    ) -> torch.Tensor:
        if indices is None:
            return self.teacher(*inputs, **kwargs)
        cached = self.cache.lookup(indices)
        if cached is not None and self._checked_cache:
            return cached
        fresh = self.teacher(*inputs, **kwargs)
        if cached is not None:  # first hit of this fit: are the inputs really the same as when cached?
            scale = float(fresh.float().abs().max()) + 1e-6
            diff = float((fresh.float() - cached.float()).abs().max())
            if diff > 1e-2 * scale:
                raise RuntimeError(
                    "cache_logits=True, but the teacher's logits for the same samples changed since they were "
                    f"cached (max difference {diff:.3g}, logit scale {scale:.3g}): the training inputs differ "
                    "between epochs (random augmentation?). Use cache_logits=False, or an augmentation that is "
                    "deterministic per sample"
                )
            self._checked_cache = True
            return cached
        self.cache.store(indices, fresh)
        return fresh

    def _distilled_step(
        self,
        pl_module: pl.LightningModule,
        original: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        args, indices = self._split_indices(args)
        self._follow_network(pl_module)
        self._captured, self._armed = [], True
        try:
            output = original(*args, **kwargs)
        finally:
            self._armed = False
        captured, self._captured = self._captured, []
        if output is None:  # the module skipped this batch
            return None
        if len(captured) != 1:
            raise RuntimeError(
                f"KnowledgeDistillation expects the student network {self._network_name!r} to be called exactly "
                f"once per training_step, it was called {len(captured)} times. The teacher is run on the "
                "inputs of that one call; pass network=<attribute> naming the submodule that maps the batch to "
                "logits once"
            )
        inputs, input_kwargs, student_logits = captured[0]
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(
                f"the student network {self._network_name!r} returned {type(student_logits).__name__}, "
                "KnowledgeDistillation needs it to return a tensor of logits"
            )
        task_loss = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(task_loss, torch.Tensor):
            raise TypeError(
                "training_step must return a loss tensor or a dict with 'loss' for KnowledgeDistillation, "
                f"got {type(output).__name__}"
            )
        teacher_logits = self._teacher_logits(inputs, input_kwargs, indices)
        if not self._checked_shapes:
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(
                    f"teacher logits shape {tuple(teacher_logits.shape)} != student logits shape "
                    f"{tuple(student_logits.shape)} (network {self._network_name!r}): teacher and student must "
                    "predict the same classes"
                )
            self._checked_shapes = True
        kd_loss = distillation_loss(student_logits, teacher_logits, self.temperature)
        alpha = self.alpha_at(pl_module.trainer.global_step / self._total_steps)
        loss = combined_loss(task_loss, kd_loss, alpha)
        batch_size = student_logits.shape[0]
        log = functools.partial(pl_module.log, on_step=True, on_epoch=False, batch_size=batch_size)
        log("distill/kd_loss", kd_loss.detach())
        log("distill/task_loss", task_loss.detach())
        log("distill/agreement", top1_agreement(student_logits.detach(), teacher_logits))
        log("distill/alpha", alpha)
        if isinstance(output, Mapping):
            return {**output, "loss": loss}
        return loss

