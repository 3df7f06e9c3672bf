"""The suite's budgets and rows: each row a function building its callbacks from the public API.

A row function takes a :class:`Context` (the budget, the run's optimizer steps, the teacher checkpoint)
and returns a :class:`Plan`; it raises :class:`Skip` when this code version lacks what it needs. Each row
also names the package sources its result depends on, hashed into its code version (``code_version``),
so a recorded row is re-measured when, and only when, that code changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reporting import cpu_description

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_compress"
BASE_SOURCES = ("module.py", "data", "models", "core")
"""Package sources every row's result depends on (relative to ``lightning_compress/``)."""


@dataclass(frozen=True)
class Budget:
    """How much training one row gets; every row of a block shares it.

    Attributes:
        name: ``smoke``, ``cpu`` or ``gpu``.
        epochs: Student epochs.
        teacher_epochs: ResNet-56 teacher epochs.
        batch_size: Training batch size.
        precision: Lightning precision of training (testing is always fp32 / int8 on the CPU).
        accelerator: ``cpu`` or ``gpu``.
        val_size: Training images held out (not trained on; validation itself is not run).
        limit_train_batches: Batches per epoch (``None``: all).
        limit_test_batches: Test batches (``None``: all 10,000 images).
        latency_repeats: Timed runs per latency.
        data_on_device: Keep the whole dataset on the GPU (no host-to-device copies).
        lr: Peak learning rate (scaled with the batch size).
    """

    name: str
    epochs: int
    teacher_epochs: int
    batch_size: int = 128
    precision: str = "bf16-mixed"
    accelerator: str = "cpu"
    val_size: int = 5000
    limit_train_batches: int | None = None
    limit_test_batches: int | None = None
    latency_repeats: int = 200
    data_on_device: bool = False
    lr: float = 0.1


def resolve_budget(name: str, cpu: dict[str, Any] | None = None) -> tuple[Budget, str]:
    """The budget called ``name`` on this machine, and a sentence on how it was chosen."""
    cpu = cpu or cpu_description()
    if name == "smoke":
        return Budget("smoke", epochs=1, teacher_epochs=1, batch_size=16, precision="32-true", val_size=0,
                      limit_train_batches=3, limit_test_batches=2, latency_repeats=5), "a few batches, numbers meaningless"
    if name == "cpu":
        if cpu["bf16"]:
            return Budget("cpu", epochs=10, teacher_epochs=10), "bf16 autocast: the CPU has native bf16"
        return (Budget("cpu", epochs=5, teacher_epochs=5, precision="32-true"),
                "fp32 at 5 epochs: no native bf16 on this CPU (autocast would emulate it, slower than fp32)")
    if name == "gpu":
        # sized for ~6 minutes of H200 time for the whole table with device.sh's ordering (estimated,
        # not yet measured: ~1.5 s per ResNet-20 epoch at batch 512 incl. Lightning's per-step work,
        # ~8 s per row of fixed cost: CPU test, ONNX export, latency)
        return (Budget("gpu", epochs=15, teacher_epochs=15, batch_size=512, accelerator="gpu", lr=0.2,
                       data_on_device=True, latency_repeats=300), "one CUDA GPU, data on the device")
    raise ValueError(f"budget must be one of smoke, cpu, gpu, got {name!r}")


# --------------------------------------------------------------------------------------- rows
@dataclass
class Plan:
    """What a row trains: the network, its callbacks, data options, and how it deploys.

    Attributes:
        model: Zoo name of the trained network.
        callbacks: Compression callbacks for the Trainer.
        data: Extra ``CIFARDataModule`` arguments (e.g. ``with_indices`` for the logit cache).
        qat: The row's ``QuantizationAwareTraining`` callback (it is converted to int8 by the suite).
        precision: Overrides the budget's training precision (with the reason in ``notes``).
        notes: Said in the table.
    """

    model: str = "resnet20"
    callbacks: list[Any] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    qat: Any = None
    precision: str | None = None
    notes: list[str] = field(default_factory=list)


class Skip(Exception):
    """A row that cannot run with this code version; the message is recorded as the reason."""


@dataclass
class Context:
    """What a row function can use: the budget, total optimizer steps, and the teacher checkpoint."""

    budget: Budget
    steps: int
    teacher_path: Callable[[], str]

    def every(self, updates: int) -> int:
        """Optimizer steps between updates so that a schedule acts about ``updates`` times in the run."""
        return max(1, self.steps // updates)


def _gmp(sparsity: float) -> Callable[[Context], Plan]:
    def row(ctx: Context) -> Plan:
        return Plan(callbacks=[_lc().MagnitudePruning(final_sparsity=sparsity, start=0.05, end=0.6,
                                                      update_every=ctx.every(40))])
    row.__doc__ = f"Gradual magnitude pruning (cubic, global, unstructured) to {sparsity:.0%} between 5 % and 60 %."
    return row


def nm24(ctx: Context) -> Plan:
    """2:4 semi-structured magnitude pruning, reached gradually between 5 % and 60 % of the run."""
    return Plan(callbacks=[_lc().MagnitudePruning(pattern="2:4", start=0.05, end=0.6, update_every=ctx.every(40))])


def _channel(ctx: Context, end: float = 0.5) -> Any:
    return _lc().ChannelPruning(kept_macs_ratio=0.5, round_to=8, start=0.0, end=end, update_every=ctx.every(20))


def channel50(ctx: Context) -> Plan:
    """Channel pruning to half the MACs (L1, widths multiples of 8), about 10 removals until 50 % of the run."""
    return Plan(callbacks=[_channel(ctx)])


def _qat(start: float = 0.75) -> Any:
    return _lc().QuantizationAwareTraining(start=start, freeze_bn=start + 0.6 * (1 - start),
                                           freeze_observers=start + 0.8 * (1 - start), convert_on_fit_end=False)


def qat(ctx: Context) -> Plan:
    """QAT as fine-tuning: fp32 for 75 % of the run, then fake-quantized; int8 accuracy of the converted net."""
    callback = _qat()
    return Plan(callbacks=[callback], qat=callback)


def teacher(ctx: Context) -> Plan:
    """The dense ResNet-56 teacher of the KD rows (trained here at the block's teacher budget)."""
    return Plan(model="resnet56")


def _kd(ctx: Context, alpha: float = 0.9, cache: bool = False) -> Any:
    return _lc().KnowledgeDistillation(teacher=ctx.teacher_path(), temperature=4.0, alpha=alpha, cache_logits=cache)


def kd(ctx: Context) -> Plan:
    """Distillation from the ResNet-56 teacher, T=4, alpha=0.9 (the shipped recipe's setting)."""
    return Plan(callbacks=[_kd(ctx)])


def kd_alpha05(ctx: Context) -> Plan:
    """Distillation as ``kd`` with alpha=0.5: is 0.9 too much teacher for a short run?"""
    return Plan(callbacks=[_kd(ctx, alpha=0.5)])


def kd_cached(ctx: Context) -> Plan:
    """Distillation with the teacher-logit cache (needs deterministic inputs: no augmentation)."""
    return Plan(callbacks=[_kd(ctx, cache=True)], data={"with_indices": True, "augment": False},
                notes=["no augmentation (the logit cache needs deterministic inputs)"])


def lowrank(ctx: Context) -> Plan:
    """Low-rank factorization to half the MACs at 30 % of the run (``LowRankFactorization``)."""
    import inspect

    try:
        from lightning_compress import LowRankFactorization
    except ImportError:
        try:
            from lightning_compress.factorization import LowRankFactorization
        except ImportError as err:
            raise Skip(f"not available in this code version (LowRankFactorization: {err})") from err
    wanted = {"kept_macs_ratio": 0.5, "method": "tucker2", "round_to": 8, "start": 0.3}
    accepted = inspect.signature(LowRankFactorization).parameters
    return Plan(callbacks=[LowRankFactorization(**{k: v for k, v in wanted.items() if k in accepted})],
                notes=[f"arguments {sorted(k for k in wanted if k in accepted)}"])


def pipeline(ctx: Context) -> Plan:
    """Channel pruning to half the MACs (until 40 %) + magnitude pruning to 50 % (45-70 %) + KD + QAT (75 %)."""
    callback = _qat()
    return Plan(callbacks=[_channel(ctx, end=0.4),
                           _lc().MagnitudePruning(final_sparsity=0.5, start=0.45, end=0.7, update_every=ctx.every(40)),
                           _kd(ctx), callback], qat=callback)


def dense(ctx: Context) -> Plan:
    """The dense ResNet-20: the reference of every row."""
    return Plan()


ROWS: dict[str, tuple[Callable[[Context], Plan], tuple[str, ...]]] = {
    "dense": (dense, ()),
    "gmp50": (_gmp(0.5), ("pruning",)),
    "gmp90": (_gmp(0.9), ("pruning",)),
    "nm24": (nm24, ("pruning",)),
    "teacher": (teacher, ()),
    "kd": (kd, ("distillation",)),
    "kd_alpha05": (kd_alpha05, ("distillation",)),
    "kd_cached": (kd_cached, ("distillation",)),
    "channel50": (channel50, ("pruning",)),
    "qat": (qat, ("quantization", "export.py")),
    "lowrank": (lowrank, ("factorization",)),
    "pipeline": (pipeline, ("pruning", "distillation", "quantization", "export.py")),
}
"""Row name -> (plan function, package sources beyond :data:`BASE_SOURCES` its result depends on)."""
ROW_VERSION = 1
"""Bump when the suite's own way of training or measuring a row changes (invalidates recorded rows)."""


def _lc() -> Any:
    import lightning_compress

    return lightning_compress


def code_version(sources: tuple[str, ...]) -> str:
    """Short hash of the package files a row depends on (every ``.py`` under each source path)."""
    digest = hashlib.sha256()
    for source in (*BASE_SOURCES, *sources):
        path = PACKAGE / source
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
        for file in files:
            digest.update(str(file.relative_to(PACKAGE)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


