"""A screenshot of TensorBoard showing a run's ``sparsity/`` and ``quant/`` curves: what a user monitors.

Three steps, each a function (``tests/test_tensorboard_screenshot.py`` runs the first two without a browser):

1. :func:`produce_logs` -- a short real run: ``ImageClassifier("resnet20")`` fit with ``MagnitudePruning``
   and ``QuantizationAwareTraining`` and a ``TensorBoardLogger``, on the shared CIFAR-10 copy when it is
   there, else on generated images (about a minute on a busy 2-core CPU). Skipped with ``--logdir``, which
   serves logs that already exist (e.g. ``runs/quickstart`` after the README's quickstart).
2. :func:`serve` -- ``tensorboard --logdir ... --host 127.0.0.1 --port <free port>`` as a subprocess,
   waited on until its scalars API lists the run's ``sparsity/`` and ``quant/`` tags.
3. :func:`screenshot` -- headless Chromium (Debian's ``chromium`` package) opens the Scalars dashboard
   filtered to a few of those tags (``/#scalars&tagFilter=<regex>``; ``--dashboard timeseries`` pictures
   the Time Series tab, see :func:`dashboard_url`) and writes the PNG, atomically.

A missing tool ends the script with one line naming it (``chromium``, ``tensorboard``), not a traceback.

Run:
    python benchmarks/tensorboard_screenshot.py                         # a fresh short run, then the picture
    python benchmarks/tensorboard_screenshot.py --logdir runs/quickstart  # logs of an earlier run
Writes ``benchmarks/results/tensorboard.{png,json,md}`` (or ``--results-dir``/``--name``); the run's logs
go to ``runs/tensorboard_screenshot/`` (``--run-dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reporting import SHARED_CIFAR10, add_output_arguments, machine_info, run_settings, write_results
from lightning_compress.commands.parser import CommandParser

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME = "resnet20_gmp_qat"
DEFAULT_TAG_FILTER = (r"^sparsity/(global|target|model\.layer1\.0\.conv1)$"
                      r"|^quant/(weight_error/model\.(conv1|fc)|act_scale/model\.layer3_2_relu2)$")
"""Regex of the cards shown: the global and target sparsity and one layer's, the int8 weight error of the first
and last layer and one activation scale (the ~75 sparsity/ and quant/ cards of a ResNet-20 do not fit a page)."""


MIN_INK = 0.03
""":func:`ink_fraction` below which the picture is taken for one without charts (the default one: ~0.08)."""


class Missing(RuntimeError):
    """A tool, file or result the script needs is not there; its message is the one line printed."""


# ----------------------------------------------------------------------------------------------- logs
def write_generated_images(root: Path, classes: int = 10, per_class: int = 32, seed: int = 0) -> Path:
    """Write an ImageFolder tree of random 32x32 PNGs (``train/`` and ``test/``), as ``tests/test_cli.py`` does.

    Args:
        root: Folder to create the tree in.
        classes: Number of class folders.
        per_class: Images per class and split.
        seed: Seed of the pixels.

    Returns:
        ``root``, a layout ``CIFARDataModule`` reads.
    """
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def produce_logs(run_dir: Path, data: str | None = None, steps: int = 100, batch_size: int = 32,
                 final_sparsity: float = 0.8, log_every: int = 2, cache_dir: str | None = None) -> Path:
    """Fit a ResNet-20 with ``MagnitudePruning`` and ``QuantizationAwareTraining``, logging to TensorBoard.

    Pruning ramps from 0 to ``final_sparsity`` between 20 % and 60 % of the steps (a mask update every
    ``log_every * 2`` steps); QAT starts at 40 %, so both kinds of curves move within the picture and
    the phases show on the step axis.

    Args:
        run_dir: The logger's ``save_dir``; the run is ``run_dir/resnet20_gmp_qat`` (replaced if there).
        data: A ``CIFARDataModule`` root (e.g. the CIFAR-10 archive); None: generated images.
        steps: Optimizer steps.
        batch_size: Training batch size.
        final_sparsity: Sparsity reached at 60 % of the steps.
        log_every: Trainer ``log_every_n_steps`` and QAT's ``log_every_n_steps``.
        cache_dir: The data module's decoded-image cache (None: its default).

    Returns:
        The run's log folder (holding the ``events.out.tfevents.*`` file).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_compress import (
        CIFARDataModule,
        ImageClassifier,
        MagnitudePruning,
        QuantizationAwareTraining,
    )

    shutil.rmtree(run_dir / RUN_NAME, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        if data is None:
            data = str(write_generated_images(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tree"))
        pl.seed_everything(0, verbose=False)
        datamodule = CIFARDataModule(data, download=False, batch_size=batch_size, val_size=0, cache_dir=cache_dir)
        logger = TensorBoardLogger(save_dir=str(run_dir), name="", version=RUN_NAME, default_hp_metric=False)
        callbacks = [
            MagnitudePruning(final_sparsity=final_sparsity, start=0.2, end=0.6, update_every=2 * log_every),
            QuantizationAwareTraining(start=0.4, freeze_bn=0.8, freeze_observers=0.9, log_every_n_steps=log_every),
        ]
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=logger, callbacks=callbacks,
            log_every_n_steps=log_every, limit_val_batches=0, num_sanity_val_steps=0,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(ImageClassifier("resnet20", num_classes=datamodule.num_classes, lr=0.05, warmup=0.1),
                    datamodule=datamodule)
    return Path(logger.log_dir)


# -------------------------------------------------------------------------------------------- serving
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and parse its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def scalar_tags(base_url: str) -> dict[str, list[str]]:
    """The scalar tags TensorBoard serves, per run (its ``/data/plugin/scalars/tags`` API).

    Args:
        base_url: E.g. ``http://127.0.0.1:6006``.

    Returns:
        ``{run: sorted tags}``.
    """
    return {run: sorted(tags) for run, tags in get_json(f"{base_url}/data/plugin/scalars/tags").items()}


def shown_path(path: Path) -> str:
    """``path`` relative to the repository root when inside it (as TensorBoard and the results show it)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package can be imported (it is run as ``python -m tensorboard.main``)."""
    return importlib.util.find_spec("tensorboard") is not None


@contextlib.contextmanager
def serve(logdir: Path, prefixes: tuple[str, ...] = ("sparsity/", "quant/"), timeout_s: float = 120.0
          ) -> Iterator[tuple[str, dict[str, list[str]]]]:
    """Run TensorBoard on ``logdir`` at 127.0.0.1 until the context exits; wait until it serves the tags.

    Waits until the scalars API lists, in some run, a tag starting with each of ``prefixes`` (TensorBoard
    answers before it has read the event files; a page taken then shows no cards).

    Args:
        logdir: The folder of runs to serve.
        prefixes: Tag prefixes that must be served before the context is entered.
        timeout_s: How long to wait.

    Yields:
        The base URL and the served ``{run: scalar tags}``.

    Raises:
        Missing: ``tensorboard`` is not installed, or it did not serve the tags in time (its output's
            last line in the message).
    """
    if not tensorboard_available():
        raise Missing("tensorboard is not installed (pip install tensorboard); it serves the logs")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", shown_path(logdir), "--host", "127.0.0.1",
             "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
            stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        try:
            deadline, tags = time.monotonic() + timeout_s, {}
            while True:
                with contextlib.suppress(OSError, ValueError):  # not listening yet / mid-start
                    tags = scalar_tags(base_url)
                    served = [tag for run_tags in tags.values() for tag in run_tags]
                    if all(any(tag.startswith(prefix) for tag in served) for prefix in prefixes):
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    output.seek(0)
                    lines = output.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
                    state = f"exited with {process.returncode}" if process.poll() is not None else \
                        f"served {sum(map(len, tags.values()))} scalar tags after {timeout_s:.0f} s"
                    raise Missing(f"tensorboard on {logdir} {state}, not one starting with each of "
                                  f"{', '.join(prefixes)}; its last output: {lines[-1]}")
                time.sleep(0.5)
            yield base_url, tags
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ------------------------------------------------------------------------------------------ screenshot
def dashboard_url(base_url: str, tag_filter: str, dashboard: str = "scalars") -> str:
    """TensorBoard's page of scalar charts filtered by ``tag_filter`` (a regex), smoothing off.

    What this TensorBoard (2.21) reads from the URL: the Scalars dashboard takes ``tagFilter`` and
    ``_smoothingWeight`` in the hash (``#scalars&tagFilter=...``); the Time Series dashboard takes
    ``tagFilter`` and ``smoothing`` in the query string and ignores them in the hash, and draws with WebGL
    unless ``forceSVG=true`` (headless Chromium without a GPU draws empty charts otherwise).

    Args:
        base_url: E.g. ``http://127.0.0.1:6006``.
        tag_filter: Regex of the tags shown.
        dashboard: ``"scalars"`` (one compact grid, the default) or ``"timeseries"`` (TensorBoard's first
            tab: cards grouped by prefix, with a settings pane and a data table under each chart).

    Example:
        >>> dashboard_url("http://127.0.0.1:6006", "sparsity/|quant/")
        'http://127.0.0.1:6006/#scalars&tagFilter=sparsity%2F%7Cquant%2F&_smoothingWeight=0'
        >>> dashboard_url("http://127.0.0.1:6006", "sparsity/", "timeseries")
        'http://127.0.0.1:6006/?tagFilter=sparsity%2F&smoothing=0&forceSVG=true#timeseries'
    """
    if dashboard == "scalars":
        return f"{base_url}/#scalars&{urllib.parse.urlencode({'tagFilter': tag_filter, '_smoothingWeight': 0})}"
    if dashboard == "timeseries":
        query = urllib.parse.urlencode({"tagFilter": tag_filter, "smoothing": 0, "forceSVG": "true"})
        return f"{base_url}/?{query}#timeseries"
    raise ValueError(f"dashboard must be 'scalars' or 'timeseries', got {dashboard!r}")


def find_chromium(name: str = "chromium") -> str:
    """The Chromium executable's path.

    Raises:
        Missing: it is not on ``PATH`` (Debian: ``apt-get install chromium``).
    """
    path = shutil.which(name)
    if path is None:
        raise Missing(f"{name} is not installed (Debian: apt-get install chromium); it takes the screenshot")
    return path


def chromium_version(chromium: str) -> str:
    """``chromium --version``'s line, e.g. ``Chromium 156.0.8078.114 built on Debian GNU/Linux 12``."""
    completed = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return completed.stdout.strip()


def screenshot(url: str, png: Path, chromium: str, window: tuple[int, int] = (1400, 1000),
               virtual_time_ms: int = 15000, timeout_s: float = 180.0, min_ink: float = MIN_INK) -> float:
    """Open ``url`` in headless Chromium with a fresh profile and write the page's PNG to ``png`` atomically.

    The flags keep Chromium off the network except for ``url`` (without the background-networking ones
    its connections are refused here) and off the GPU; ``--virtual-time-budget`` lets the dashboard
    fetch and draw its charts before the picture is taken.

    Returns:
        The picture's :func:`ink_fraction`.

    Raises:
        Missing: Chromium failed, wrote no PNG (its last output line in the message) or one without charts
            (:func:`ink_fraction` below ``min_ink``); ``png`` is then left as it was.
    """
    from lightning_compress.core.files import atomic_path

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, atomic_path(png) as tmp:
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
            f"--user-data-dir={profile}", f"--screenshot={tmp}", f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={virtual_time_ms}", url,
        ]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise Missing(f"chromium took over {timeout_s:.0f} s to screenshot {url}") from err
        if not tmp.exists() or not tmp.read_bytes().startswith(b"\x89PNG"):
            lines = (completed.stdout + completed.stderr).strip().splitlines() or ["(no output)"]
            raise Missing(f"chromium (exit {completed.returncode}) wrote no PNG of {url}; its last output: {lines[-1]}")
        ink = ink_fraction(tmp)
        if ink < min_ink:  # checked before the rename: an earlier good picture stays
            raise Missing(f"chromium's picture of {url} has no charts ({ink:.1%} of the charts' area drawn): "
                          f"TensorBoard did not draw them within --virtual-time-budget {virtual_time_ms} ms")
    return ink


def ink_fraction(png: Path) -> float:
    """Fraction of not (near) white pixels where the charts are: right of the sidebar, below the header.

    ~0.01 when TensorBoard drew the cards' titles but no charts yet (or a blank page, or a lone spinner),
    ~0.08 with the default picture's six charts.
    """
    from PIL import Image

    with Image.open(png) as image:
        gray = image.convert("L")
    width, height = gray.size
    charts = gray.crop((int(0.26 * width), int(0.18 * height), width, height))
    return sum(charts.histogram()[:240]) / (charts.width * charts.height)


# ------------------------------------------------------------------------------------------------ main
def markdown(result: dict[str, Any], png_name: str | None) -> str:
    """The results page: the picture (when taken), what it shows and how to regenerate it."""
    tags = sorted({tag for run_tags in result["tags"].values() for tag in run_tags})
    shown = [tag for tag in tags if re.search(result["settings"]["tag_filter"], tag)]
    lines = [
        "# What you see in TensorBoard: sparsity and quantization curves",
        "",
        f"TensorBoard {result['tensorboard']} served locally from `{result['logdir']}`"
        + (f", {result['chromium']} headless" if result.get("chromium") else "") + ".",
        f"{len(tags)} scalar tags served; the picture's filter `{result['settings']['tag_filter']}` shows "
        f"{len(shown)}: " + ", ".join(f"`{tag}`" for tag in shown) + ".",
        "",
    ]
    if png_name:
        lines += [f"![TensorBoard sparsity and quant curves]({png_name})", ""]
    else:
        lines += ["Screenshot skipped (`--skip-screenshot`).", ""]
    lines += [("Regenerate: `python benchmarks/tensorboard_screenshot.py` (add `--logdir runs/quickstart` to "
               "picture an earlier run's logs)."), ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Produce or take the logs, serve them, take the screenshot; write the results. Returns the JSON."""
    chromium = None if args.skip_screenshot else find_chromium(args.chromium)  # fail before training
    if not tensorboard_available():
        raise Missing("tensorboard is not installed (pip install tensorboard); it serves the logs")
    started = time.monotonic()
    if args.logdir is not None:
        if not args.logdir.exists():
            raise Missing(f"--logdir {args.logdir} does not exist")
        logdir, produced = args.logdir, None
    else:
        data = args.data if args.data and Path(args.data).exists() else None
        if args.data and data is None:
            print(f"{args.data} not found: training on generated images", file=sys.stderr)
        run_dir = produce_logs(args.run_dir, data=data, steps=args.steps, batch_size=args.batch_size,
                               final_sparsity=args.final_sparsity)
        logdir = args.run_dir
        produced = {"run": shown_path(run_dir), "data": Path(data).name if data else "generated images",
                    "seconds": round(time.monotonic() - started, 1)}
    import tensorboard

    png = args.results_dir / f"{args.name}.png"
    with serve(logdir) as (base_url, tags):
        url = dashboard_url(base_url, args.tag_filter, args.dashboard)
        ink = screenshot(url, png, chromium, virtual_time_ms=args.virtual_time_budget) if chromium else None
    result: dict[str, Any] = {
        "logdir": shown_path(logdir),
        "produced": produced,
        "tags": tags,
        "url": url.replace(base_url, "http://127.0.0.1:<port>"),
        "tensorboard": tensorboard.__version__,
        "chromium": chromium_version(chromium) if chromium else None,
        "settings": run_settings(args, omit=("data", "logdir", "run_dir", "chromium")),
        "machine": machine_info(),
    }
    if ink is not None:
        result["ink_fraction"] = round(ink, 4)
    write_results(args.name, result, markdown(result, png.name if chromium else None), args.results_dir)
    return result


def main() -> None:
    parser = CommandParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, help="serve these logs instead of producing a run")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "tensorboard_screenshot",
                        help="where the produced run logs (default: %(default)s)")
    parser.add_argument("--data", default=SHARED_CIFAR10,
                        help="CIFARDataModule root; generated images when absent (default: the shared CIFAR-10)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the produced run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--final-sparsity", type=float, default=0.8)
    parser.add_argument("--tag-filter", default=DEFAULT_TAG_FILTER, help="regex of the cards shown")
    parser.add_argument("--dashboard", choices=("scalars", "timeseries"), default="scalars",
                        help="TensorBoard page pictured (default: %(default)s)")
    parser.add_argument("--virtual-time-budget", type=int, default=15000, help="Chromium's, in ms")
    parser.add_argument("--chromium", default="chromium", help="the Chromium executable (default: %(default)s)")
    parser.add_argument("--skip-screenshot", action="store_true",
                        help="produce and serve the logs and record the tags, without Chromium")
    add_output_arguments(parser, "tensorboard")
    args = parser.parse_args()
    try:
        result = run(args)
    except Missing as err:
        sys.exit(f"tensorboard_screenshot: {err}")
    shown = f"{args.results_dir / args.name}.png" if not args.skip_screenshot else "no screenshot"
    print(f"{shown}: {sum(map(len, result['tags'].values()))} scalar tags served from {result['logdir']}")


if __name__ == "__main__":
    main()
