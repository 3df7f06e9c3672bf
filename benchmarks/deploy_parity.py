"""Every runtime's shipped file against the checkpoint's in-process int8 network, on real CIFAR-10 test images.

Issue 23's check of the deploy path, per model and engine: quantization-aware fine-tuning
(``QuantizationAwareTraining(engine=...)``, from a float checkpoint given with ``--init MODEL=CKPT``, e.g. a
suite row's, else from scratch) for ``--steps`` optimizer steps, saved as a Lightning checkpoint; then
``lightning-compress export CKPT --runtime ...`` exactly as a user runs it (the runtimes the engine ships to:
``onnxruntime`` and ``onnxruntime_7bit`` -> onnxruntime and OpenVINO, one QDQ file; ``xnnpack`` -> ExecuTorch ``.pte``;
``x86_inductor`` -> AOTInductor ``.pt2``). Each file is then loaded from the export directory by its runtime and
compared with the in-process int8 network (the engine's conversion of the same checkpoint, before any program
is built: the QDQ model in onnxruntime, or the PT2E quantize/dequantize graph in eager torch) on ``--images``
test images spread evenly over the split (every 5th of 10,000 for 2,000; the split is sorted by class): top-1 agreement (strict, no near-tie tolerance) and accuracy of both. The export's
own check (against the fake-quant network, on its seeded sample) is recorded beside it; for an engine whose
kernels add int32 biases (``xnnpack``), so is the agreement with its graph before the biases are rounded.

Target (issue 23): agreement >= 99 % on 2,000 images and accuracy within 0.1 point, per runtime.

Run:  python benchmarks/deploy_parity.py --init resnet20=runs/suite/kd_alpha05_cpu30_aeb1c6268c2a.ckpt
      python benchmarks/deploy_parity.py --models mobilenetv2 --work-dir runs/parity_mnv2 --reuse --images 10000
      python benchmarks/deploy_parity.py --models resnet20 --engines onnxruntime --steps 20 --images 500
Writes ``benchmarks/results/deploy_parity.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from reporting import SHARED_CIFAR10, add_output_arguments, machine_info, run_settings, write_results, yield_to_timing
from lightning_compress.commands.parser import CommandParser

from lightning_compress.core.comparison import parity

ENGINE_RUNTIMES = {"onnxruntime": ("onnxruntime", "openvino"), "onnxruntime_7bit": ("onnxruntime", "openvino"),
                   "xnnpack": ("executorch",), "x86_inductor": ("aoti",)}
"""The runtimes each engine ships to (one export per engine)."""


def shipped_networks(directory: Path, runtimes: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Each runtime's file from the export directory, loaded by that runtime."""
    from lightning_compress.core.aoti import AotiNetwork
    from lightning_compress.core.executorch import ExecuTorchNetwork
    from lightning_compress.core.onnx import OnnxRuntimeNetwork
    from lightning_compress.export.artifacts import FILES
    from lightning_compress.export.openvino import OpenVinoNetwork

    loaders = {"onnxruntime": lambda: OnnxRuntimeNetwork((directory / FILES["onnx_int8"]).read_bytes()),
               "openvino": lambda: OpenVinoNetwork((directory / FILES["onnx_int8"]).read_bytes()),
               "executorch": lambda: ExecuTorchNetwork(directory / FILES["executorch"]),
               "aoti": lambda: AotiNetwork(directory / FILES["aoti"])}
    return {runtime: loaders[runtime]() for runtime in runtimes}


def meets_target(result: dict[str, Any]) -> bool:
    """Issue 23's target: top-1 agreement >= 99 % and accuracy within 0.1 point (counted in images, not floats).

    Example:
        >>> meets_target({"images": 2000, "top1_agreement": 0.996, "accuracy": 0.9315, "reference_accuracy": 0.9325})
        True
    """
    images = result["images"]
    differing = abs(round(result["accuracy"] * images) - round(result["reference_accuracy"] * images))
    return result["top1_agreement"] >= 0.99 and differing <= 0.001 * images + 1e-9


def logits_of(network: torch.nn.Module, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([network(images[i:i + batch]).float() for i in range(0, len(images), batch)])


def measure(model: str, engine: str, args: argparse.Namespace, data: Any, work: Path) -> dict[str, Any]:
    """Fine-tune with QAT, export, and compare every shipped file with the in-process int8 network."""
    import lightning.pytorch as pl

    from lightning_compress import ImageClassifier, QuantizationAwareTraining
    from lightning_compress.commands.export import main as export
    from lightning_compress.core.timing_lock import shared_timing
    from lightning_compress.quantization.families import family_of

    pl.seed_everything(0)
    init = args.init.get(model)
    checkpoint = work / f"{model}_{engine}.ckpt"
    directory = work / f"export_{model}_{engine}"
    reused = args.reuse and checkpoint.is_file() and (directory / "manifest.json").is_file()
    if reused:  # an earlier run's fine-tuned checkpoint and export, reloaded without callbacks
        module = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)  # data only
        steps, train_s = None, None
    else:
        settings = {"lr": args.lr, "lr_schedule": "cosine", "warmup": 0.0}  # a fine-tuning schedule over --steps
        module = (ImageClassifier.load_from_checkpoint(init, map_location="cpu", weights_only=True, **settings) if init
                  else ImageClassifier(model, num_classes=10, **settings))
        qat = QuantizationAwareTraining(engine=engine, start=0.0, freeze_bn=0.6, freeze_observers=0.8,
                                        convert_on_fit_end=False)
        trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", precision=args.precision,
                             callbacks=[qat, yield_to_timing()],  # a suite row's latency is not timed beside a step
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
        began = time.perf_counter()
        trainer.fit(module, data)
        steps, train_s = trainer.global_step, time.perf_counter() - began
        trainer.save_checkpoint(checkpoint)

    with shared_timing():  # converting and comparing run between, not beside, another process's timing
        every = torch.arange(0, len(data.test_set.labels), max(1, len(data.test_set.labels) // args.images))[:args.images]
        images = data.transform(data.test_set.images[every], train=False)  # evenly spread: the split is sorted by class
        labels = data.test_set.labels[every]
        began = time.perf_counter()
        family = family_of(engine)
        in_process = family.convert_qat(copy.deepcopy(module.model).cpu().eval(), (images[:16],), "")
        reference = logits_of(in_process, images)
        convert_s = time.perf_counter() - began
        float_bias = None  # an int32-bias engine's graph before its biases are rounded: what the rounding changes
        if family.engine.int32_bias:
            from lightning_compress.quantization import pt2e

            float_bias = logits_of(pt2e.convert(copy.deepcopy(module.model).cpu().eval()), images)
        # what trainer.test() measures, built as QuantizationAwareTraining builds it at fit end: the trained network
        # converted, then shipped (the PT2E engines' program, else the int8 network itself); a program that cannot be
        # built is recorded as such (a channels_last network's XNNPACK lowering failed so until core.executorch lowered
        # a default-format copy) and the file is compared with the in-process network only
        try:
            tested = family.ship(family.convert_qat(module.model.cpu().eval(), (images[:16],), ""), (images[:16],), "")
            tested_name, tested_logits = type(tested).__name__, logits_of(tested, images)
        except RuntimeError as err:
            tested_name, tested_logits = f"not built: {str(err).splitlines()[0][:160]}", None

        runtimes = ENGINE_RUNTIMES[engine]
        began = time.perf_counter()
        status = None if reused else export([str(checkpoint), "--to", str(directory), "--overwrite", "--runtime",
                                             *runtimes, "--data-root", args.data, "--check-count", str(args.images),
                                             "--latency-repeats", "5"])
        export_s = None if reused else time.perf_counter() - began
        manifest = json.loads((directory / "manifest.json").read_text())
        row: dict[str, Any] = {"model": model, "engine": engine, "init": init, "steps": steps, "reused": reused,
                               "train_s": train_s and round(train_s, 1), "convert_s": round(convert_s, 1),
                               "export_s": export_s and round(export_s, 1), "export_status": status,
                               "in_process": type(in_process).__name__, "images": len(labels), "runtimes": {}}
        row["tested"] = tested_name
        # agreement says little about a network that predicts (almost) one class: how many it predicts is recorded
        row["classes_predicted"] = int(reference.argmax(1).unique().numel())
        for runtime, network in shipped_networks(directory, runtimes).items():
            logits = logits_of(network, images)
            result = parity(reference, logits, labels, tolerance=0.0)
            versus_tested = None if tested_logits is None else parity(tested_logits, logits, labels, tolerance=0.0).to_dict()
            artifact = "openvino" if runtime == "openvino" else {"onnxruntime": "onnx_int8"}.get(runtime, runtime)
            exported = manifest["artifacts"].get(artifact, {})
            row["runtimes"][runtime] = {**result.to_dict(), "bytes": exported.get("bytes"),
                                        "export_check": exported.get("parity"), "met": meets_target(result.to_dict()),
                                        "versus_tested": versus_tested,
                                        "versus_float_bias": None if float_bias is None else
                                        parity(float_bias, logits, labels, tolerance=0.0).to_dict(),
                                        "met_versus_tested": versus_tested is not None and meets_target(versus_tested),
                                        **disagreements(reference, logits, labels)}
        return row


def disagreements(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Where the file's top-1 differs from the reference's: how near a tie the reference was there (median top-2
    softmax margin, beside the median over all images) and which of the two was right.

    Example:
        >>> ref, out = torch.tensor([[2.0, 0.0], [1.0, 0.9]]), torch.tensor([[2.0, 0.0], [0.9, 1.0]])
        >>> disagreements(ref, out, torch.tensor([0, 1]))["file_right_reference_wrong"]
        1
    """
    top2 = reference.softmax(1).topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    differ = reference.argmax(1) != logits.argmax(1)
    reference_right, file_right = reference.argmax(1) == labels, logits.argmax(1) == labels
    return {"disagreeing": int(differ.sum()),
            "disagreeing_median_margin": float(margin[differ].median()) if differ.any() else None,
            "median_margin": float(margin.median()),
            "file_right_reference_wrong": int((file_right & ~reference_right).sum()),
            "reference_right_file_wrong": int((reference_right & ~file_right).sum())}


def render(rows: list[dict[str, Any]], machine: dict[str, Any], settings: dict[str, Any]) -> str:
    """The markdown report."""
    lines = ["# Shipped files vs the in-process int8 network, real CIFAR-10 test images (`benchmarks/deploy_parity.py`)",
             "", f"Machine: {machine['cpu']['model']}, flags {', '.join(machine['cpu']['flags'])}; load average at "
             f"the end {machine['load_average_1_5_15']}; torch {machine['torch']}. Settings: {settings}.", "",
             "Target (issue 23): top-1 agreement >= 99 % and accuracy within 0.1 point, per runtime. Two references: "
             "the in-process int8 network (the engine's conversion: the QDQ model in onnxruntime, or the PT2E "
             "quantize/dequantize graph computed in float by eager torch) and what `trainer.test()` runs (the "
             "program the engine ships, built at conversion; for onnxruntime the same QDQ model).", "",
             "| model | engine | runtime | images | agreement | int8 network top-1 | file top-1 | difference | met | "
             "agreement with what test() runs | its top-1 | met | file kB |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for row in rows:
        for runtime, r in row["runtimes"].items():
            size = "-" if r["bytes"] is None else f"{r['bytes'] / 1e3:,.0f}"
            tested = r.get("versus_tested")
            versus = ("- | - | -" if tested is None else f"{100 * tested['top1_agreement']:.2f} % | "
                      f"{100 * tested['reference_accuracy']:.2f} | {'met' if r['met_versus_tested'] else 'NOT met'}")
            lines.append(f"| {row['model']} | {row['engine']} | {runtime} | {r['images']} | "
                         f"{100 * r['top1_agreement']:.2f} % | {100 * r['reference_accuracy']:.2f} | "
                         f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - r['reference_accuracy']):+.2f} | "
                         f"{'met' if r['met'] else 'NOT met'} | {versus} | {size} |")
    lines += ["", "Where a file and the int8 network disagree (top-2 softmax margin of the int8 network's output):", ""]
    lines += [f"- {row['model']}, engine {row['engine']}, {runtime}: "
              f"{r['disagreeing']} images, median margin there "
              + ("-" if r["disagreeing_median_margin"] is None else f"{r['disagreeing_median_margin']:.3f}")
              + f" (all images: {r['median_margin']:.3f}); the file right where the network is wrong on "
              f"{r['file_right_reference_wrong']}, wrong where it is right on {r['reference_right_file_wrong']}"
              for row in rows for runtime, r in row["runtimes"].items() if "disagreeing" in r]
    lines += [f"- {row['model']}, engine {row['engine']}, {runtime}, against the same graph with its biases left in "
              f"float (not rounded to the int32 codes the kernels add): {100 * f['top1_agreement']:.2f} % agreement, "
              f"its top-1 {100 * f['reference_accuracy']:.2f} ({100 * (r['accuracy'] - f['reference_accuracy']):+.2f})"
              for row in rows for runtime, r in row["runtimes"].items() if (f := r.get("versus_float_bias"))]
    lines += ["", "Per engine: QAT fine-tuning steps, seconds to train, convert and export (all runtimes of the "
              "engine, with the export's own check):", ""]
    lines += [f"- {row['model']}, {row['engine']}: "
              + ("the checkpoint and export of an earlier run in the work folder (`--reuse`); "
                 if row.get("reused") else
                 f"{row['steps']} steps from {row['init'] or 'scratch'}; train {row['train_s']} s, ")
              + f"convert {row['convert_s']} s"
              + ("" if row.get("reused") else f", export {row['export_s']} s (exit {row['export_status']})")
              + f"; in-process int8 network: {row['in_process']}; "
              f"test() runs: {row.get('tested', '-')}; classes it predicts on these images: "
              f"{row.get('classes_predicted', '-')}"
              for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINE_RUNTIMES), choices=list(ENGINE_RUNTIMES))
    parser.add_argument("--init", nargs="*", default=[], metavar="MODEL=CKPT",
                        help="float checkpoint to fine-tune from, per model (default: from scratch)")
    parser.add_argument("--steps", type=int, default=300, help="QAT fine-tuning steps")
    parser.add_argument("--images", type=int, default=2000, help="test images compared")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01, help="peak learning rate (cosine over --steps, no warm-up)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--data", default=SHARED_CIFAR10)
    parser.add_argument("--work-dir", default=None, help="checkpoints and exports (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="compare the checkpoint and export an earlier run left in --work-dir again (no training "
                             "or export), e.g. on more --images")
    add_output_arguments(parser, "deploy_parity")
    args = parser.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.init]
    if any(len(pair) != 2 or pair[0] not in args.models for pair in pairs):
        parser.error(f"--init takes MODEL=CKPT with MODEL one of {args.models}, got {args.init}")
    args.init = dict(pairs)

    from lightning_compress import CIFARDataModule

    data = CIFARDataModule(args.data, download=False, batch_size=args.batch_size, val_size=0)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(args.work_dir or folder)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.models:
            for engine in args.engines:
                rows.append(measure(model, engine, args, data, work))
                print(f"[deploy_parity] {model} {engine}: "
                      + ", ".join(f"{k} {100 * v['top1_agreement']:.2f} %" for k, v in rows[-1]["runtimes"].items()),
                      flush=True)
                machine, settings = machine_info(), run_settings(args)  # after every engine: a stopped run keeps them
                write_results(args.name, {"machine": machine, "settings": settings, "rows": rows},
                              render(rows, machine, settings), args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
