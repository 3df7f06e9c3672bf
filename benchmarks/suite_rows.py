"""The suite's budgets and rows: each row a function building its callbacks from the public API.

A row function takes a :class:`Context` (the budget, the run's optimizer steps, the teacher checkpoint)
and returns a :class:`Plan`; it raises :class:`Skip` when this code version lacks what it needs. Each row
(:class:`Row`) also names the package sources its result depends on; those files and every package module they
import (followed through imports, the package's root ``__init__`` re-exports left out) are hashed into its code
version (``code_version``), so a recorded row is re-measured when, and only when, that code changes; the rows it
needs first (the KD rows need the teacher); and its training cost, for the queue's time estimate.
"""

from __future__ import annotations

import ast
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reporting import cpu_description

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_compress"
BASE_SOURCES = ("module.py", "data", "models")
"""Package sources every row's result depends on (relative to ``lightning_compress/``); what they import from
``core`` follows."""
RECIPE = REPO / "recipes" / "baseline_resnet20.yaml"
"""The shipped recipe whose optimizer settings every row trains with (all ResNet recipes share them)."""
OPTIMIZER_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "lr_schedule", "warmup")


@dataclass(frozen=True)
class Budget:
    """How much training one row gets; every row of a block shares it.

    Attributes:
        name: One of :data:`BUDGETS`.
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
        lr: Peak learning rate (scaled with the batch size; the recipe's 0.1 at batch 128).
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


BUDGETS = ("smoke", "cpu", "cpu30", "gpu")
NO_BF16 = "no native bf16 on this CPU (autocast would emulate it, slower than fp32)"


def resolve_budget(name: str, cpu: dict[str, Any] | None = None) -> tuple[Budget, str]:
    """The budget called ``name`` on this machine, and a sentence on how it was chosen.

    Example:
        >>> budget, reason = resolve_budget("cpu30", {"model": "x", "flags": ["avx2"], "bf16": False})
        >>> budget.epochs, budget.teacher_epochs, budget.batch_size, budget.precision
        (30, 30, 128, '32-true')
    """
    cpu = cpu or cpu_description()
    if name == "smoke":
        return Budget("smoke", epochs=1, teacher_epochs=1, batch_size=16, precision="32-true", val_size=4,
                      limit_train_batches=3, limit_test_batches=2, latency_repeats=5), "a few batches, numbers meaningless"
    if name == "cpu":
        if cpu["bf16"]:
            return Budget("cpu", epochs=10, teacher_epochs=10), "bf16 autocast: the CPU has native bf16"
        return Budget("cpu", epochs=5, teacher_epochs=5, precision="32-true"), f"fp32 at 5 epochs: {NO_BF16}"
    if name == "cpu30":  # issue 25: close enough to converged that differences between rows mean something
        if cpu["bf16"]:
            return Budget("cpu30", epochs=30, teacher_epochs=30), "bf16 autocast: the CPU has native bf16"
        return Budget("cpu30", epochs=30, teacher_epochs=30, precision="32-true"), f"fp32: {NO_BF16}"
    if name == "gpu":
        # device.sh's 8-minute deadline fits about nine rows in its ordering on an H200 (each row's wall
        # time is in suite_gpu.jsonl)
        return (Budget("gpu", epochs=15, teacher_epochs=15, batch_size=512, accelerator="gpu", lr=0.2,
                       data_on_device=True, latency_repeats=300), "one CUDA GPU, data on the device")
    raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {name!r}")


def train_steps(budget: Budget, epochs: int) -> int:
    """Optimizer steps of a run of ``epochs`` at ``budget`` (the last, partial batch of an epoch included)."""
    per_epoch = math.ceil((50000 - budget.val_size) / budget.batch_size)
    if budget.limit_train_batches is not None:
        per_epoch = min(per_epoch, budget.limit_train_batches)
    return per_epoch * epochs


def recipe_optimizer(recipe: Path = RECIPE) -> dict[str, Any]:
    """The optimizer settings of a shipped recipe (its ``model:`` section): what every row trains with."""
    import yaml

    model = yaml.safe_load(recipe.read_text())["model"]
    return {key: model[key] for key in OPTIMIZER_KEYS}


def optimizer_settings(budget: Budget) -> dict[str, Any]:
    """``ImageClassifier`` optimizer arguments of a row at ``budget``: the recipe's, at the budget's peak lr."""
    return {**recipe_optimizer(), "lr": budget.lr}


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


def _gmp(sparsity: float, end: float = 0.6) -> Callable[[Context], Plan]:
    def row(ctx: Context) -> Plan:
        return Plan(callbacks=[_lc().MagnitudePruning(final_sparsity=sparsity, start=0.05, end=end,
                                                      update_every=ctx.every(40))])
    row.__doc__ = (f"Gradual magnitude pruning (cubic, global, unstructured) to {sparsity:.0%} between 5 % and "
                   f"{end:.0%} of the run.")
    return row


def gmp90_kd(ctx: Context) -> Plan:
    """GMP 90 % as ``gmp90``, recovering with distillation from the ResNet-56 teacher (T=4, alpha=0.5)."""
    return Plan(callbacks=[*_gmp(0.9)(ctx).callbacks, _kd(ctx, alpha=0.5)])


def nm24(ctx: Context) -> Plan:
    """2:4 semi-structured magnitude pruning, reached gradually between 5 % and 60 % of the run."""
    return Plan(callbacks=[_lc().MagnitudePruning(pattern="2:4", start=0.05, end=0.6, update_every=ctx.every(40))])


def _channel(ctx: Context, end: float = 0.5, macs: float = 0.5) -> Any:
    return _lc().ChannelPruning(kept_macs_ratio=macs, round_to=8, start=0.0, end=end, update_every=ctx.every(20))


def channel50(ctx: Context) -> Plan:
    """Channel pruning to half the MACs (L1, widths multiples of 8), about 10 removals until 50 % of the run."""
    return Plan(callbacks=[_channel(ctx)])


def channel50_kd(ctx: Context) -> Plan:
    """Channel pruning as ``channel50`` with distillation from the ResNet-56 teacher (T=4, alpha=0.5).

    The fix tried for its 1.0-point target, as ``gmp90_kd`` for GMP 90 %.
    """
    return Plan(callbacks=[_channel(ctx), _kd(ctx, alpha=0.5)])


def channel50_planned(ctx: Context) -> Plan:
    """Channel pruning to half the MACs with per-group widths planned by sensitivity (CompressToTarget, macs_ratio
    0.5, multiples of 8) instead of one uniform fraction, which overshoots to 0.45 with widths rounded to 8."""
    return Plan(callbacks=[_lc().CompressToTarget(macs_ratio=0.5, round_to=8, start=0.05, end=0.5,
                                                  update_every=ctx.every(20))])


def _target(ratio: float, model: str = "resnet20", allocation: str = "sensitivity",
            int8: bool = False, factorize: bool = False, engine: str = "onnxruntime") -> Callable[[Context], Plan]:
    def row(ctx: Context) -> Plan:
        target = _lc().CompressToTarget(
            latency_ratio=ratio, runtime="onnxruntime", batch_size=64, threads=1, round_to=8, start=0.05, end=0.5,
            update_every=ctx.every(20), allocation=allocation, factorize=factorize, sensitivity_batches=1)
        qat = _qat(engine=engine) if int8 else None
        return Plan(model=model, callbacks=[target, *([qat] if qat else [])], qat=qat)
    how = ("one kept fraction for every group (the largest that measures within the target): the uniform baseline"
           if allocation == "uniform" else "widths by sensitivity around the uniform ones"
           + (" and Tucker-2 ranks where they pay (factorized at 50 %)" if factorize else ""))
    shipped = (f"the int8 QDQ file (QAT, engine {engine}, from 75 % of the run) against the fp32 dense network"
               if int8 else "fp32")
    row.__doc__ = (f"CompressToTarget on {model}: {ratio:.2g}x the dense latency on onnxruntime ({shipped}, batch "
                   f"64, 1 thread), {how}; planned at 5 % of the run on one validation batch (256 of the 5,000 "
                   "held-out training images; the suite does not validate, the planner reads the loader), channels "
                   "removed toward the plan until 50 % (issue 24).")
    return row


def ranks_at_latency(ratio: float, model: str = "resnet20", method: str = "tucker2", round_to: int = 8,
                     rounds: int = 5) -> tuple[dict[str, int], dict[str, float]]:
    """Ranks for ``LowRankFactorization`` whose network measures within ``ratio`` x the dense latency on
    onnxruntime (fp32, batch 64, 1 thread), as ``CompressToTarget``'s rows are planned: one fraction of every
    factorized layer's full rank (multiples of ``round_to``), the largest whose factorized network measures within
    the target beside the dense one (interleaved rounds). Latency depends on the ranks only, so the network's
    random initial weights time as the trained ones will.

    Returns:
        ``({layer name relative to the network: rank}, {"fraction", "measured_ratio", "macs_ratio", "dense_ms",
        "factorized_ms"})``.

    Raises:
        Skip: If no fraction measures within the target (the reason names the closest measured).
    """
    import torch

    from lightning_compress.core.accounting import count_macs
    from lightning_compress.core.layers import select_layers
    from lightning_compress.core.onnx import onnx_bytes
    from lightning_compress.factorization.blocks import (
        FACTORIZABLE_TYPES,
        is_factorizable,
        layer_method,
        max_rank,
    )
    from lightning_compress.factorization.callback import replay_factorization
    from lightning_compress.models import create_model
    from lightning_compress.planning.latency import timed_programs

    network = create_model(model, num_classes=10).eval()
    methods = {name: layer_method(network.get_submodule(name), method)  # the callback's default layers
               for name in select_layers(network, layer_types=FACTORIZABLE_TYPES)
               if is_factorizable(network.get_submodule(name))}
    full = {name: max_rank(network.get_submodule(name), kind) for name, kind in methods.items()}
    example, batch = torch.zeros(1, 3, 32, 32), torch.zeros(64, 3, 32, 32)
    dense_macs = count_macs(network, example)
    dense_program = onnx_bytes(network, batch)
    closest: dict[str, float] = {}
    seen: list[dict[str, int]] = []
    for step in range(19, 0, -1):
        fraction = step / 20
        ranks = {name: min(limit, max(round_to, round(fraction * limit / round_to) * round_to))
                 for name, limit in full.items()}
        if ranks in seen:  # a smaller fraction that rounds to the same ranks: the same network
            continue
        seen.append(ranks)
        candidate = replay_factorization(create_model(model, num_classes=10).eval(), {"layers": [
            {"name": name, "method": methods[name], "rank": rank} for name, rank in ranks.items()]})
        macs_ratio = count_macs(candidate, example) / dense_macs
        if macs_ratio > ratio:  # no faster than its MACs: not worth timing
            continue
        measured = timed_programs({"dense": dense_program, "factorized": onnx_bytes(candidate, batch)}, "onnxruntime",
                                  1, batch.numpy(), repeats=20, rounds=rounds)
        tuned = {"fraction": fraction, "measured_ratio": measured["factorized"] / measured["dense"],
                 "macs_ratio": macs_ratio, "dense_ms": measured["dense"], "factorized_ms": measured["factorized"]}
        if tuned["measured_ratio"] <= ratio:
            return ranks, tuned
        closest = min(closest, tuned, key=lambda t: t.get("measured_ratio", math.inf))
    raise Skip(f"no uniform rank fraction of {model} measures within {ratio:.3g}x the dense latency; closest: "
               + (f"{closest['fraction']:.2f} of full rank ({closest['macs_ratio']:.3f} of the MACs) measured "
                  f"{closest['measured_ratio']:.3f}x ({closest['factorized_ms']:.1f} vs {closest['dense_ms']:.1f} ms)"
                  if closest else "none timed"))


def _lowrank_at_latency(ratio: float, model: str = "resnet20") -> Callable[[Context], Plan]:
    def row(ctx: Context) -> Plan:
        ranks, tuned = ranks_at_latency(ratio, model)
        callback = _lc().LowRankFactorization(ranks={f"*.{name}": rank for name, rank in ranks.items()},
                                              method="tucker2", start=0.3)
        note = (f"ranks tuned to {ratio:.2g}x the dense latency (onnxruntime fp32, batch 64, 1 thread): "
                f"{tuned['fraction']:.2f} of each layer's full rank, measured {tuned['measured_ratio']:.3f}x beside the "
                f"dense network, {tuned['macs_ratio']:.3f} of the MACs")
        return Plan(model=model, callbacks=[callback], notes=[note])
    row.__doc__ = (f"LowRankFactorization on {model} (Tucker-2 at 30 % of the run) with ranks tuned to {ratio:.2g}x "
                   "the dense latency on onnxruntime (fp32, batch 64, 1 thread): the factorization baseline beside "
                   "the CompressToTarget rows (issue 24).")
    return row


def mobilenetv2_dense(ctx: Context) -> Plan:
    """The dense MobileNetV2 (CIFAR variant): the reference of its CompressToTarget rows."""
    return Plan(model="mobilenetv2")


def _qat(start: float = 0.75, engine: str = "x86") -> Any:
    # engine x86, as every recorded QAT row: suite_measure sizes torch's int8 TorchScript beside the shipped file;
    # CompressToTarget's int8 rows train for the file onnxruntime runs
    return _lc().QuantizationAwareTraining(start=start, freeze_bn=start + 0.6 * (1 - start),
                                           freeze_observers=start + 0.8 * (1 - start), convert_on_fit_end=False,
                                           engine=engine)


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
    """Channel pruning to half the MACs (until 40 %) + magnitude pruning to 50 % (45-70 %) + KD (alpha=0.5, the
    setting the KD rows chose) + QAT (75 %)."""
    callback = _qat()
    return Plan(callbacks=[_channel(ctx, end=0.4),
                           _lc().MagnitudePruning(final_sparsity=0.5, start=0.45, end=0.7, update_every=ctx.every(40)),
                           _kd(ctx, alpha=0.5), callback], qat=callback)


def pipeline_quarter(ctx: Context) -> Plan:
    """The pipeline with channel pruning to a quarter of the MACs (until 40 %) + GMP 50 % + KD (alpha=0.5) + QAT:
    the fix tried for the pipeline's size and speed target, which half the MACs missed (2.0x faster, 4.8x smaller)."""
    callback = _qat()
    return Plan(callbacks=[_channel(ctx, end=0.4, macs=0.25),
                           _lc().MagnitudePruning(final_sparsity=0.5, start=0.45, end=0.7, update_every=ctx.every(40)),
                           _kd(ctx, alpha=0.5), callback], qat=callback)


def dense(ctx: Context) -> Plan:
    """The dense ResNet-20: the reference of every row."""
    return Plan()


TARGET_MODELS = {"resnet56": ("teacher", 3.0), "mobilenetv2": ("mobilenetv2_dense", 9.5)}
"""Issue 24's networks beside ResNet-20: their dense reference row and training cost relative to ResNet-20 (ResNet-56:
the teacher's; MobileNetV2: its dense cpu30 epochs, bf16 autocast, one thread beside another MobileNetV2 row on the
AVX-512 EPYC: 600-730 s)."""
INT8_TARGET_ENGINES = {"": "onnxruntime", "_7bit": "onnxruntime_7bit"}
"""The int8 third-of-latency rows' engines, by their name's part: 7-bit weights for x86 CPUs without VNNI (ResNet-56
at batch 64 on an AVX2-only EPYC: 1/3 reachable with them, not with 8-bit weights, latency_model_7bit_avx2.md)."""
TARGET_FRACTIONS = {50: (0.5, "half"), 33: (1 / 3, "a third of")}
"""Issue 24's latency targets, by the percent in a row's name: the fraction of the dense latency, in words."""


@dataclass(frozen=True)
class Row:
    """One row of the table.

    Attributes:
        plan: Builds what the row trains.
        sources: Package sources beyond :data:`BASE_SOURCES` its result depends on.
        needs: Rows that must have landed before it starts (the KD rows read the teacher's checkpoint).
        cost: Training time per epoch relative to the dense ResNet-20, for the queue's estimate: the teacher
            2.8-3x, online KD 1.9x (the frozen ResNet-56's forward pass; ``RESULTS.md``, how the CPU budget
            was chosen), QAT's fake-quantized last quarter about 2x, channel pruning's slimmed second half
            cheaper; the others guessed from their MACs.
    """

    plan: Callable[[Context], Plan]
    sources: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    cost: float = 1.0


ROWS: dict[str, Row] = {
    "dense": Row(dense),
    "gmp50": Row(_gmp(0.5), ("pruning",), cost=1.05),
    "gmp90": Row(_gmp(0.9), ("pruning",), cost=1.05),
    "gmp90_early": Row(_gmp(0.9, end=0.4), ("pruning",), cost=1.05),
    "gmp90_kd": Row(gmp90_kd, ("pruning", "distillation"), needs=("teacher",), cost=1.9),
    "nm24": Row(nm24, ("pruning",), cost=1.05),
    "teacher": Row(teacher, cost=3.0),
    "kd": Row(kd, ("distillation",), needs=("teacher",), cost=1.9),
    "kd_alpha05": Row(kd_alpha05, ("distillation",), needs=("teacher",), cost=1.9),
    "kd_cached": Row(kd_cached, ("distillation",), needs=("teacher",), cost=1.05),
    "channel50": Row(channel50, ("pruning",), cost=0.8),
    "channel50_kd": Row(channel50_kd, ("pruning", "distillation"), needs=("teacher",), cost=1.65),
    "qat": Row(qat, ("quantization", "export"), cost=1.25),
    "lowrank": Row(lowrank, ("factorization",), cost=1.1),
    "pipeline": Row(pipeline, ("pruning", "distillation", "quantization", "export"), needs=("teacher",), cost=1.9),
    "pipeline_quarter": Row(pipeline_quarter, ("pruning", "distillation", "quantization", "export"),
                            needs=("teacher",), cost=1.7),
    "channel50_planned": Row(channel50_planned, ("pruning", "planning"), cost=0.8),
    "target50": Row(_target(0.5), ("pruning", "planning"), cost=0.8),
    "target50_uniform": Row(_target(0.5, allocation="uniform"), ("pruning", "planning"), cost=0.8),
    "target50_factorized": Row(_target(0.5, factorize=True), ("pruning", "planning", "factorization"), cost=0.8),
    "target50_lowrank": Row(_lowrank_at_latency(0.5), ("factorization", "planning/latency.py"), cost=1.1),
    # issue 24's networks at 1/2 and 1/3 of the dense latency (ResNet-56's dense reference is the teacher row)
    "mobilenetv2_dense": Row(mobilenetv2_dense, cost=TARGET_MODELS["mobilenetv2"][1]),
    **{f"{model}_target{percent}{suffix}": Row(_target(ratio, model, allocation), ("pruning", "planning"),
                                               cost=cost * (0.8 if ratio == 0.5 else 0.7))
       for model, (_, cost) in TARGET_MODELS.items() for percent, (ratio, _) in TARGET_FRACTIONS.items()
       for suffix, allocation in (("", "sensitivity"), ("_uniform", "uniform"))},
    **{f"{model}_target{percent}_lowrank": Row(_lowrank_at_latency(ratio, model), ("factorization", "planning/latency.py"),
                                               cost=cost * 1.1)
       for model, (_, cost) in TARGET_MODELS.items() for percent, (ratio, _) in TARGET_FRACTIONS.items()},
    # 1/3 with int8, where fp32 channel removal cannot reach it (ResNet-56: closest 0.35x)
    **{f"{model}_target33_int8{bits}{suffix}": Row(_target(1 / 3, model, allocation, int8=True, engine=engine),
                                                   ("pruning", "planning", "quantization", "export"), cost=cost * 0.8)
       for bits, engine in INT8_TARGET_ENGINES.items() for model, (_, cost) in TARGET_MODELS.items()
       for suffix, allocation in (("", "sensitivity"), ("_uniform", "uniform"))},
}
"""Every row, in table order."""
BLOCK_ROWS: dict[str, tuple[str, ...]] = {
    # issue 25's list as it exists today, the most informative first; KD at alpha=0.5, the setting the
    # 4-epoch block's evidence chose (RESULTS.md); the GMP 90 % fixes (distillation, an earlier schedule end)
    # beside it; kd (0.9) and kd_cached run with --only
    "cpu30": ("teacher", "dense", "qat", "gmp90", "kd_alpha05", "gmp90_kd", "lowrank", "channel50", "channel50_kd", "gmp90_early",
              "gmp50", "nm24", "pipeline", "channel50_planned", "target50", "target50_uniform", "pipeline_quarter"),
}
"""Rows a budget runs when ``--only`` is not given, in queue order; a budget not named here runs every row."""
TARGET_ROWS: dict[str, tuple[str, str, str]] = {
    "target50": ("target50_uniform", "dense", "half"),
    "target50_factorized": ("target50_uniform", "dense", "half"),
    **{f"{model}_target{percent}": (f"{model}_target{percent}_uniform", dense, words)
       for model, (dense, _) in TARGET_MODELS.items() for percent, (_, words) in TARGET_FRACTIONS.items()},
    **{f"{model}_target33_int8{bits}": (f"{model}_target33_int8{bits}_uniform", dense, "a third of")
       for model, (dense, _) in TARGET_MODELS.items() for bits in INT8_TARGET_ENGINES},
}
"""CompressToTarget rows read in the targets: planned row -> (its uniform baseline, its dense network's row, the
target in words)."""
PLANNING_COST = ("setup_seconds", "sensitivity_seconds", "sensitivity_images")
"""The plan's details a CompressToTarget row records as what planning cost: seconds of set-up (latency table and
calibration) and of sensitivity, and the held-out images it was measured on."""
ROW_VERSION = 2
"""Bump when the suite's own way of training or measuring a row changes (invalidates recorded rows).
2: the recipe's optimizer settings in the config; every row measures its deployed file's own top-1."""


def describe(row: str) -> str:
    """What ``row`` runs, in one line (its plan's docstring); a row no longer defined, by its name.

    Example:
        >>> describe("dense")
        'The dense ResNet-20: the reference of every row'
    """
    doc = (ROWS[row].plan.__doc__ or "").strip() if row in ROWS else ""
    return doc.split("\n")[0].rstrip(".") if doc else row


def budget_rows(name: str) -> tuple[str, ...]:
    """The rows the budget ``name`` runs by default (:data:`BLOCK_ROWS`, else every row)."""
    return BLOCK_ROWS.get(name, tuple(ROWS))


def _lc() -> Any:
    import lightning_compress

    return lightning_compress


def code_version(sources: tuple[str, ...]) -> str:
    """Short hash of the package files a row depends on: every ``.py`` under :data:`BASE_SOURCES` and each of
    ``sources``, and every package module those import (:func:`source_closure`)."""
    digest = hashlib.sha256()
    for file in source_closure((*BASE_SOURCES, *sources)):
        digest.update(str(file.relative_to(PACKAGE)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def source_closure(sources: tuple[str, ...]) -> list[Path]:
    """The files under ``sources`` (relative to the package) and the package modules they import, transitively.

    Imports are read from the source (``import lightning_compress.x`` and ``from lightning_compress.x import y``,
    inside functions too), each with its packages' ``__init__`` files; the package root's ``__init__``, which only
    re-exports, is left out.
    """
    pending: list[Path] = []
    for source in sources:
        path = PACKAGE / source
        pending += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    seen: set[Path] = set()
    while pending:
        file = pending.pop()
        if file in seen:
            continue
        seen.add(file)
        pending += [found for name in _imported_names(file) for found in _module_files(name) if found not in seen]
    return sorted(seen)


def _imported_names(file: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return [name for name in names if name.split(".")[0] == PACKAGE.name and "." in name]


def _module_files(name: str) -> list[Path]:
    """The file of the module ``name`` (if it is one) and the ``__init__`` of each package above it but the root."""
    parts = name.split(".")[1:]
    files = [PACKAGE.joinpath(*parts[:depth], "__init__.py") for depth in range(1, len(parts) + 1)]
    files.append(PACKAGE.joinpath(*parts).with_suffix(".py"))
    return [file for file in files if file.is_file()]
