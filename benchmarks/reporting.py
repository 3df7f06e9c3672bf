"""What every benchmark writes: machine description and results files (JSON + markdown), atomically."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from lightning_compress.core.files import write_text_atomic
from lightning_compress.core.machine import CPU_FLAGS, cpu_description  # noqa: F401  (benchmarks import them here)

RESULTS_DIR = Path(__file__).parent / "results"
SHARED_CIFAR10 = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz")
"""The offline CIFAR-10 copy beside the repository (ImageFolder tree in a tar.gz)."""


def machine_info() -> dict[str, Any]:
    """Describe the machine and software the numbers were measured on, and how busy it was.

    ``load_average_1_5_15`` is the system load when called: on a 2-core machine a value well above 1
    means other processes competed with the benchmark.
    """
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # vector ISA torch's CPU kernels use
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": [round(value, 2) for value in os.getloadavg()],
        "cpu": cpu_description(),  # model and ISA flags: machines differ between runs
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(machine: dict[str, Any]) -> str:
    """``Machine: <CPU model> (<n> CPUs; <ISA flags>)`` for a results file's markdown, from :func:`machine_info`.

    Example:
        >>> machine_line({"cpu": {"model": "Xeon", "flags": ["avx2", "amx_tile"]}, "cpu_count": 2})
        'Machine: Xeon (2 CPUs; avx2 amx_tile)'
    """
    return f"Machine: {machine['cpu']['model']} ({machine['cpu_count']} CPUs; {' '.join(machine['cpu']['flags'])})"


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Add ``--name`` and ``--results-dir``: where :func:`write_results` puts a benchmark's files.

    Every benchmark takes both, so a run can write elsewhere than the committed results (a test, a
    variant such as ``--name pruning_overhead_reuse_memory``) without overwriting them.

    Args:
        parser: The benchmark's parser; ``args.name`` and ``args.results_dir`` (a ``Path``) are added.
        name: Default base name of the results files, e.g. ``"train_throughput"``.
    """
    parser.add_argument("--name", default=name, help="base name of the results files (default: %(default)s)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="folder of the results files (default: benchmarks/results)")


def run_settings(args: argparse.Namespace, omit: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed arguments to record with a result, less where the files go and the ``omit`` ones.

    Args:
        args: The benchmark's parsed arguments (from a parser given :func:`add_output_arguments`).
        omit: Further argument names left out (e.g. a local data path).

    Returns:
        ``vars(args)`` without ``results_dir`` and ``omit``.

    Example:
        >>> run_settings(argparse.Namespace(epochs=2, data="x.tar.gz", results_dir=RESULTS_DIR), omit=("data",))
        {'epochs': 2}
    """
    return {key: value for key, value in vars(args).items() if key not in ("results_dir", *omit)}


def write_results(name: str, result: dict[str, Any], markdown: str, directory: Path = RESULTS_DIR) -> None:
    """Write ``<directory>/<name>.json`` and ``.md`` atomically.

    Args:
        name: Base file name, e.g. ``"train_throughput"``.
        result: JSON-serializable result, including its machine and settings.
        markdown: The human-readable rendering.
        directory: Where to write.
    """
    write_text_atomic(directory / f"{name}.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(directory / f"{name}.md", markdown)


def yield_to_timing() -> Any:
    """A callback holding the machine's timing lock shared during each training step, so that a latency measured
    by another process (a suite row's planning, checks or fit-end measurement: they hold it exclusively) runs
    with this training paused, not beside it; :meth:`hold_until_first_step` also covers the set-up before it."""
    import contextlib

    import lightning.pytorch as pl

    from lightning_compress.core.timing_lock import shared_timing

    class YieldToTiming(pl.Callback):
        def __init__(self) -> None:
            self.held = contextlib.ExitStack()

        def hold_until_first_step(self) -> None:
            """Hold the lock shared from now (data loading, set-up) until the first training step ends."""
            self.held.enter_context(shared_timing())

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            self.held.enter_context(shared_timing())

        def release(self) -> None:
            """Let go of the lock, wherever it was taken (a step, or the set-up before the first one)."""
            self.held.close()

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self.release()

        def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
            self.release()

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.release()

    return YieldToTiming()
