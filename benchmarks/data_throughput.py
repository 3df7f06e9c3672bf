"""Images/s of ``CIFARDataModule``'s augmented training iterator vs iterating pre-made float tensors.

On the real CIFAR-10 archive (``../shared/data/cifar10-jpeg.tar.gz``, layout (c)) this measures:

* the one-time cost: extracting + decoding the archive into a cache (cold), and loading that cache
  in a later run (warm);
* ``datamodule``: the training iterator as Lightning runs it -- ``train_dataloader()`` (shuffled
  uint8 batches) followed by ``on_after_batch_transfer`` while training (random crop with 4-pixel
  padding, horizontal flip, normalization), all on the CPU;
* ``datamodule_loader_only``: the same loader without the transform;
* ``float_tensor_batches``: shuffled batches indexed out of a pre-made, already normalized float32
  tensor (no loader, no augmentation) -- what "data costs nothing" looks like;
* ``float_tensor_dataloader``: a plain ``DataLoader(TensorDataset(floats), shuffle=True)`` with its
  default per-sample collation, no augmentation -- the usual way to iterate pre-made tensors.

The four iterators are measured in interleaved rounds in one process; medians are reported.

Run:
    python benchmarks/data_throughput.py --quick        # 2 rounds of 2 s each
    python benchmarks/data_throughput.py --seconds 10 --rounds 3
Writes ``benchmarks/results/data_throughput.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.data import CIFARDataModule
from reporting import SHARED_CIFAR10, add_output_arguments, machine_info, write_results
from lightning_compress.commands.parser import CommandParser

DEFAULT_ARCHIVE = SHARED_CIFAR10
TARGET_IMAGES_PER_S = 20_000


def images_per_second(epoch: Callable[[], Iterator[torch.Tensor]], seconds: float) -> float:
    """Iterate fresh epochs of ``epoch()`` for about ``seconds``; return images per second."""
    images, start = 0, time.perf_counter()
    while True:
        for batch in epoch():
            images += len(batch)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return images / elapsed


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default=DEFAULT_ARCHIVE, help="CIFAR-10 archive (layout c)")
    parser.add_argument("--cache-dir", default=None, help="reuse this cache (default: a fresh temporary one)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per iterator per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-images", type=int, default=10_000, help="images in the float tensor")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s (the budget this was run with)")
    add_output_arguments(parser, "data_throughput")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 2.0, 2
    load_before = os.getloadavg()

    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="lc-data-bench-"))
    was_cached = any((cache_dir / "decoded").glob("*.pt"))

    def datamodule() -> CIFARDataModule:
        dm = CIFARDataModule(
            args.archive, batch_size=args.batch_size, val_size=args.val_size, cache_dir=str(cache_dir),
            download=False,
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm

    try:
        first_setup_s = timed(datamodule)
        dm: CIFARDataModule | None = None

        def warm() -> None:
            nonlocal dm
            dm = datamodule()

        warm_setup_s = timed(warm)
        assert dm is not None
        # on_after_batch_transfer augments only while the trainer is training, as in Trainer.fit.
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        trainer.training = True
        dm.trainer = trainer

        train = dm.train_set.images
        measured_mean = [round(v, 4) for v in (train.float().mean((0, 2, 3)) / 255).tolist()]
        measured_std = [round(v, 4) for v in (train.float().std((0, 2, 3)) / 255).tolist()]
        floats = dm.transform(train[: args.baseline_images], train=False)
        float_labels = dm.train_set.labels[: args.baseline_images]

        def datamodule_epoch() -> Iterator[torch.Tensor]:
            for batch in dm.train_dataloader():
                yield dm.on_after_batch_transfer(batch, 0)[0]

        def loader_only_epoch() -> Iterator[torch.Tensor]:
            for images, _ in dm.train_dataloader():
                yield images

        def float_batches_epoch() -> Iterator[torch.Tensor]:
            order = torch.randperm(len(floats))
            for start in range(0, len(floats), args.batch_size):
                yield floats[order[start : start + args.batch_size]]

        float_set = TensorDataset(floats, float_labels)
        float_loader = DataLoader(float_set, batch_size=args.batch_size, shuffle=True)

        def float_dataloader_epoch() -> Iterator[torch.Tensor]:
            for images, _ in float_loader:
                yield images

        iterators = {
            "datamodule": datamodule_epoch,
            "datamodule_loader_only": loader_only_epoch,
            "float_tensor_batches": float_batches_epoch,
            "float_tensor_dataloader": float_dataloader_epoch,
        }
        rates: dict[str, list[float]] = {f"{name}@{t}t": [] for t in args.threads for name in iterators}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for _ in range(args.rounds):
                for name, epoch in iterators.items():
                    rates[f"{name}@{threads}t"].append(images_per_second(epoch, args.seconds))
        n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)

    median = {key: statistics.median(values) for key, values in rates.items()}
    names = list(iterators)
    ratios = {
        f"{threads}t": {
            f"datamodule_vs_{base}": round(median[f"datamodule@{threads}t"] / median[f"{base}@{threads}t"], 3)
            for base in ("float_tensor_batches", "float_tensor_dataloader")
        }
        for threads in args.threads
    }
    best = max(median[f"datamodule@{t}t"] for t in args.threads)
    machine = {
        **machine_info(),
        "loadavg_1_5_15_before": [round(v, 2) for v in load_before],
        "loadavg_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
    }
    result = {
        "benchmark": "data_throughput",
        "machine": machine,
        "settings": {
            "archive": args.archive, "batch_size": args.batch_size, "threads": args.threads, "num_workers": 0,
            "seconds_per_round": args.seconds, "rounds": args.rounds, "quick": args.quick,
            "baseline_images": len(floats), "splits": {"train": n_train, "val": n_val, "test": n_test},
        },
        "setup_s": {
            "first": round(first_setup_s, 2), "first_was_cold": not was_cached, "warm": round(warm_setup_s, 2)
        },
        "images_per_s_median": {key: round(v) for key, v in median.items()},
        "images_per_s_rounds": {key: [round(v) for v in values] for key, values in rates.items()},
        "ratios": ratios,
        "target_images_per_s": TARGET_IMAGES_PER_S,
        "best_datamodule_images_per_s": round(best),
        "meets_target": best >= TARGET_IMAGES_PER_S,
        "train_mean_measured": measured_mean,
        "train_std_measured": measured_std,
        "mean_used": list(dm.mean),
        "std_used": list(dm.std),
    }
    header = " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in args.threads)
    rows = "\n".join(
        f"| `{name}` | " + " | ".join(f"{round(median[f'{name}@{t}t']):,}" for t in args.threads) + " |"
        for name in names
    )
    ratio_lines = "\n".join(
        f"- {t} thread(s): datamodule / float_tensor_batches = "
        f"**{r['datamodule_vs_float_tensor_batches']}**, "
        f"datamodule / float_tensor_dataloader = **{r['datamodule_vs_float_tensor_dataloader']}**"
        for t, r in zip(args.threads, ratios.values())
    )
    cold = "cold: extract + decode + write cache" if not was_cached else "cache was already warm"
    markdown = f"""# Data throughput (CIFARDataModule, CIFAR-10 archive)

System load average (1/5/15 min) before: {machine['loadavg_1_5_15_before']},
after: {machine['loadavg_1_5_15_after']} (on 2 cores, values well above 1 mean other processes competed
with the benchmark); the ratios are measured side by side in one process.
Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}.
Settings: batch size {args.batch_size}, num_workers 0, {args.rounds} interleaved rounds of {args.seconds:g} s
per iterator and thread count{' (--quick)' if args.quick else ''}; medians in images/s.

| iterator | {header} |
|---|{'---|' * len(args.threads)}
{rows}

- `datamodule`: `train_dataloader()` + `on_after_batch_transfer` while training (crop pad 4, flip,
  normalize), on the CPU. `datamodule_loader_only`: the loader alone (uint8 batches).
  `float_tensor_batches`: shuffled batches indexed out of a pre-made normalized float32 tensor of
  {len(floats)} images. `float_tensor_dataloader`: `DataLoader(TensorDataset(floats), shuffle=True)`.
{ratio_lines}
- Target >= {TARGET_IMAGES_PER_S:,} images/s: **{'met' if result['meets_target'] else 'NOT met'}**
  (best: {round(best):,}).
- Setup: first run {result['setup_s']['first']} s ({cold});
  a later run {result['setup_s']['warm']} s (cache loaded).
  Splits: {n_train} train / {n_val} val / {n_test} test.
- Train-split mean/std measured on this JPEG copy: {measured_mean} / {measured_std};
  normalization uses {list(dm.mean)} / {list(dm.std)}.
"""
    write_results(args.name, result, markdown, directory=args.results_dir)
    print(markdown)


if __name__ == "__main__":
    main()
