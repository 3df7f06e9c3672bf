"""Accuracy of the shipped int8 file: the QDQ ONNX model that ``QuantizationAwareTraining(engine="onnxruntime")``
puts in place, run by onnxruntime on every test image, beside the fake-quant model it was built from.

A network is trained on CIFAR-10 (``ImageClassifier``, SGD + cosine, ``CIFARDataModule``) with fake-quantization
from ``--qat-start`` on, for a small budget (this is about the file's fidelity to its QAT model, not about reaching
the network's best accuracy). The QAT model is then converted as at fit end (``QuantizationAwareTraining.convert``:
QDQ ONNX, checked on a calibration batch) and both are evaluated on the whole test split:

* the fake-quant model (frozen copy, fp32 on CPU: the numerics QAT trained with),
* the QDQ ONNX model in onnxruntime (the file a deployment ships), directly and through ``trainer.test()``,
* top-1 agreement between the two and the largest logit difference.

Issue 14's target: the ONNX model's accuracy within 0.1 point of the QAT model's.

Run:  python benchmarks/deploy_accuracy.py                        (resnet20, 1 epoch, bf16-mixed, shared CIFAR-10)
      python benchmarks/deploy_accuracy.py --epochs 2 --qat-start 0.5
Writes ``benchmarks/results/deploy_accuracy.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import time

import torch

from reporting import SHARED_CIFAR10, add_output_arguments, machine_info, run_settings, write_results
from lightning_compress.core.comparison import parity
from lightning_compress.core.onnx import OnnxRuntimeNetwork


def evaluate(network: torch.nn.Module, data, batches: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``network`` on the test split (normalized as the datamodule does), and the labels."""
    logits, labels = [], []
    with torch.no_grad():
        for index, (images, targets) in enumerate(data.test_dataloader()):
            if batches is not None and index >= batches:
                break
            logits.append(network(data.transform(images, train=False)).float())
            labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
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
    from lightning_compress.quantization.prepare import frozen_copy

    torch.set_num_threads(args.threads)
    pl.seed_everything(0)
    data = CIFARDataModule(args.data, download=False, batch_size=args.batch_size, val_size=0,
                           eval_batch_size=args.eval_batch_size)
    model = ImageClassifier(args.model, num_classes=10, lr=args.lr)
    start = args.qat_start
    qat = QuantizationAwareTraining(engine="onnxruntime", start=start, freeze_bn=start + 0.6 * (1 - start),
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
    began = time.perf_counter()
    shipped = qat.convert(model, calibration)  # what fit end does: QDQ ONNX in place, checked on one batch
    convert_s = time.perf_counter() - began
    if not isinstance(shipped, OnnxRuntimeNetwork):
        raise RuntimeError("the QAT model was not converted to the ONNX model (see the warning above)")
    reference_logits, labels = evaluate(fake_quant, data, args.limit_test_batches)
    onnx_logits, _ = evaluate(shipped, data, args.limit_test_batches)
    result = parity(reference_logits, onnx_logits, labels, tolerance=0.0)
    tested = pl.Trainer(precision="32-true", limit_test_batches=args.limit_test_batches, **options).test(
        model, data, verbose=False)[0]["test/acc"]  # what trainer.test() prints after QAT: the shipped file's
    fq_acc, onnx_acc = 100 * result.reference_accuracy, 100 * result.accuracy
    summary = {
        "images": len(labels), "optimizer_steps": steps, "train_seconds": round(train_s, 1),
        "convert_seconds": round(convert_s, 1), "onnx_bytes": len(shipped.model_bytes()),
        "fake_quant_accuracy": fq_acc, "onnx_accuracy": onnx_acc, "trainer_test_accuracy": 100 * float(tested),
        "difference_points": onnx_acc - fq_acc, "top1_agreement": result.top1_agreement,
        "max_logit_error": result.max_logit_error, "target_met": abs(onnx_acc - fq_acc) <= 0.1,
    }
    print(summary, flush=True)
    report = {"machine": machine_info(), "settings": run_settings(args), "result": summary,
              "onnxruntime": __import__("onnxruntime").__version__}
    machine = report["machine"]
    lines = [
        "# Deployed int8 file vs its QAT model: accuracy on the CIFAR-10 test split",
        "",
        f"Machine: {machine['cpu']['model']}, flags {', '.join(machine['cpu']['flags'])}; {machine['cpu_count']} cores, "
        f"load average at the end {machine['load_average_1_5_15']} (shared machine); torch {machine['torch']}, "
        f"onnxruntime {report['onnxruntime']}.",
        "",
        f"Budget: {args.model} from scratch, {args.epochs} epoch(s) x {args.limit_train_batches:g} of the training "
        f"batches ({steps} optimizer steps, batch {args.batch_size}, {args.precision}, SGD lr {args.lr} cosine), "
        f"`QuantizationAwareTraining(engine=\"onnxruntime\", start={start:g})` (BN frozen at "
        f"{start + 0.6 * (1 - start):g}, observers at {start + 0.8 * (1 - start):g}); {train_s / 60:.1f} min of "
        "training. A small budget: the accuracy itself is far from a full run's; what is measured is whether the "
        "shipped file keeps the QAT model's accuracy.",
        "",
        "| evaluated on | images | top-1 accuracy (%) |",
        "|---|---:|---:|",
        f"| QAT model (fake-quant, fp32 on CPU) | {len(labels)} | {fq_acc:.2f} |",
        f"| shipped QDQ ONNX (`model_int8.onnx`, onnxruntime CPU) | {len(labels)} | {onnx_acc:.2f} |",
        f"| the same via `trainer.test()` after conversion | {len(labels)} | {100 * float(tested):.2f} |",
        "",
        f"Difference: {onnx_acc - fq_acc:+.2f} points (target: within 0.1 -> "
        f"{'met' if summary['target_met'] else 'not met'}); top-1 agreement {100 * result.top1_agreement:.2f} %; "
        f"largest logit difference {result.max_logit_error:.3g} of the logit range. ONNX file "
        f"{summary['onnx_bytes']:,} bytes.",
        "",
    ]
    write_results(args.name, report, "\n".join(lines), args.results_dir)


if __name__ == "__main__":
    main()
