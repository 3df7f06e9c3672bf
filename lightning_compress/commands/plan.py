"""``lightning-compress plan CHECKPOINT --latency-ms X``: the per-group channel plan for a target, without training.

Traces the checkpoint's network, calibrates the latency model on the runtime (per-layer table + the dense
and narrowest networks measured end to end), measures each channel group's sensitivity on validation
batches, plans, then builds the planned network, measures it end to end and prints the plan with the
predicted and measured latency and the held-out top-1 of the planned network before fine-tuning.
``--out`` writes it all as JSON (``CompressToTarget`` carries such a plan out while training). ``--factorize``
plans Tucker-2 ranks of the ``k x k`` convolutions beside the widths, built and measured the same way
(``CompressToTarget(factorize=True)`` carries them out).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_compress.commands.checkpoint import load_checkpoint
from lightning_compress.commands.held_out import add_held_out_arguments, held_out_batches
from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.files import write_text_atomic
from lightning_compress.core.layers import weighted_layers
from lightning_compress.planning.callback import default_table_file
from lightning_compress.planning.latency import RUNTIMES
from lightning_compress.planning.planner import ALLOCATIONS, Target
from lightning_compress.planning.ranks import planned_copy
from lightning_compress.planning.target import TargetPlanner, timed_engines
from lightning_compress.planning.widths import reestimate_norms


def _top1(network: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        correct = sum(int((network.eval()(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def main(argv: Sequence[str]) -> int:
    """Plan the channel widths of a checkpoint's network for one target; print and optionally write the plan.

    Args:
        argv: Command-line arguments after ``plan``.

    Returns:
        The exit status.
    """
    parser = CommandParser(
        prog="lightning-compress plan",
        description="Plan per-group channel widths that meet a latency (on the deployment runtime), size or MACs "
                    "target while losing the least held-out output fidelity; print the plan, its predicted and "
                    "measured latency, and the planned network's top-1 before fine-tuning.")
    parser.add_argument("checkpoint", help="ImageClassifier checkpoint (.ckpt) of the float network")
    targets = parser.add_mutually_exclusive_group(required=True)
    targets.add_argument("--latency-ms", type=float, help="milliseconds per batch on --runtime")
    targets.add_argument("--latency-ratio", type=float, help="fraction of the dense network's latency, in (0, 1)")
    targets.add_argument("--size-kb", type=float, help="kilobytes of weights as shipped")
    targets.add_argument("--macs-ratio", type=float, help="fraction of the dense MACs, in (0, 1)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    parser.add_argument("--deploy-batch-size", type=int, default=1, help="the deployment's batch size")
    parser.add_argument("--threads", type=int, default=1, help="the deployment's inference threads")
    parser.add_argument("--int8", action="store_true", help="plan for the int8 network a QAT run ships (QDQ ONNX; "
                                                           "for executorch the xnnpack engine's program)")
    parser.add_argument("--engine", choices=sorted({*timed_engines("onnxruntime"), *timed_engines("executorch")}),
                        default=None, help="the QAT engine of that int8 network (implies --int8; default: onnxruntime, "
                                           "xnnpack for executorch); onnxruntime_7bit keeps onnxruntime's fast "
                                           "int8 kernels exact on x86 CPUs without VNNI")
    parser.add_argument("--round-to", type=int, default=8, help="widths are multiples of this")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default="sensitivity",
                        help="sensitivity: channels traded between groups around the uniform widths; uniform: one kept "
                             "fraction for every group (the baseline); greedy: narrowed from dense by sensitivity")
    parser.add_argument("--factorize", action="store_true",
                        help="also plan Tucker-2 ranks of the kxk convolutions, where the latency and fidelity they "
                             "save beat narrower channels")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per latency measurement")
    parser.add_argument("--table", default=None, help="latency table cache (JSON; default under "
                                                      "$LIGHTNING_COMPRESS_CACHE or ~/.cache/lightning_compress)")
    parser.add_argument("--out", default=None, help="write the plan and measurements as JSON here")
    add_held_out_arguments(parser, batches=2)
    args = parser.parse_args(argv)
    target = Target.from_arguments(latency_ms=args.latency_ms, latency_ratio=args.latency_ratio,
                                   size_kb=args.size_kb, macs_ratio=args.macs_ratio)
    for name in ("deploy_batch_size", "threads", "round_to", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.engine is not None and args.engine not in timed_engines(args.runtime):
        raise ValueError(f"--engine must be one of {timed_engines(args.runtime)} with --runtime {args.runtime}, "
                         f"got {args.engine!r}")
    loaded = load_checkpoint(args.checkpoint)
    if loaded.metadata["quantization"] is not None:
        raise ValueError(f"{args.checkpoint} is quantization-aware; plan from the float checkpoint trained before "
                         "quantization (pass --int8 to plan for the int8 network)")
    batches = held_out_batches(args)
    network = loaded.network.eval()
    example = batches[0][0][:1]
    classifier = [name for name in weighted_layers(network) if isinstance(network.get_submodule(name), nn.Linear)][-1:]
    table = Path(args.table) if args.table else default_table_file(args.runtime, args.deploy_batch_size, args.threads)
    planner = TargetPlanner(network, example, target, args.runtime, args.deploy_batch_size, args.threads,
                            args.int8 or args.engine is not None, args.round_to, classifier, table, args.repeats,
                            [x for x, _ in batches], args.engine)
    plan = planner.plan(network, [x for x, _ in batches], allocation=args.allocation, factorize=args.factorize)
    planned = planned_copy(network, example, plan.widths, plan.ranks)
    reestimate_norms(planned, [x for x, _ in batches])  # scored as the plan's sensitivity scores its cuts
    result = {"plan": plan.as_dict(),
              "held_out_top1": {"dense": _top1(network, batches), "planned_before_fine_tuning": _top1(planned, batches),
                                "images": sum(len(y) for _, y in batches)}}
    print(plan.render())
    if planner.latency is not None:
        check, unit = plan.details["checks"][-1], plan.target.unit
        result["measured_ms"] = {"planned": check["measured_ms"], "dense": check["dense_measured_ms"],
                                 "prediction_error": plan.details["prediction_error"]}
        print(f"latency on {args.runtime} (batch {args.deploy_batch_size}, {args.threads} thread(s)), measured "
              f"beside the dense network: predicted {check['predicted']:.4g} {unit}, measured {check['measured']:.4g} "
              f"{unit} ({plan.details['prediction_error']:+.1%}); planned {check['measured_ms']:.4g} ms, dense "
              f"{check['dense_measured_ms']:.4g} ms; target {'met' if plan.details['met'] else 'MISSED'} after "
              f"{len(plan.details['checks'])} check(s)")
    top1 = result["held_out_top1"]
    print(f"held-out top-1 on {top1['images']} images: dense {top1['dense']:.4f}, planned before fine-tuning "
          f"{top1['planned_before_fine_tuning']:.4f} (its batch-norm statistics re-estimated on those images; "
          "CompressToTarget fine-tunes while it removes channels)")
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0
