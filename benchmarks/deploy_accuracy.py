"""Accuracy of the shipped int8 file beside the int8 network ``trainer.test()`` runs after QAT, on real test images.

A network is trained on CIFAR-10 (``ImageClassifier``, SGD + cosine, ``CIFARDataModule``) with fake-quantization
from ``--qat-start`` on, for a small budget (this is about the file's fidelity, not about reaching the network's
best accuracy), with ``QuantizationAwareTraining(engine=--engine)`` (default ``x86``, whose file can differ
from its int8 network; the callbacks' default engine, ``onnxruntime``, tests the file itself). The QAT model
is then converted as at fit end (``QuantizationAwareTraining.convert``: the engine's int8 network, checked on a
calibration batch, which ``trainer.test()`` then runs) and the file ``lightning-compress export`` ships
(``model_int8.onnx``: ``qdq_onnx_bytes(qdq_network(...))``, run by onnxruntime) is built from the same QAT model.
On the whole test split:

* the fake-quant model (frozen copy, fp32 on CPU: the numerics QAT trained with),
* the in-process int8 network, directly and through ``trainer.test()``,
* the shipped QDQ ONNX file, and its top-1 agreement with the in-process int8 network;
* for the x86 engines also the file without its saturation at code 127 (what ``export`` wrote before issue 22).

Issue 22's target: the shipped file agrees with the in-process int8 network on >= 99.5 % of the images and its
accuracy is within 0.1 point.

Run:  python benchmarks/deploy_accuracy.py                        (resnet20, 1 epoch, bf16-mixed, shared CIFAR-10)
      python benchmarks/deploy_accuracy.py --engine onnxruntime --epochs 2 --qat-start 0.5
Writes ``benchmarks/results/deploy_accuracy.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import time

import torch

from reporting import SHARED_CIFAR10, add_output_arguments, machine_info, run_settings, write_results
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.comparison import parity
from lightning_compress.core.onnx import OnnxRuntimeNetwork


def evaluate(network: torch.nn.Module, data, batches: int | None, nudge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``network`` on the test split (normalized as the datamodule does; each input value moved by a seeded
    uniform draw in +-``nudge``), and the labels."""
    logits, labels = [], []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index, (images, targets) in enumerate(data.test_dataloader()):
            if batches is not None and index >= batches:
                break
            inputs = data.transform(images, train=False)
            if nudge:
                inputs = inputs + (torch.rand(inputs.shape, generator=generator) * 2 - 1) * nudge
            logits.append(network(inputs).float())
            labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def main() -> None:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--engine", default="x86", help="QuantizationAwareTraining engine (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit-train-batches", type=float, default=1.0,
                        help="fraction of the training batches per epoch (<= 1), or a number of batches (> 1)")
    parser.add_argument("--limit-test-batches", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--qat-start", type=float, default=0.5, help="run position where fake-quantization starts")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=SHARED_CIFAR10, help="CIFAR-10 (ImageFolder tar.gz, as the shared copy)")
    add_output_arguments(parser, "deploy_accuracy")
    args = parser.parse_args()

    import lightning.pytorch as pl

    from lightning_compress import CIFARDataModule, ImageClassifier, QuantizationAwareTraining
    from lightning_compress.quantization.engines import check_engine
    from lightning_compress.quantization.prepare import frozen_copy, is_prepared
    from lightning_compress.quantization.qdq import qdq_network, qdq_onnx_bytes

    torch.set_num_threads(args.threads)
    pl.seed_everything(0)
    data = CIFARDataModule(args.data, download=False, batch_size=args.batch_size, val_size=0,
                           eval_batch_size=args.eval_batch_size)
    model = ImageClassifier(args.model, num_classes=10, lr=args.lr)
    start = args.qat_start
    engine = check_engine(args.engine)
    qat = QuantizationAwareTraining(engine=engine.name, start=start, freeze_bn=start + 0.6 * (1 - start),
                                    freeze_observers=start + 0.8 * (1 - start), convert_on_fit_end=False)
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    limit = args.limit_train_batches if args.limit_train_batches <= 1 else int(args.limit_train_batches)
    trainer = pl.Trainer(max_epochs=args.epochs, limit_train_batches=limit,
                         precision=args.precision, callbacks=[qat], **options)
    began = time.perf_counter()
    trainer.fit(model, data)
    train_s = time.perf_counter() - began
    steps = trainer.global_step

    fake_quant = frozen_copy(model.model)
    calibration = (data.transform(next(iter(data.train_dataloader()))[0], train=False),)
    shipped = OnnxRuntimeNetwork(qdq_onnx_bytes(qdq_network(model.model), calibration[0][:1]))  # export's file
    unsaturated = (OnnxRuntimeNetwork(qdq_onnx_bytes(qdq_network(model.model, saturate_at_trained_range=False),
                                                     calibration[0][:1])) if engine.reduced_range else None)
    began = time.perf_counter()
    in_process = qat.convert(model, calibration)  # what fit end does: the engine's int8 network, checked
    convert_s = time.perf_counter() - began
    if is_prepared(in_process):
        raise RuntimeError("the QAT model was not converted (see the warning above)")
    reference_logits, labels = evaluate(fake_quant, data, args.limit_test_batches)
    int8_logits, _ = evaluate(in_process, data, args.limit_test_batches)
    shipped_logits, _ = evaluate(shipped, data, args.limit_test_batches)
    result = parity(int8_logits, shipped_logits, labels, tolerance=0.0)
    fake_quant_result = parity(reference_logits, int8_logits, labels, tolerance=0.0)
    # the network's own stability: no two implementations agree better than it agrees with itself on nudged inputs
    stability = parity(reference_logits, evaluate(fake_quant, data, args.limit_test_batches, nudge=1e-3)[0],
                       tolerance=0.0).top1_agreement
    before = (parity(int8_logits, evaluate(unsaturated, data, args.limit_test_batches)[0], labels, tolerance=0.0)
              if unsaturated is not None else None)
    tested = pl.Trainer(precision="32-true", limit_test_batches=args.limit_test_batches, **options).test(
        model, data, verbose=False)[0]["test/acc"]  # what trainer.test() prints after QAT
    fq_acc, int8_acc, shipped_acc = (100 * fake_quant_result.reference_accuracy, 100 * result.reference_accuracy,
                                     100 * result.accuracy)
    summary = {
        "engine": engine.name, "images": len(labels), "optimizer_steps": steps, "train_seconds": round(train_s, 1),
        "convert_seconds": round(convert_s, 1), "onnx_bytes": len(shipped.program_bytes()),
        "fake_quant_accuracy": fq_acc, "int8_accuracy": int8_acc, "trainer_test_accuracy": 100 * float(tested),
        "shipped_accuracy": shipped_acc, "difference_points": shipped_acc - int8_acc,
        "top1_agreement": result.top1_agreement, "max_logit_error": result.max_logit_error,
        "fake_quant_self_agreement_nudged": stability,
        "unsaturated": None if before is None else {"accuracy": 100 * before.accuracy,
                                                    "top1_agreement": before.top1_agreement},
        "target_met": abs(shipped_acc - int8_acc) <= 0.1 and result.top1_agreement >= 0.995,
    }
    print(summary, flush=True)
    report = {"machine": machine_info(), "settings": run_settings(args), "result": summary,
              "onnxruntime": __import__("onnxruntime").__version__}
    machine = report["machine"]
    rows = [("QAT model (fake-quant, fp32 on CPU)", fq_acc),
             (f"in-process int8 network (`convert`, engine `{engine.name}`)", int8_acc),
             ("the same via `trainer.test()` after conversion", 100 * float(tested)),
             ("shipped file (`model_int8.onnx`, QDQ ONNX in onnxruntime CPU)", shipped_acc)]
    if before is not None:
        rows.append(("the file without its saturation at code 127 (the export before issue 22)", 100 * before.accuracy))
    lines = [
        "# The shipped int8 file vs the int8 network `trainer.test()` measured: accuracy on the CIFAR-10 test split",
        "",
        f"Machine: {machine['cpu']['model']}, flags {', '.join(machine['cpu']['flags'])}; {machine['cpu_count']} cores, "
        f"load average at the end {machine['load_average_1_5_15']} (shared machine); torch {machine['torch']}, "
        f"onnxruntime {report['onnxruntime']}.",
        "",
        f"Budget: {args.model} from scratch, {args.epochs} epoch(s) x {args.limit_train_batches:g} of the training "
        f"batches ({steps} optimizer steps, batch {args.batch_size}, {args.precision}, SGD lr {args.lr} cosine), "
        f"`QuantizationAwareTraining(engine=\"{engine.name}\", start={start:g})` (BN frozen at "
        f"{start + 0.6 * (1 - start):g}, observers at {start + 0.8 * (1 - start):g}); {train_s / 60:.1f} min of "
        "training. A small budget: the accuracy itself is far from a full run's; what is measured is whether the "
        "shipped file computes what `trainer.test()` measured.",
        "",
        "| evaluated on | images | top-1 accuracy (%) |",
        "|---|---:|---:|",
        *(f"| {name} | {len(labels)} | {value:.2f} |" for name, value in rows),
        "",
        f"Shipped file vs in-process int8 network: {shipped_acc - int8_acc:+.2f} points, top-1 agreement "
        f"{100 * result.top1_agreement:.2f} % (target: within 0.1 point and >= 99.5 % -> "
        f"{'met' if summary['target_met'] else 'not met'}); largest logit difference {result.max_logit_error:.3g} of "
        f"the logit range. ONNX file {summary['onnx_bytes']:,} bytes."
        + ("" if before is None else f" Without the saturation the file agreed on {100 * before.top1_agreement:.2f} %.")
        + f" The fake-quant model agrees with itself on inputs moved by +-0.001 on {100 * stability:.2f} %: a network "
        "less stable than that flips near-ties under any two implementations' rounding.",
        "",
    ]
    write_results(args.name, report, "\n".join(lines), args.results_dir)


if __name__ == "__main__":
    main()
