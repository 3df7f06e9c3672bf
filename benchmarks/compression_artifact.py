"""Size of a 90 % sparse + int8 ResNet-20 packed artifact against its fp32 checkpoint.

The weights are pruned one-shot by magnitude (every layer MagnitudePruning prunes by default, each to
the target sparsity) without training: the size of the packed artifact depends on the sparsity and
the value format, not on the accuracy, so no training run is needed for this measurement. The fp32
baseline is ``torch.save`` of the network's state dict (weights only, the smallest fp32 checkpoint);
a full Lightning checkpoint (with optimizer state) is measured too.

Usage: ``python benchmarks/compression_artifact.py [--sparsity 0.9] [--model resnet20]``.
Writes ``benchmarks/results/compression_artifact.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from reporting import add_output_arguments, machine_info, write_results
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.accounting import count_nonzero, serialized_size
from lightning_compress.core.layers import select_layers
from lightning_compress.export import pack_state_dict, unpack_state_dict
from lightning_compress.module import ImageClassifier
from lightning_compress.pruning.masks import layerwise_magnitude_masks


def main() -> None:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--sparsity", type=float, default=0.9)
    add_output_arguments(parser, "compression_artifact")
    args = parser.parse_args()
    torch.manual_seed(0)
    classifier = ImageClassifier(args.model, num_classes=10)
    layers = select_layers(classifier)
    weights = {name: classifier.get_submodule(name).weight for name in layers}
    masks = layerwise_magnitude_masks(weights, {name: args.sparsity for name in layers})
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(masks[name])
    network: nn.Module = classifier.model
    state = network.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(classifier)
        trainer.save_checkpoint(Path(tmp) / "model.ckpt")
        checkpoint_bytes = (Path(tmp) / "model.ckpt").stat().st_size
    fp32_bytes = serialized_size(state)
    rows = {}
    for values in ("int8", "fp16"):
        for codec in ("lzma", "zlib"):
            begin = time.perf_counter()
            blob = pack_state_dict(state, values=values, codec=codec)
            pack_s = time.perf_counter() - begin
            begin = time.perf_counter()
            unpack_state_dict(blob)
            unpack_s = time.perf_counter() - begin
            rows[f"{values}+{codec}"] = {"bytes": len(blob), "ratio_vs_fp32_weights": fp32_bytes / len(blob),
                                         "ratio_vs_lightning_checkpoint": checkpoint_bytes / len(blob),
                                         "pack_s": pack_s, "unpack_s": unpack_s}
    counts = count_nonzero(network)
    result = {
        "machine": machine_info(),
        "settings": {"model": args.model, "sparsity": args.sparsity, "pruned_layers": len(layers),
                     "pruning": "one-shot layerwise magnitude on untrained weights (size only, no accuracy)"},
        "params": counts.total.total, "nonzero": counts.total.nonzero, "overall_sparsity": counts.total.sparsity,
        "fp32_state_dict_bytes": fp32_bytes, "lightning_checkpoint_bytes": checkpoint_bytes, "packed": rows,
    }
    headline = rows["int8+lzma"]
    lines = [
        f"# Packed artifact size: {args.model}, {args.sparsity:.0%} sparse + int8", "",
        f"{len(layers)} layers pruned one-shot by magnitude (MagnitudePruning's default selection; untrained weights: "
        "size only). Overall sparsity of all parameters "
        f"{counts.total.sparsity:.1%} ({counts.total.nonzero:,} of {counts.total.total:,} non-zero).", "",
        f"fp32 state dict (torch.save): {fp32_bytes:,} bytes; Lightning checkpoint (written before any step, so without optimizer state): "
        f"{checkpoint_bytes:,} bytes.", "",
        "| packed format | bytes | vs fp32 weights | vs Lightning checkpoint | pack (s) | unpack (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in rows.items():
        lines.append(f"| {key} | {row['bytes']:,} | {row['ratio_vs_fp32_weights']:.1f}x | "
                     f"{row['ratio_vs_lightning_checkpoint']:.1f}x | {row['pack_s']:.2f} | {row['unpack_s']:.3f} |")
    lines += ["", f"**Result: {headline['ratio_vs_fp32_weights']:.1f}x smaller than the fp32 weights** "
              f"(target >= 10x: {'met' if headline['ratio_vs_fp32_weights'] >= 10 else 'NOT met'}).", "",
              f"Machine: {result['machine']}", ""]
    markdown = "\n".join(lines)
    write_results(args.name, result, markdown, directory=args.results_dir)
    print(markdown)


if __name__ == "__main__":
    main()
