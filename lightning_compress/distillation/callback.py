"""KnowledgeDistillation: adds a frozen teacher's soft targets to any LightningModule's training loss.

Example:
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
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.composition import Declaration, Effect
from lightning_compress.core.progress import StepBudget, StepWindow
from lightning_compress.distillation.cache import TeacherLogitCache, split_indices
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


class _CaptureHook:
    """Forward hook recording the student network's inputs and output while its callback is armed.

    It holds the callback weakly and checks the module's identity, so a copy of the network (``deepcopy``,
    QAT preparation) neither drags the teacher along nor records anything.
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


class KnowledgeDistillation(CompressionCallback):
    """Distil a frozen teacher into the network being trained, whatever the module's ``training_step``.

    The loss becomes ``(1 − α)·task_loss + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``,
    ``task_loss`` being what ``training_step`` returns (a tensor or a dict's ``"loss"``). ``training_step``
    is wrapped for the fit (a patch named in the start-of-fit log line and ``repr``) and a forward hook
    captures the student network's inputs and logits, so the teacher sees the exact (augmented) batch:
    the network must be called once per ``training_step`` and return logits shaped like the teacher's,
    under automatic optimization. The teacher is never a submodule, so it is not saved with the student.
    Logs ``distill/kd_loss``, ``distill/task_loss``, ``distill/agreement`` (top-1) and ``distill/alpha``.

    Args:
        teacher: ``"self"`` (a frozen copy of the student network at fit start, before any compression,
            kept in this callback's state for a resumed run), an ``nn.Module``, a Lightning checkpoint
            path or a zoo model name with ``checkpoint``
        (:func:`~lightning_compress.distillation.teacher.load_teacher`).
        checkpoint: Weights of a zoo-name teacher (Lightning checkpoint or plain state dict).
        teacher_class: LightningModule class path a checkpoint-path teacher is rebuilt with.
        temperature: Softening temperature ``T > 0``.
        alpha: Weight of the distillation term in ``[0, 1]`` (at the start of the run if scheduled).
        final_alpha: Weight at the end of the run, in ``[0, 1]``; only with a non-constant schedule.
        alpha_schedule: ``"constant"``, ``"linear"`` or ``"cosine"``, over the run's optimizer steps.
        network: Attribute name of the student network in the LightningModule; ``None`` detects it.
        teacher_precision: ``"32"``, ``"bf16"`` or ``"16"``.
        cache_logits: Compute the teacher's logits once per sample and reuse them; batches carry sample
            indices (:mod:`~lightning_compress.distillation.cache`) and inputs must not change between
            epochs, which the first cache hit of each fit checks.

    Example:
        >>> kd = KnowledgeDistillation(nn.Linear(8, 4), temperature=4.0, alpha=0.9, alpha_schedule="linear",
        ...                            final_alpha=0.5)
        >>> kd.alpha_at(0.5)
        0.7
    """

    effect = Effect.LOSS
    guards_loss = True

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
        super().__init__(network)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.final_alpha = final_alpha
        self.alpha_schedule = alpha_schedule
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
        self._hooked: nn.Module | None = None
        self._armed = False
        self._captured: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []
        self._checked_shapes = False
        self._checked_cache = False

    def alpha_at(self, progress: float) -> float:
        """The distillation weight after a fraction ``progress`` of the optimizer steps."""
        if self.final_alpha is None:
            return self.alpha
        return scheduled_alpha(progress, self.alpha, self.final_alpha, self.alpha_schedule)

    @override
    def declaration(self, budget: StepBudget) -> Declaration:
        """Changes the loss from the first step to the end of the fit."""
        return self.declare(StepWindow(0))

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse manual optimization; for a ``"self"`` teacher, keep the network's structure as set up."""
        if not pl_module.automatic_optimization:
            raise ValueError(
                "KnowledgeDistillation needs automatic optimization: with manual optimization the module "
                "calls backward itself, so the distillation term cannot be added to its loss"
            )
        if self.is_self_teacher:
            # before a resumed checkpoint restores the network compressed; the saved weights load into it
            self._self_structure = copy_network(getattr(pl_module, self.network_name))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze a ``"self"`` teacher, wrap ``training_step``, hook the student network, log the settings."""
        self._total_steps = max(1, self.budget.total_steps) if self.final_alpha is not None else 1
        if self.is_self_teacher:
            self._take_self_teacher(pl_module)
        self.teacher.to(pl_module.device)
        self._checked_shapes = False
        self._checked_cache = False
        self._wrap(pl_module)
        rank_zero_info(
            f"KnowledgeDistillation: teacher {type(self.teacher.module).__name__}, T={self.temperature}, "
            f"alpha={self.alpha}"
            + (f"->{self.final_alpha} ({self.alpha_schedule})" if self.final_alpha is not None else "")
            + (", teacher logits cached by sample index" if self.cache_logits else "")
        )
        super().on_fit_start(trainer, pl_module)  # its log line names the patch installed above

    def _take_self_teacher(self, pl_module: pl.LightningModule) -> None:
        """Freeze a copy of the network as it is now (fit start), or the one a resumed checkpoint saved."""
        if self._saved_self_teacher is not None:  # resumed: the network is restored compressed, the teacher dense
            network = self._self_structure
            network.load_state_dict(self._saved_self_teacher)
        else:
            network = copy_network(getattr(pl_module, self.network_name))
        _CaptureHook.remove_all(network)
        self.teacher = FrozenTeacher(network, self.teacher_precision)
        self._self_structure, self._saved_self_teacher = None, None

    @property
    @override
    def state_key(self) -> str:
        """Per instance (a ``"self"`` teacher: fixed), so two meet the composition check, not Lightning's."""
        if self.is_self_teacher:
            return self._generate_state_key(teacher=SELF)
        return self._generate_state_key(id=id(self))

    @override
    def state_dict(self) -> dict[str, Any]:
        """The weights of a ``"self"`` teacher (other teachers are not saved)."""
        if not self.is_self_teacher or self.teacher is None:
            return {}
        return {"self_teacher": {k: v.detach().cpu() for k, v in self.teacher.module.state_dict().items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a ``"self"`` teacher's weights; at fit start they load into a copy of the set-up network."""
        if self.is_self_teacher and "self_teacher" in state_dict:
            self._saved_self_teacher = state_dict["self_teacher"]

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unhook the student network and undo the patches: after the fit the module is as written."""
        self._unhook()
        self.remove_patches()
        super().on_fit_end(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Unhook the student network; the base undoes the patches."""
        self._unhook()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Unhook the student network; the base undoes the patches."""
        self._unhook()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ the wrapper

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._distilled_step(pl_module, original, args, kwargs)

        self.patch(pl_module, "training_step", training_step, "adds the distillation term to the loss")
        self._follow_network(pl_module)

    def _unhook(self) -> None:
        if self._hooked is not None:
            _CaptureHook.remove_all(self._hooked)
        self._hooked, self._armed, self._captured = None, False, []

    def _follow_network(self, pl_module: pl.LightningModule) -> None:
        network = getattr(pl_module, self.network_name)
        if network is self._hooked:
            return
        self._unhook()
        _CaptureHook.remove_all(network)  # stale copies that came with a deep-copied network
        network.register_forward_hook(_CaptureHook(self), with_kwargs=True)
        self._hooked = network

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
        indices = None
        if self.cache_logits:
            batch, indices = split_indices(args[0])
            args = (batch, *args[1:])
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
                f"KnowledgeDistillation expects the student network {self.network_name!r} to be called exactly "
                f"once per training_step, it was called {len(captured)} times. The teacher is run on the "
                "inputs of that one call; pass network=<attribute> naming the submodule that maps the batch to "
                "logits once"
            )
        inputs, input_kwargs, student_logits = captured[0]
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(
                f"the student network {self.network_name!r} returned {type(student_logits).__name__}, "
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
                    f"{tuple(student_logits.shape)} (network {self.network_name!r}): teacher and student must "
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

