"""CompressionReport: what compression gained and what it cost, as a table, JSON and in TensorBoard.

Every number comes from :mod:`lightning_compress.core.accounting` or the packed artifact of
:mod:`lightning_compress.export`, so the report, the benchmarks and the callbacks agree on each
definition.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    >>> summary = summarize(net, torch.randn(1, 3, 8, 8), latency_batch_sizes=())
    >>> [row["name"] for row in summary["layers"]], summary["totals"]["params"]
    (['0', '2'], 402)
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_compress.core.accounting import (
    count_macs_per_module,
    count_nonzero,
    count_parameters,
    measure_latency,
    serialized_size,
)
from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.composition import Declaration, Effect
from lightning_compress.core.files import atomic_path, write_text_atomic
from lightning_compress.core.inputs import capture_network_input, first_sample
from lightning_compress.core.onnx import MissingExtraError, onnx_bytes
from lightning_compress.core.progress import StepBudget, StepWindow
from lightning_compress.export import VALUE_FORMATS, OnnxRuntimeNetwork, pack_state_dict
from lightning_compress.export.aoti import AotiNetwork
from lightning_compress.export.executorch import ExecuTorchNetwork
from lightning_compress.planning import CompressToTarget, Plan


def is_int8(network: nn.Module) -> bool:
    """Whether ``network`` holds converted int8 modules (``torch.ao.nn.quantized``), is an int8 ONNX model, an
    ExecuTorch program or AOTInductor package (what the PT2E engines ship), or a PT2E quantize/dequantize graph.

    Example:
        >>> is_int8(nn.Linear(2, 2))
        False
    """
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") or isinstance(m, OnnxRuntimeNetwork)
               or (isinstance(m, (ExecuTorchNetwork, AotiNetwork)) and m.quantized) or _quantizes(m)
               for m in network.modules())


def _quantizes(module: nn.Module) -> bool:
    """Whether ``module`` is a graph with quantize ops (a converted PT2E graph)."""
    return isinstance(module, torch.fx.GraphModule) and any(
        "quantize_per" in str(node.target) for node in module.graph.nodes if node.op == "call_function")


def _int8_layer_names(network: nn.Module | None) -> set[str]:
    if network is None:
        return set()
    return {name for name, m in network.named_modules()
            if type(m).__module__.startswith("torch.ao.nn.quantized") and hasattr(m, "weight")}


def layer_rows(network: nn.Module, example_input: torch.Tensor, int8_network: nn.Module | None = None,
               prefix: str = "") -> list[dict[str, Any]]:
    """One row per weighted layer (a float ``weight`` of >= 2 dims), named with ``prefix`` in front.

    Rows hold ``name``, ``type``, ``shape``, ``params``, ``nonzero``, ``sparsity``, ``bits`` (8 for layers
    quantized in ``int8_network``) and ``macs`` (for ``example_input``; batch size 1 gives per-image MACs).

    Example:
        >>> rows = layer_rows(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4))
        >>> rows[0]["params"], rows[0]["macs"], rows[0]["bits"]
        (10, 8, 32)
    """
    macs = count_macs_per_module(network, example_input)
    int8_names = _int8_layer_names(int8_network)
    rows = []
    for name, module in network.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() < 2:
            continue
        counts = count_nonzero(module)
        own = [c for key, c in counts.per_parameter.items() if "." not in key]
        params, nonzero = sum(c.total for c in own), sum(c.nonzero for c in own)
        quantized = hasattr(module, "weight_fake_quant") or name in int8_names
        rows.append({
            "name": prefix + name, "type": type(module).__name__, "shape": list(weight.shape), "params": params,
            "nonzero": nonzero, "sparsity": 1.0 - nonzero / params if params else 0.0,
            "bits": 8 if quantized else 32, "macs": macs.get(name, 0),
        })
    return rows


def _float_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's tensors (not a PT2E graph's mode flags), floating ones in fp32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in network.state_dict().items()
            if isinstance(v, torch.Tensor)}


def summarize(
    network: nn.Module,
    example_input: torch.Tensor,
    dense_network: nn.Module | None = None,
    int8_network: nn.Module | None = None,
    accuracy: Mapping[str, Any] | None = None,
    values: str = "int8",
    latency_batch_sizes: Sequence[int] = (1, 64),
    latency_repeats: int = 10,
    prefix: str = "",
) -> dict[str, Any]:
    """The compression report of ``network``, JSON-ready: layers, totals, sizes, latency and accuracy.

    ``sizes`` compares ``torch.save`` of the fp32 state dict with
    :func:`~lightning_compress.export.pack_state_dict`'s artifact.

    Args:
        network: The compressed float network (sparse, channel-pruned or QAT-prepared).
        example_input: One input of batch size 1.
        dense_network: The uncompressed fp32 network: the MACs and latency baseline (default ``network``).
        int8_network: The int8 conversion of ``network``, if any: timed as the compressed model.
        accuracy: E.g. ``{"metric": "val/acc", "before": 0.1, "after": 0.9}``; ``None`` if unknown.
        values: Packed value format, ``"int8"`` or ``"fp16"``.
        latency_batch_sizes: Batch sizes to time (median CPU time, models alternating): the dense network in
            eager torch and as fp32 ONNX in onnxruntime (the speed-up a deployment sees is against that one),
            and the compressed model; empty skips it.
        latency_repeats: Timed forward passes per model and batch size, at least 1.
        prefix: Prepended to layer names (``"model."``: named as in the LightningModule).

    Example:
        >>> summary = summarize(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4), latency_repeats=2)
        >>> sorted(summary["latency"]["batches"])
        ['1', '64']
    """
    if values not in VALUE_FORMATS:
        raise ValueError(f"values must be one of {list(VALUE_FORMATS)}, got {values!r}")
    if latency_repeats < 1:
        raise ValueError(f"latency_repeats must be >= 1, got {latency_repeats}")
    network = network.cpu()
    example_input = example_input[:1].cpu()
    rows = layer_rows(network, example_input, int8_network, prefix)
    counts = count_nonzero(network)
    macs_all = count_macs_per_module(network, example_input).get("", 0)
    state = _float_state(network)
    fp32_bytes, packed_bytes = serialized_size(state), len(pack_state_dict(state, values=values))
    totals = {
        "params": count_parameters(network), "nonzero": counts.total.nonzero, "sparsity": counts.total.sparsity,
        "layer_params": sum(r["params"] for r in rows), "layer_nonzero": sum(r["nonzero"] for r in rows),
        "macs": macs_all,
    }
    totals["layer_sparsity"] = 1.0 - totals["layer_nonzero"] / max(totals["layer_params"], 1)
    if dense_network is not None:
        totals["dense_macs"] = count_macs_per_module(dense_network.cpu(), example_input).get("", 0)
        totals["macs_ratio"] = totals["macs"] / max(totals["dense_macs"], 1)
    compressed = int8_network if int8_network is not None else network
    dense = dense_network if dense_network is not None else network
    latency: dict[str, Any] = {
        "compressed_model": "int8" if int8_network is not None else "float (no int8 model)",
        "repeats": latency_repeats, "threads": torch.get_num_threads(), "batches": {},
    }
    baseline = _onnxruntime_baseline(dense, example_input, latency) if latency_batch_sizes else None
    for batch in latency_batch_sizes:
        images = example_input.expand(batch, *example_input.shape[1:]).contiguous()
        models = {"dense": dense, "dense_onnxruntime": baseline, "compressed": compressed}
        seconds: dict[str, list[float]] = {name: [] for name, model in models.items() if model is not None}
        for _ in range(2):  # alternate so every model sees the same machine load
            for name, timings in seconds.items():
                timings.append(measure_latency(models[name], images, repeats=latency_repeats, warmup=1))
        ms = {name: 1e3 * min(values) for name, values in seconds.items()}
        timing = {"dense_ms": ms["dense"], "compressed_ms": ms["compressed"],
                  "speedup": ms["dense"] / ms["compressed"]}
        if baseline is not None:
            timing.update(dense_onnxruntime_ms=ms["dense_onnxruntime"],
                          speedup_vs_onnxruntime=ms["dense_onnxruntime"] / ms["compressed"])
        latency["batches"][str(batch)] = timing
    return {
        "layers": rows,
        "totals": totals,
        "sizes": {"fp32_bytes": fp32_bytes, "packed_bytes": packed_bytes, "packed_values": values,
                  "ratio": fp32_bytes / packed_bytes},
        "latency": latency,
        "accuracy": dict(accuracy) if accuracy else None,
    }


def _onnxruntime_baseline(dense: nn.Module, example_input: torch.Tensor, latency: dict[str, Any]) -> nn.Module | None:
    """The dense network as an fp32 ONNX model in onnxruntime, at torch's thread count: the baseline a deployment
    would pick over eager torch. ``None`` (the reason in ``latency["onnxruntime_baseline"]``) if it cannot be
    exported."""
    try:
        blob = onnx_bytes(copy.deepcopy(dense).cpu().float(), example_input)
    except (RuntimeError, MissingExtraError) as err:
        latency["onnxruntime_baseline"] = f"not timed: {err}"
        return None
    latency["onnxruntime_baseline"] = "the dense network as fp32 ONNX, onnxruntime"
    return OnnxRuntimeNetwork(blob, threads=torch.get_num_threads())


def render_markdown(summary: Mapping[str, Any]) -> str:
    """Render :func:`summarize`'s dict as markdown tables.

    Example:
        >>> text = render_markdown(summarize(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4), latency_batch_sizes=()))
        >>> text.splitlines()[0]
        '# Compression report'
    """
    lines = ["# Compression report", "", "| layer | type | shape | params | non-zeros | sparsity | bits | MACs |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in summary["layers"]:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"| {r['name']} | {r['type']} | {shape} | {r['params']:,} | {r['nonzero']:,} | "
                     f"{r['sparsity']:.1%} | {r['bits']} | {r['macs']:,} |")
    t = summary["totals"]
    lines.append(f"| **layers** | | | {t['layer_params']:,} | {t['layer_nonzero']:,} | {t['layer_sparsity']:.1%} "
                 f"| | {t['macs']:,} |")
    lines.append(f"| **all parameters** | | | {t['params']:,} | {t['nonzero']:,} | {t['sparsity']:.1%} | | |")
    if "macs_ratio" in t:
        lines += ["", f"MACs: {t['macs']:,} of the dense network's {t['dense_macs']:,} ({t['macs_ratio']:.1%})"]
    if summary.get("techniques"):
        lines += ["", "| technique | effect | optimizer steps |", "|---|---|---|"]
        lines += [f"| {d['callback']} | {d['effect']} | {d['start']}..{d['end'] if d['end'] is not None else 'fit end'} |"
                  for d in summary["techniques"]]
    for planned in summary.get("plans", ()):
        lines += ["", *render_plan(planned)]
    s = summary["sizes"]
    lines += ["", "| size | bytes |", "|---|---:|", f"| fp32 weights (torch.save) | {s['fp32_bytes']:,} |",
              f"| packed ({s['packed_values']} non-zeros + bitmask, lzma) | {s['packed_bytes']:,} |",
              f"| **compression ratio** | **{s['ratio']:.1f}x** |"]
    if "checkpoint_bytes" in s:
        lines.append(f"| checkpoint file (with optimizer state) | {s['checkpoint_bytes']:,} |")
    lat = summary["latency"]
    if lat["batches"]:
        lines += ["", (f"CPU latency, median of {lat['repeats']} runs, {lat['threads']} thread(s); compressed model: "
                       f"{lat['compressed_model']}; onnxruntime baseline: {lat.get('onnxruntime_baseline', 'not timed')}"),
                  "", ("| batch | dense fp32 eager torch (ms) | dense fp32 onnxruntime (ms) | compressed (ms) | "
                       "speed-up vs onnxruntime fp32 | vs eager torch |"), "|---:|---:|---:|---:|---:|---:|"]
        for batch, m in lat["batches"].items():
            ort = (f"{m['dense_onnxruntime_ms']:.2f} | {m['compressed_ms']:.2f} | **{m['speedup_vs_onnxruntime']:.2f}x**"
                   if "dense_onnxruntime_ms" in m else f"- | {m['compressed_ms']:.2f} | -")
            lines.append(f"| {batch} | {m['dense_ms']:.2f} | {ort} | {m['speedup']:.2f}x |")
    runtimes = summary.get("runtimes")
    if runtimes:
        lines += ["", f"Deployed files, batch {runtimes['batch_size']}, {runtimes['threads']} thread, runs interleaved, "
                  f"{runtimes['cpu']['model']} ({', '.join(runtimes['cpu']['flags'])}): fastest runtime "
                  f"**{runtimes['fastest']['runtime']}**", "", "| artifact | median (ms) |", "|---|---:|"]
        lines += [f"| {name} | {ms:.3g} |" for name, ms in runtimes["median_ms"].items()]
    acc = summary.get("accuracy")
    if acc:
        before, after = ("n/a" if acc.get(key) is None else f"{acc[key]:.4f}" for key in ("before", "after"))
        lines += ["", f"| {acc['metric']} | before | after |", "|---|---:|---:|",
                  f"| {acc.get('source', '')} | {before} | {after} |"]
    return "\n".join(lines) + "\n"


def render_plan(planned: Mapping[str, Any]) -> list[str]:
    """Markdown lines for one ``CompressToTarget`` plan in a report: the deployment, the per-group widths, and the
    shipped network's measured latency against the prediction."""
    plan = Plan.from_dict(planned["plan"])
    lines = [(f"Planned by CompressToTarget for {planned['runtime']}, batch {planned['batch_size']}, "
              f"{planned['threads']} thread(s): {plan.render()}")]
    measured = planned.get("measured")
    if measured:
        met = "met" if measured["measured_ms"] <= measured["target_ms"] else "NOT met"
        lines += ["", (f"Shipped network measured {measured['measured_ms']:.4g} ms against the target "
                       f"{measured['target_ms']:.4g} ms ({met}); predicted {measured['predicted_ms']:.4g} ms "
                       f"({measured['prediction_error']:+.1%}).")]
    return lines


def sparsity_figure(summary: Mapping[str, Any]) -> Any:
    """A matplotlib ``Figure`` of per-layer sparsity (Agg backend; needs the ``plot`` extra).

    Example:
        >>> fig = sparsity_figure({"layers": [{"name": "fc", "sparsity": 0.5, "bits": 8}]})
        >>> fig.axes[0].get_ylabel()
        'sparsity'
    """
    from matplotlib.figure import Figure

    rows = summary["layers"]
    fig = Figure(figsize=(max(4.0, 0.35 * len(rows) + 1.5), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(rows)), [r["sparsity"] for r in rows],
           color=["tab:orange" if r["bits"] == 8 else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title("per-layer sparsity (orange: int8)")
    return fig


def write_report(summary: Mapping[str, Any], directory: str | os.PathLike[str], name: str = "compression_report"
                 ) -> dict[str, Path]:
    """Write ``<name>.md``, ``.json`` and ``.png`` (with matplotlib) atomically; the paths by extension."""
    directory = Path(directory)
    paths = {"md": directory / f"{name}.md", "json": directory / f"{name}.json"}
    write_text_atomic(paths["md"], render_markdown(summary))
    write_text_atomic(paths["json"], json.dumps(summary, indent=2) + "\n")
    try:
        figure = sparsity_figure(summary)
    except ImportError:
        return paths
    paths["png"] = directory / f"{name}.png"
    with atomic_path(paths["png"]) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return paths


class CompressionReport(CompressionCallback):
    """At fit end, report per-layer sparsity, bits and MACs, sizes, latency and accuracy.

    Compares the network as it leaves ``fit`` (pruned, slimmed, int8-converted by the other callbacks)
    with the dense fp32 network it started from; the callback moves itself last so it sees their fit-end
    work. Accuracy "before" is ``metric`` at the first validation, "after" its last value. Writes
    ``compression_report.{md,json,png}``; logs scalars (``compression/size_ratio``,
    ``compression/latency_speedup_b<N>``, ...) on every logger, and the table and chart on TensorBoard.

    Args:
        dirpath: Output folder; default: the trainer's ``log_dir`` (or ``default_root_dir``).
        values: Packed value format: ``"int8"`` or ``"fp16"``.
        metric: Logged accuracy metric to report before/after.
        latency_batch_sizes: Batch sizes to time (empty: no latency).
        latency_repeats: Timed forward passes per model and batch size.
        network: Attribute of the LightningModule holding the network; ``None`` detects it.

    Example:
        >>> report = CompressionReport(latency_repeats=5)
        >>> trainer = pl.Trainer(callbacks=[report], logger=False, enable_checkpointing=False)
    """

    effect = Effect.REPORTS

    def __init__(
        self,
        dirpath: str | None = None,
        values: str = "int8",
        metric: str = "val/acc",
        latency_batch_sizes: Sequence[int] = (1, 64),
        latency_repeats: int = 10,
        network: str | None = None,
    ) -> None:
        super().__init__(network)
        if values not in VALUE_FORMATS:
            raise ValueError(f"values must be one of {list(VALUE_FORMATS)}, got {values!r}")
        if isinstance(latency_repeats, bool) or not isinstance(latency_repeats, int) or latency_repeats < 1:
            raise ValueError(f"latency_repeats must be an integer >= 1, got {latency_repeats!r}")
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in latency_batch_sizes):
            raise ValueError(f"latency_batch_sizes must be integers >= 1, got {latency_batch_sizes!r}")
        self.dirpath = dirpath
        self.values = values
        self.metric = metric
        self.latency_batch_sizes = tuple(latency_batch_sizes)
        self.latency_repeats = latency_repeats
        self._dense: nn.Module | None = None
        self._example: torch.Tensor | None = None
        self._float_view: nn.Module | None = None
        self._accuracy: dict[str, float | None] = {"before": None, "after": None}
        self.summary: dict[str, Any] | None = None
        """The last report (also written to files)."""

    @override
    def declaration(self, budget: StepBudget) -> Declaration:
        """Reports at the end of fit."""
        return self.declare(StepWindow(budget.total_steps))

    @override
    def setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run last, after the other callbacks' fit-end conversions."""
        # a new list: Lightning is iterating over the current one right now
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep a CPU copy of the dense network as the latency baseline."""
        super().on_fit_start(trainer, pl_module)
        self._dense = copy.deepcopy(getattr(pl_module, self.network_name)).cpu().eval()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Remember one network input (captured from ``training_step``), for MACs and latency."""
        if self._example is None:
            network = getattr(pl_module, self.network_name)
            inputs = first_sample(capture_network_input(pl_module, network, batch, batch_idx))
            if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
                self._example = inputs[0].detach().cpu().float()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the accuracy metric (first and latest value)."""
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        if self._accuracy["before"] is None:
            self._accuracy["before"] = float(value)
        self._accuracy["after"] = float(value)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the float view of the trained network, before fit-end conversions."""
        self._float_view = copy.deepcopy(getattr(pl_module, self.network_name)).cpu().eval()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After a completed fit: summarize, write the files, log.

        ``teardown``, not ``on_fit_end``: quantization callbacks put the int8 model in place in theirs.
        """
        super().teardown(trainer, pl_module, stage)
        if stage != "fit" or trainer.interrupted or self._float_view is None or self._example is None:
            return
        if not trainer.is_global_zero:
            return
        final = getattr(pl_module, self.network_name)
        accuracy = None
        if self._accuracy["after"] is not None:
            accuracy = {"metric": self.metric, "source": "first validation -> last validation", **self._accuracy}
        self.summary = summarize(
            self._float_view, self._example, dense_network=self._dense,
            int8_network=final if is_int8(final) else None, accuracy=accuracy, values=self.values,
            latency_batch_sizes=self.latency_batch_sizes, latency_repeats=self.latency_repeats,
            prefix=f"{self.network_name}.",
        )
        self.summary["techniques"] = [{"callback": d.callback, "effect": d.effect.value, "start": d.window.start,
                                       "end": d.window.end} for d in self.composition
                                       if d.effect is not Effect.REPORTS]
        self.summary["plans"] = [{"plan": cb.plan.as_dict(), "runtime": cb.runtime, "batch_size": cb.batch_size,
                                  "threads": cb.threads, "measured": cb.measure_shipped(pl_module)}
                                 for cb in trainer.callbacks if isinstance(cb, CompressToTarget) and cb.plan is not None]
        directory = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        paths = write_report(self.summary, directory)
        self._log(trainer)
        rank_zero_info(f"CompressionReport written to {paths['md']}\n{render_markdown(self.summary)}")
        self._float_view = self._dense = None

    def _log(self, trainer: pl.Trainer) -> None:
        s = self.summary
        scalars = {"sparsity/report_layers": s["totals"]["layer_sparsity"], "macs/report_total": s["totals"]["macs"],
                   "compression/size_ratio": s["sizes"]["ratio"], "compression/packed_bytes": s["sizes"]["packed_bytes"]}
        for batch, m in s["latency"]["batches"].items():
            scalars[f"compression/latency_speedup_b{batch}"] = m["speedup"]
            if "speedup_vs_onnxruntime" in m:
                scalars[f"compression/latency_speedup_vs_onnxruntime_b{batch}"] = m["speedup_vs_onnxruntime"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("compression/report", render_markdown(s), trainer.global_step)
                try:
                    logger.experiment.add_figure("compression/layer_sparsity", sparsity_figure(s), trainer.global_step)
                except ImportError:
                    pass
                logger.experiment.flush()

    @override
    def state_dict(self) -> dict[str, Any]:
        """The accuracy seen so far (so a resumed run still reports "before")."""
        return {"accuracy": dict(self._accuracy), "metric": self.metric}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the accuracy seen so far."""
        self._accuracy = dict(state_dict["accuracy"])
