"""RESULTS.md and suite.png from the suite's recorded rows (``suite_<budget>.jsonl``), with the issue's targets.

The markdown is regenerated from the JSON lines after every row, atomically; hand-written analysis
lives in ``suite_notes.md`` beside it and is included verbatim.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from suite_queue import duration, estimate_s, queue_order, schedule
from suite_rows import (BLOCK_ROWS, PLANNING_COST, ROW_VERSION, TARGET_ROWS, budget_rows, describe,
                        resolve_budget)

from lightning_compress.core.files import atomic_path, write_text_atomic

BUDGET_ORDER = ("cpu30", "gpu", "cpu", "smoke")
LIMITS: dict[str, dict[str, float]] = {
    "cpu": {"gmp90": 2.0, "channel50": 1.5, "qat": 0.3, "lowrank": 1.0, "pipeline": 3.0},
    "cpu30": {"gmp90": 2.0, "channel50": 1.0, "qat": 0.3, "lowrank": 1.0, "pipeline": 2.5},  # issue 25
}
"""Points below dense (low-rank: below channel pruning) each target allows, per budget (others: ``cpu``'s)."""
FIXES = {"gmp90": ("gmp90_kd", "gmp90_early"), "channel50": ("channel50_kd", "channel50_planned"), "pipeline": ("pipeline_quarter",)}
"""Rows that try to fix a row's miss, read against the same target."""


BF16_CPU = {"model": "a CPU with native bf16", "flags": [], "bf16": True}
"""The CPU block titles are read against, whichever machine renders them: a budget as resolved there is the default."""


def block_title(budget: dict[str, Any]) -> str:
    """A block's name: the budget's name, with its epochs and its precision where they differ from the budget's on
    a CPU with native bf16 (``cpu30, 32-true``: rows trained in fp32 on a CPU without it are a block of their own).
    """
    default = resolve_budget(budget["name"], BF16_CPU)[0]
    title = budget["name"]
    if (budget["epochs"], budget["teacher_epochs"]) != (default.epochs, default.teacher_epochs):
        title += f", {budget['epochs']} epochs"
    return title if budget["precision"] == default.precision else f"{title}, {budget['precision']}"


def load_rows(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Recorded rows by block (one per distinct budget, newest block first within a budget name): the
    latest record of each row, in the suite's row order."""
    from suite_rows import ROWS

    blocks: dict[str, list[dict[str, Any]]] = {}
    for budget in BUDGET_ORDER:
        path = results_dir / f"suite_{budget}.jsonl"
        if not path.exists():
            continue
        latest: dict[str, dict[str, dict[str, Any]]] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                key = json.dumps(record["config"]["budget"], sort_keys=True)
                latest.setdefault(key, {})[record["row"]] = record
        for key in reversed(list(latest)):
            rows = latest[key]
            blocks[block_title(json.loads(key))] = [rows[row] for row in ROWS if row in rows]
    return blocks


def _current(record: dict[str, Any]) -> bool:
    from suite_rows import ROWS, code_version

    return record["row"] in ROWS and code_version(ROWS[record["row"]].sources) == record["code_version"]


def _kb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e3:,.0f}"


def _what(record: dict[str, Any]) -> str:
    """The row as it was run: the description recorded with it, else (records from before it was kept) today's."""
    return record.get("what") or describe(record["row"])


def _machine(record: dict[str, Any]) -> str:
    m = record["machine"]
    cpu = m.get("cpu", {})
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{cpu.get('model', m.get('processor'))} ({m.get('cpu_count')} CPUs; {' '.join(cpu.get('flags', []))})"
            f"{gpu}, torch {m.get('torch')}")


def _other_machines(rows: list[dict[str, Any]]) -> list[str]:
    """The machines rows of a block ran on besides the first row's (rows trained on a GPU say where on their own)."""
    others = [_machine(r) for r in rows if not r.get("trained_on") and _machine(r) != _machine(rows[0])]
    return list(dict.fromkeys(others))


def _loads(rows: list[dict[str, Any]]) -> str:
    loads = [r["load_average_1_5_15"][0] for r in rows if r.get("load_average_1_5_15")]
    return "-" if not loads else f"{min(loads):g}" if len(loads) == 1 else f"{min(loads):g} to {max(loads):g}"


def _latency(record: dict[str, Any]) -> tuple[str, str]:
    lat = record.get("latency_ms", {})
    fp32 = f"{lat['ort_fp32']:.3f}" if "ort_fp32" in lat else "-"
    mark = "¹" if record.get("measure_notes") else ""
    if "ort_int8" in lat:
        return fp32, f"{lat['ort_int8']:.3f} (ORT{mark})"
    if "torchscript_int8" in lat:
        return fp32, f"{lat['torchscript_int8']:.3f} (TorchScript{mark})"
    return fp32, "-"


def _side_by_side(rows: list[dict[str, Any]]) -> str:
    counts = sorted({r.get("side_by_side", 1) for r in rows})
    return "" if counts == [1] else f"; rows run {' or '.join(map(str, counts))} side by side (one process each)"


def queue_status(name: str, rows: list[dict[str, Any]]) -> list[str]:
    """Which of the budget's rows (``suite_rows.BLOCK_ROWS``) have landed and which are queued, and the
    command that runs the queued ones (rows that landed are skipped by it)."""
    done = [r["row"] for r in rows if r["status"] in ("ok", "skipped") and _current(r)
            and r["config"].get("row_version") == ROW_VERSION]
    queued = [row for row in budget_rows(name) if row not in done]
    if not queued:
        return [f"**All {len(done)} rows of this block have landed.**"]
    return [(f"**Done ({len(done)} of {len(done) + len(queued)}):** {', '.join(done) or 'none yet'}. "
             f"**Queued** (not run, failed, or measured with older code): {', '.join(queued)}. "
             f"Run them with `python benchmarks/suite.py --budget {name} --jobs 2` (rows that landed are kept).")]


def render_queued_block(name: str) -> list[str]:
    """A block of ``BLOCK_ROWS`` with no row recorded yet: its budget as this machine resolves it, the
    queue, and the command that runs it."""
    budget, reason = resolve_budget(name)
    queue = queue_order(budget_rows(name))
    finish = max(s.end_s for s in schedule(queue, {row: estimate_s(row, budget) for row in queue}, jobs=2))
    return [f"## Budget: {name}", "",
            (f"Seed 0, batch {budget.batch_size}, {budget.epochs} epochs (teacher {budget.teacher_epochs}), training "
             f"precision {budget.precision} on {budget.accelerator} as this machine resolves it ({reason}). "
             f"No row has landed yet; estimated {duration(finish)} with two rows side by side (an estimate from "
             "per-epoch timings, not a measurement: `--plan-only` prints the plan)."), "",
            *queue_status(name, [])]


def render_block(budget: str, rows: list[dict[str, Any]]) -> list[str]:
    """One markdown table for one budget."""
    ok = {r["row"]: r for r in rows if r["status"] == "ok"}
    dense = ok.get("dense")
    b = rows[0]["config"]["budget"]
    lines = [f"## Budget: {budget}", "",
             f"Seed 0, batch {b['batch_size']}, {b['epochs']} epochs (teacher {b['teacher_epochs']}), "
             f"training precision {b['precision']} on {b['accelerator']}"
             + (", data on the device" if b.get("data_on_device") else "")
             + (f", {b['limit_train_batches']} batches/epoch" if b.get("limit_train_batches") else "")
             + f"; {rows[0].get('budget_reason', '')}. Tested on the CPU "
             + ("(all 10,000 test images)" if not b.get("limit_test_batches") else f"({b['limit_test_batches']} test batches)")
             + ", int8 rows with the converted int8 network.",
             f"Machine: {_machine(rows[0])}"
             + "".join(f"; {other} for the rows that say so" for other in _other_machines(rows))
             + f"; load average (1 min) after each row: {_loads(rows)}"
             + _side_by_side(rows) + ".", "",
             *([*queue_status(budget, rows), ""] if budget in BLOCK_ROWS else []),
             "| row | what | top-1 % | Δ vs dense | params | non-zeros | MMACs | deployed artifact kB | "
             "packed kB | ORT fp32 ms | int8 ms | fit s | wall s | code |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        code = r["code_version"] + ("" if _current(r) else " (older code)")
        if r["status"] != "ok":
            lines.append(f"| {r['row']} | {_what(r)} | {r['status']}: {r.get('reason', '')} "
                         "| | | | | | | | | | | " + code + " |")
            continue
        delta = "-" if dense is None or r["row"] == "dense" else f"{r['top1'] - dense['top1']:+.2f}"
        fp32, int8 = _latency(r)
        art = r.get("artifact", {})
        what = _what(r) + "".join(f"; {n}" for n in r.get("notes", []))
        if r.get("trained_on"):
            what += (f"; trained on {r['trained_on']} (this budget's recipe), tested and timed on that machine's CPU "
                     f"({_machine(r)}): its latency is not comparable with the other rows'")
        elif _machine(r) != _machine(rows[0]):
            what += f"; ran on {_machine(r)}: its latency is comparable only with rows of that machine"
        if r.get("resumed_after_epochs"):
            what += (f"; resumed after epoch {r['resumed_after_epochs']} from the row's partial checkpoint: fit s and "
                     "wall s count the last process's part only")
        if "top1_deployed" in r:
            what += f"; top-1 of the deployed {r['artifact']['kind']} file in onnxruntime: {r['top1_deployed']:.2f} %"
        if r.get("val_top1") is not None:
            what += f"; validation split (held-out training images) top-1: {r['val_top1']:.2f} %"
        lines.append(f"| {r['row']} | {what} | {r['top1']:.2f} | {delta} | {r['params']:,} | {r['nonzero']:,} | "
                     f"{r['macs'] / 1e6:.1f} | {art.get('kind', '-')} {_kb(art.get('bytes'))} | "
                     f"{_kb(r.get('packed_bytes'))} | {fp32} | {int8} | {r['fit_s']:.0f} | {r['wall_s']:.0f} | {code} |")
    teacher = ok.get("teacher")
    if teacher and "top1_bf16_autocast" in teacher:
        lines += ["", f"Teacher (ResNet-56) test top-1: {teacher['top1']:.2f} % in fp32, "
                  f"{teacher['top1_bf16_autocast']:.2f} % under bf16 autocast (how it runs inside a bf16 student step)."]
    notes = sorted({n for r in rows for n in r.get("measure_notes", [])})
    if notes:
        lines += ["", "¹ What this code version could not deploy, and what was measured instead: " + "; ".join(notes)]
    lines += ["", *targets(ok, b["name"])]
    return lines


def targets(ok: dict[str, dict[str, Any]], budget: str = "cpu") -> list[str]:
    """The issue's relative targets for ``budget`` (:data:`LIMITS`), met or not, from this block's rows."""
    dense = ok.get("dense")
    if dense is None:  # CompressToTarget rows are read against their target and their uniform baseline
        compress = target_lines(ok)
        return ["Targets: not evaluated against dense (no dense row yet).", *([""] if compress else []), *compress]
    limits = LIMITS.get(budget, LIMITS["cpu"])

    def drop(row: str) -> float | None:
        return None if row not in ok else dense["top1"] - ok[row]["top1"]

    def verdict(d: float | None, limit: float) -> str:
        return "not measured" if d is None else f"{d:+.2f} points below dense (limit {limit}): " \
                                                 f"{'met' if d <= limit else 'NOT met'}"

    out = [f"Targets ({target_text(limits)}):", ""]
    for row, label in (("gmp90", "GMP 90 %"), ("channel50", "channel pruning, half the MACs"), ("qat", "QAT int8")):
        out.append(f"- {label}: {verdict(drop(row), limits[row])}")
        out += [f"  - fix `{fix}` ({describe(fix)}): {verdict(drop(fix), limits[row])}"
                for fix in FIXES.get(row, ()) if fix in ok]
    for row in ("kd", "kd_alpha05", "kd_cached"):
        d = drop(row)
        if d is not None:
            out.append(f"- {row} vs student alone: {-d:+.2f} points: {'met' if d < 0 else 'NOT met'}")
    if "lowrank" in ok and "channel50" in ok:
        gap = ok["channel50"]["top1"] - ok["lowrank"]["top1"]
        macs = ok["lowrank"]["macs"] / ok["channel50"]["macs"]
        out.append(f"- low-rank vs channel pruning: {gap:+.2f} points below it at {macs:.2f}x its MACs "
                   f"(limit {limits['lowrank']}): {'met' if gap <= limits['lowrank'] else 'NOT met'}")
    out += target_lines(ok)
    if "pipeline" not in ok:
        out.append("- full pipeline: not measured")
    for row in ("pipeline", *FIXES["pipeline"]):
        pipe = ok.get(row)
        if pipe is None:
            continue
        smaller = dense["artifact"]["bytes"] / pipe["artifact"]["bytes"]
        packed = dense["artifact"]["bytes"] / pipe["packed_bytes"]
        lat = pipe["latency_ms"]
        int8_ms = lat.get("ort_int8", lat.get("torchscript_int8"))
        faster = dense["latency_ms"]["ort_fp32"] / int8_ms if int8_ms else None
        d = drop(row)
        met = smaller >= 10 and faster is not None and faster >= 3 and d <= limits["pipeline"]
        label = "- full pipeline" if row == "pipeline" else f"  - fix `{row}`"
        out.append(f"{label}: deployed artifact {smaller:.1f}x smaller than dense's fp32 ONNX (packed "
                   f"weights {packed:.1f}x), int8 {'-' if faster is None else f'{faster:.2f}x'} faster than dense on "
                   f"onnxruntime fp32 (batch 1, 1 thread; the two rows' latencies measured at their own times), "
                   f"{d:+.2f} points below dense: {'met' if met else 'NOT met'}")
    return out


def target_lines(ok: dict[str, dict[str, Any]]) -> list[str]:
    """Each CompressToTarget row (:data:`~suite_rows.TARGET_ROWS`) against its target (the plan's last end-to-end
    check, and the shipped network timed beside the dense one after fit: issue 24 asks <= 1.05x the target) and
    against the uniform widths planned for the same measured target (planned accuracy >= uniform's)."""
    def check(row: dict[str, Any]) -> str:
        plan = row["target_plan"]
        last = plan["checks"][-1] if plan["checks"] else None
        if last is None:
            return "no end-to-end check"
        shrinks = "" if len(plan["checks"]) == 1 else (
            f" after {len(plan['checks']) - 1} budget shrink(s) (checks measured "
            + ", ".join(f"{c['measured']:.3f}x" for c in plan["checks"]) + ")")
        text = (f"planned at {plan['predicted']:.3f}x predicted{shrinks}, measured {last['measured']:.3f}x the dense "
                f"latency ({last['measured_ms']:.3g} vs {last['dense_measured_ms']:.3g} ms)")
        shipped = plan.get("shipped") or {}
        if "dense_ms" in shipped:
            ratio = shipped["measured_ms"] / shipped["dense_ms"]
            within = ratio <= 1.05 * plan["target"]["value"]
            text += (f"; shipped {ratio:.3f}x the dense latency timed beside it after fit "
                     f"({'within' if within else 'ABOVE'} 1.05x the target), predicted {shipped['prediction_error']:+.1%}")
        cost = plan.get("planning") or {}
        if all(key in cost for key in PLANNING_COST):  # recorded by rows since stop 47
            text += (f"; planning took {cost['setup_seconds']:.0f} s for the latency table and calibration and "
                     f"{cost['sensitivity_seconds']:.0f} s for the sensitivity on {cost['sensitivity_images']} "
                     "held-out images")
        return text

    out = []
    for name, (uniform_name, dense_name, words) in TARGET_ROWS.items():
        planned, dense = ok.get(name), ok.get(dense_name)
        if planned is None or "target_plan" not in planned:
            continue
        below = "" if dense is None else f", {dense['top1'] - planned['top1']:+.2f} points below dense (`{dense_name}`)"
        out.append(f"- `{name}`, CompressToTarget at {words} the dense latency: {check(planned)}{below}")
        uniform = ok.get(uniform_name)
        if uniform is not None and "target_plan" in uniform:
            lead = planned["top1"] - uniform["top1"]
            out.append(f"  - uniform widths at the same target ({check(uniform)}): {uniform['top1']:.2f} %; planned "
                       f"{lead:+.2f} points above it: {'met' if lead >= 0 else 'NOT met'}")
    return out


def target_text(limits: dict[str, float]) -> str:
    """The targets in words, for the block's heading line."""
    return (f"GMP 90 % within {limits['gmp90']} points of dense; channel pruning at half the MACs within "
            f"{limits['channel50']}; QAT within {limits['qat']}; KD above the student trained alone; low-rank within "
            f"{limits['lowrank']} of channel pruning at equal MACs; full pipeline >= 10x smaller and >= 3x faster "
            f"than dense within {limits['pipeline']} points")


def plot(blocks: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Accuracy vs compressed size (deployed artifact, and packed weights), one panel per budget (their accuracies
    are not comparable), each row's name beside its deployed artifact without overlapping another's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = {budget: [r for r in rows if r["status"] == "ok" and r["row"] != "teacher"]
              for budget, rows in blocks.items()}
    panels = {budget: rows for budget, rows in panels.items() if rows}  # a block of failed rows has nothing to plot
    columns = min(2, max(1, len(panels)))
    lines = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(6.5 * columns, 5.2 * lines), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (budget, ok) in zip(axes.flat, panels.items()):
        ax.scatter([r["artifact"]["bytes"] / 1e3 for r in ok], [r["top1"] for r in ok], color="C0",
                   label="deployed artifact")
        ax.scatter([r["packed_bytes"] / 1e3 for r in ok], [r["top1"] for r in ok], facecolors="none",
                   edgecolors="C1", label="packed weights (int8 + bitmask, lzma)")
        for r in ok:  # a row's two sizes joined: how much its deployed file leaves on the table
            ax.plot([r["packed_bytes"] / 1e3, r["artifact"]["bytes"] / 1e3], [r["top1"], r["top1"]], color="C0",
                    alpha=0.25, linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("compressed size (kB, log)")
        ax.set_ylabel("CIFAR-10 test top-1 (%)")
        ax.set_title(budget, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.12)  # room for the names right of the largest artifacts
        _label_rows(fig, ax, ok)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Accuracy vs size, a panel per budget (ResNet-20 unless a row names its network)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def _label_rows(fig: Any, ax: Any, rows: list[dict[str, Any]], fontsize: int = 7) -> None:
    """Name each row beside its deployed artifact; names that would overlap (their horizontal spans overlap and they
    sit closer than a line apart) are spread apart vertically as little as possible, around where they belong."""
    fig.canvas.draw()  # fixes the axes' limits, so that data maps to display coordinates
    to_points = 72 / fig.dpi
    line = fontsize * 1.3
    points = [(r["artifact"]["bytes"] / 1e3, r["top1"]) for r in rows]
    anchors = [ax.transData.transform(point) * to_points for point in points]
    spans = sorted((x + 3, x + 3 + 0.6 * fontsize * len(r["row"]), i) for i, ((x, _), r) in enumerate(zip(anchors, rows)))
    groups: list[list[int]] = []  # names whose horizontal spans overlap, directly or through others
    right = -math.inf
    for left, end, index in spans:
        if left >= right:
            groups.append([])
        groups[-1].append(index)
        right = max(right, end)
    offsets = {}
    for group in groups:
        for members, start in _spread([anchors[i][1] + 3 for i in group], line):
            for rank, member in enumerate(members):
                offsets[group[member]] = start + rank * line - anchors[group[member]][1]
    for index, point in enumerate(points):
        ax.annotate(rows[index]["row"], point, fontsize=fontsize, xytext=(3, offsets[index]),
                    textcoords="offset points", va="bottom",
                    arrowprops={"arrowstyle": "-", "alpha": 0.3, "linewidth": 0.5} if abs(offsets[index]) > line else None)


def _spread(wanted: list[float], gap: float) -> list[tuple[list[int], float]]:
    """Positions at least ``gap`` apart, in the order of ``wanted``, each run of crowded ones centred on where it
    wants to be (pooled adjacent violators). Returns ``[(indices into wanted, lowest position)]``, one per run."""
    runs: list[tuple[list[int], float]] = []
    for index in sorted(range(len(wanted)), key=wanted.__getitem__):
        members, start = [index], wanted[index]
        while runs and runs[-1][1] + gap * len(runs[-1][0]) > start:
            previous, _ = runs.pop()
            members = previous + members
            start = sum(wanted[m] - gap * rank for rank, m in enumerate(members)) / len(members)
        runs.append((members, start))
    return runs


def write_report(results_dir: Path) -> Path:
    """Regenerate ``RESULTS.md`` (and ``suite.png``) in ``results_dir`` from every budget's rows."""
    blocks = {budget: rows for budget, rows in load_rows(results_dir).items() if rows}
    lines = ["# Results: every technique side by side (benchmarks/suite.py)", "",
             "Generated by `python benchmarks/suite.py` from `suite_<budget>.jsonl` after every row; one block per "
             "budget, every row of a block on the shared CIFAR-10 copy with the same seed and budget. "
             "Δ is in points against the block's dense ResNet-20. *Deployed artifact*: the file a deployment "
             "runs (fp32 ONNX; int8 rows: the QDQ int8 ONNX, else the int8 ONNX of the converted model, else the int8 TorchScript file, as labelled). *Packed*: the weights as "
             "bitmask of non-zeros + int8 values, lzma (`export.write_packed`), where sparsity shows. Latency: "
             "median at batch 1, one thread. *fit s*: training; *wall s*: training + test + measurements. "
             "*code*: hash of the package sources the row depends on; a rerun re-measures rows whose code changed.", ""]
    if blocks and plot(blocks, results_dir / "suite.png"):
        lines += ["![accuracy vs compressed size](suite.png)", ""]
    for name in BLOCK_ROWS:  # declared blocks nothing has landed in yet: what is queued
        if name not in blocks:
            lines += [*render_queued_block(name), ""]
    for budget, rows in blocks.items():
        lines += [*render_block(budget, rows), ""]
    notes = results_dir / "suite_notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    path = results_dir / "RESULTS.md"
    write_text_atomic(path, "\n".join(lines))
    return path
