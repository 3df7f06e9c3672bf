"""Per-step cost of each compression callback vs no callback vs Lightning's ModelPruning; set-up time; mask updates.

Part 1 -- step time. ``ImageClassifier("resnet20")`` is trained by a real ``Trainer`` on synthetic
CIFAR-shaped batches (``--batch-size``, 128 by default; CPU) in these configurations, interleaved
round by round in one process so that machine load hits them alike:

* ``none``: no compression callback;
* ``magnitude``: ``MagnitudePruning(final_sparsity=0.9, scope="global", update_every="1ep")``, the same
  update frequency as ModelPruning's (once per epoch);
* ``model_pruning``: Lightning's ``ModelPruning("l1_unstructured", amount=0.9,
  use_global_unstructured=True)`` on the same layers;
* ``qat``: ``QuantizationAwareTraining(engine="x86")`` (fake-quantized from step 0: the cost of training in int8);
* ``kd_self``: ``KnowledgeDistillation(teacher="self")`` (one teacher forward per step);
* ``report``: ``CompressionReport(latency_batch_sizes=())`` (its per-step hooks; the report itself is
  written after fit).

ChannelPruning and LowRankFactorization are left out: outside their window they do nothing per step, and
the network they leave is smaller, so a step-time ratio would measure the smaller network, not the callback.
Set-up (wall time from ``setup`` to the end of the first training step: selection, tracing, the
composition check, QAT preparation, a self teacher's copy, and that step) is measured per run and
reported separately, also as the difference to ``none``.

Each run has two epochs of ``--steps`` batches. Epoch 0 is warm-up: ``MagnitudePruning`` prunes
during it (window ``[0, 1ep]``, so its masks are at 90 % and enforced in epoch 1) and
``ModelPruning`` prunes at its end (its forward pre-hooks are active in epoch 1). The time between
consecutive ``on_train_batch_end`` calls of epoch 1 is recorded (the whole loop iteration: data,
forward, backward, optimizer, every callback hook), skipping the epoch boundary, as CPU time of the
single-threaded step (immune to other processes on the machine). The order of the configurations
rotates each round. Reported: median and mean per round; ratios are taken per round and the median
ratio is reported. Because step times vary by more than the overhead being measured, the time
spent inside ``MagnitudePruning``'s per-step hooks is also measured directly, in the loop.

In a ``torch.profiler`` comparison of the three configurations, their step-time differences of a
few percent sat in the model's own ops (ReLU, residual add, convolution), not in the callbacks.
Those ops' cost depends on where glibc's allocator places the activation buffers: blocks above its
mmap threshold are returned to the OS and page-faulted in again at every step, and which blocks
cross it shifts with any extra tensor a configuration allocates. ``--reuse-memory`` raises glibc's mmap and trim thresholds (``mallopt``;
what jemalloc/tcmalloc do by design) so that every configuration reuses the same warm heap; the
results file records which allocator behaviour was measured.

Part 2 -- mask-update time: one global mask computation (``global_magnitude_masks`` at 90 % over the
default-selected layers) on ResNet-20 and ResNet-56, median of ``--repeats`` calls, plus the per-step
cost of enforcing the masks (weights after the step and gradients before it).

Run:
    python benchmarks/pruning_overhead.py                 # full: 120 steps/epoch x 3 rounds
    python benchmarks/pruning_overhead.py --quick         # 6 steps/epoch x 3 rounds (shared CPUs)
    python benchmarks/pruning_overhead.py --steps 40 --reuse-memory --name pruning_overhead_reuse_memory
Writes ``benchmarks/results/pruning_overhead.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionReport, KnowledgeDistillation, QuantizationAwareTraining
from lightning_compress.core.layers import select_layers
from lightning_compress.models import create_model
from lightning_compress.module import ImageClassifier
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.pruning.masks import global_magnitude_masks
from reporting import add_output_arguments, machine_info, write_results
from lightning_compress.commands.parser import CommandParser

CONFIGS = ("none", "magnitude", "model_pruning", "qat", "kd_self", "report")
LABELS = {
    "none": "no callback",
    "magnitude": "MagnitudePruning (global 90 %, update every epoch)",
    "model_pruning": "Lightning ModelPruning (global l1_unstructured 90 %, every epoch)",
    "qat": "QuantizationAwareTraining (x86, from step 0)",
    "kd_self": "KnowledgeDistillation(teacher=\"self\")",
    "report": "CompressionReport (per-step hooks)",
}


def reuse_heap_memory() -> None:
    """Keep freed activation buffers in glibc's heap instead of unmapping them (Linux/glibc only)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = (libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum: 8 MiB activations stay on the heap
          and libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_top_pad, 256 * 2**20))
    if not ok:
        raise RuntimeError("mallopt refused the settings")


class StepTimer(Callback):
    """CPU seconds of this thread between consecutive ``on_train_batch_end`` calls within epoch
    ``timed_epoch``. With one torch thread the whole CPU step (autograd's backward included) runs on
    the calling thread, so its CPU time is unaffected by other processes competing for the cores."""

    def __init__(self, timed_epoch: int = 1) -> None:
        self.timed_epoch = timed_epoch
        self.seconds: list[float] = []
        self._last: float | None = None
        self._setup_started: float | None = None
        self.setup_seconds: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._setup_started = time.perf_counter()  # listed first: before any other callback's set-up

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # never time across an epoch boundary

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.setup_seconds is None:  # one-time work: set-up, tracing, preparation in the first step
            self.setup_seconds = time.perf_counter() - self._setup_started
        now = time.thread_time()
        if trainer.current_epoch == self.timed_epoch and self._last is not None:
            self.seconds.append(now - self._last)
        self._last = now


class TimedMagnitudePruning(MagnitudePruning):
    """MagnitudePruning that records the time its per-step hooks take during epoch ``timed_epoch``."""

    def __init__(self, *args, timed_epoch: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timed_epoch = timed_epoch
        self.hook_seconds = 0.0
        self.timed_steps = 0

    def _timed(self, trainer: pl.Trainer, hook, *args) -> None:
        start = time.perf_counter()
        hook(trainer, *args)
        if trainer.current_epoch == self.timed_epoch:
            self.hook_seconds += time.perf_counter() - start

    def on_train_batch_start(self, trainer, *args) -> None:
        self._timed(trainer, super().on_train_batch_start, *args)

    def on_before_optimizer_step(self, trainer, *args) -> None:
        self._timed(trainer, super().on_before_optimizer_step, *args)

    def on_train_batch_end(self, trainer, *args) -> None:
        self._timed(trainer, super().on_train_batch_end, *args)
        self.timed_steps += trainer.current_epoch == self.timed_epoch


def compression_callbacks(config: str, module: ImageClassifier) -> list[Callback]:
    """The callback of one configuration (pruning on the default-selected layers)."""
    if config == "none":
        return []
    if config == "magnitude":
        return [TimedMagnitudePruning(final_sparsity=0.9, scope="global", update_every="1ep", start=0.0,
                                      end="1ep")]
    if config == "qat":
        return [QuantizationAwareTraining(convert_on_fit_end=False, engine="x86")]
    if config == "kd_self":
        return [KnowledgeDistillation(teacher="self", alpha=0.5)]
    if config == "report":
        return [CompressionReport(latency_batch_sizes=(), dirpath=tempfile.mkdtemp())]
    layers = select_layers(module)
    return [ModelPruning("l1_unstructured", amount=0.9, use_global_unstructured=True, verbose=0,
                         parameters_to_prune=[(module.get_submodule(name), "weight") for name in layers])]


def time_config(config: str, loader: DataLoader, steps: int) -> tuple[list[float], float | None, float]:
    """Per-step seconds of epoch 1 of a fresh two-epoch run, MagnitudePruning's hook ms per step, set-up seconds."""
    torch.manual_seed(0)
    module = ImageClassifier(model="resnet20", num_classes=10, lr=0.05)
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=steps,
                         callbacks=[timer, *compression_callbacks(config, module)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    timed = [cb for cb in trainer.callbacks if isinstance(cb, TimedMagnitudePruning)]
    hook_ms = 1000 * timed[0].hook_seconds / timed[0].timed_steps if timed else None
    return timer.seconds, hook_ms, timer.setup_seconds


def step_time(steps: int, rounds: int, batch_size: int) -> dict[str, object]:
    """Interleaved step and set-up times of the configurations."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * batch_size, 3, 32, 32, generator=g),
                         torch.randint(0, 10, (steps * batch_size,), generator=g))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    per_round: list[dict[str, dict[str, float]]] = []
    for round_index in range(rounds):
        row = {}
        shift = round_index % len(CONFIGS)
        for config in CONFIGS[shift:] + CONFIGS[:shift]:  # rotate who runs first
            seconds, hook_ms, setup_seconds = time_config(config, loader, steps)
            row[config] = {"median_ms": 1000 * statistics.median(seconds),
                           "mean_ms": 1000 * statistics.fmean(seconds), "steps": len(seconds),
                           "setup_s": setup_seconds}
            if hook_ms is not None:
                row[config]["callback_hooks_ms_per_step"] = hook_ms
        per_round.append(row)
        print(json.dumps({"round": round_index, **row}), flush=True)
    summary = {config: {"median_ms": round(statistics.median(r[config]["median_ms"] for r in per_round), 2),
                        "mean_ms": round(statistics.median(r[config]["mean_ms"] for r in per_round), 2),
                        "setup_s": round(statistics.median(r[config]["setup_s"] for r in per_round), 3),
                        "setup_extra_s": round(statistics.median(r[config]["setup_s"] - r["none"]["setup_s"]
                                                                 for r in per_round), 3)}
               for config in CONFIGS}
    ratios = {f"{config}_vs_none": round(statistics.median(r[config]["median_ms"] / r["none"]["median_ms"]
                                                           for r in per_round), 4)
              for config in CONFIGS if config != "none"}
    ratios["magnitude_vs_model_pruning"] = round(statistics.median(
        r["magnitude"]["median_ms"] / r["model_pruning"]["median_ms"] for r in per_round), 4)
    hooks = statistics.median(r["magnitude"]["callback_hooks_ms_per_step"] for r in per_round)
    summary["magnitude"]["callback_hooks_ms_per_step"] = round(hooks, 3)
    summary["magnitude"]["callback_hooks_share_of_none_step"] = round(hooks / summary["none"]["median_ms"], 5)
    return {"per_round": per_round, "summary": summary, "ratios_of_medians": ratios}


def mask_update_time(model_name: str, repeats: int) -> dict[str, object]:
    """Median time of one global 90 % mask computation and of one step's mask enforcement."""
    torch.manual_seed(0)
    network = create_model(model_name, num_classes=10)
    names = [f"{layer}.weight" for layer in select_layers(network)]
    weights = {name: network.get_parameter(name) for name in names}
    for w in weights.values():
        w.grad = torch.randn_like(w)

    def timed(fn) -> tuple[float, float]:
        """(median, min) milliseconds; the min is the least disturbed by other load on the machine."""
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return round(1000 * statistics.median(samples), 3), round(1000 * min(samples), 3)

    masks = global_magnitude_masks(weights, 0.9)
    factors = [masks[n].float() for n in names]
    params = list(weights.values())

    @torch.no_grad()
    def enforce() -> None:  # what MagnitudePruning does per optimizer step: weights and gradients
        torch._foreach_mul_(params, factors)
        torch._foreach_mul_([p.grad for p in params], factors)

    update_median, update_min = timed(lambda: global_magnitude_masks(weights, 0.9))
    enforce_median, enforce_min = timed(enforce)
    return {
        "model": model_name,
        "pruned_layers": len(names),
        "pruned_params": sum(w.numel() for w in params),
        "global_mask_update_ms": update_median,
        "global_mask_update_min_ms": update_min,
        "per_step_enforce_ms": enforce_median,
        "per_step_enforce_min_ms": enforce_min,
    }


def to_markdown(result: dict[str, object]) -> str:
    """Render the result as markdown with its settings and machine."""
    s, r = result["step_time"]["summary"], result["step_time"]["ratios_of_medians"]
    lines = [
        "# Pruning overhead",
        "",
        f"Machine: {result['machine']}",
        f"Settings: {result['settings']}",
        "",
        f"## Training step time, ResNet-20, batch {result['settings']['batch_size']}, CPU (interleaved; "
        "median over rounds)",
        "",
        "| configuration | median step (ms) | mean step (ms) | median ratio vs none | set-up (s) | set-up beyond "
        "none (s) |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {LABELS[c]} | {s[c]['median_ms']} | {s[c]['mean_ms']} | {r.get(f'{c}_vs_none', 1.0)} | "
          f"{s[c]['setup_s']} | {s[c]['setup_extra_s']} |" for c in CONFIGS),
        "",
        "Step time: the CPU time of the training thread between consecutive batches of epoch 1 (all "
        "pruning updates happen in epoch 0). Set-up: wall time from `setup` to the end of the first training "
        "step (selection, tracing, the composition check, QAT preparation, a self teacher's copy, and one step).",
        "",
        f"MagnitudePruning / ModelPruning (median of per-round ratios): {r['magnitude_vs_model_pruning']}",
        "",
        f"Time spent inside MagnitudePruning's per-step hooks (measured in the loop, epoch 1): "
        f"{s['magnitude']['callback_hooks_ms_per_step']} ms per step = "
        f"{s['magnitude']['callback_hooks_share_of_none_step']:.3%} of the no-callback step.",
        "",
        "## Mask update (global 90 %) and per-step enforcement, CPU",
        "",
        "| model | pruned layers | pruned params | global mask update, median (min) ms | "
        "per-step enforce, median (min) ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["mask_update"]:
        lines.append(f"| {row['model']} | {row['pruned_layers']} | {row['pruned_params']} | "
                     f"{row['global_mask_update_ms']} ({row['global_mask_update_min_ms']}) | "
                     f"{row['per_step_enforce_ms']} ({row['per_step_enforce_min_ms']}) |")
    r20 = next(row for row in result["mask_update"] if row["model"] == "resnet20")
    amortized = r20["global_mask_update_ms"] / 100
    lines += ["", f"Epoch 1 (timed) holds no mask update; one ResNet-20 update every 100 steps adds "
              f"{amortized:.3f} ms per step amortized ({amortized / s['none']['median_ms']:.3%} of a step)."]
    lines += ["", "Targets (issues 3 and 22): MagnitudePruning <= 1.03x no-callback per step and no slower than "
              "ModelPruning at the same update frequency; ResNet-56 global mask update <= 30 ms."]
    if result["settings"]["quick"]:
        lines += ["", f"**Quick mode** (few steps; load average {result['machine']['load_average_1_5_15']}): "
                  "step-time ratios carry noise larger than the overhead measured; they are not evidence either way."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = CommandParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="batches per epoch (epoch 1 is timed)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20, help="repeats of each mask-update timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 keeps timings stable on shared machines)")
    parser.add_argument("--quick", action="store_true", help="6 steps x 3 rounds, 10 repeats (shared CPUs)")
    parser.add_argument("--reuse-memory", action="store_true",
                        help="raise glibc's mmap/trim thresholds so activation buffers are reused (see above)")
    add_output_arguments(parser, "pruning_overhead")
    args = parser.parse_args()
    if args.reuse_memory:
        reuse_heap_memory()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.rounds, args.repeats = 6, 3, 10
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    result = {
        "machine": machine_info(),
        "settings": {"steps_per_epoch": args.steps, "rounds": args.rounds, "batch_size": args.batch_size,
                     "repeats": args.repeats, "quick": args.quick, "threads": args.threads,
                     "allocator": "glibc, mmap threshold 32 MiB, no trim (--reuse-memory)" if args.reuse_memory
                     else "glibc defaults",
                     "device": "cpu", "model": "resnet20",
                     "data": "synthetic CIFAR-shaped tensors"},
        "mask_update": [mask_update_time(name, args.repeats) for name in ("resnet20", "resnet56")],
    }
    print(json.dumps(result["mask_update"]), flush=True)
    result["step_time"] = step_time(args.steps, args.rounds, args.batch_size)
    print(json.dumps(result["step_time"]["ratios_of_medians"]), flush=True)
    write_results(args.name, result, to_markdown(result), directory=args.results_dir)


if __name__ == "__main__":
    main()
