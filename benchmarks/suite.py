"""One benchmark suite: every technique side by side on CIFAR-10, same seed and budget, row by row.

Each row is a function building its callbacks from the public API of ``lightning_compress``; the suite
trains ResNet-20 with them (or the network the row names: ResNet-56 for the teacher), tests on the 10,000 test
images and measures the trained network (``suite_measure.py``): params, non-zeros, MACs, packed and deployed artifact
size, onnxruntime CPU latency at batch 1. Rows:

    dense, gmp50, gmp90, gmp90_early, gmp90_kd, nm24, teacher, kd, kd_alpha05, kd_cached, channel50,
    channel50_kd, qat, lowrank, pipeline, pipeline_quarter, channel50_planned, target50, target50_uniform,
    target50_lowrank (Tucker-2 ranks tuned to the same measured latency), target50_factorized (CompressToTarget
    planning widths and Tucker-2 ranks together),
    and issue 24's targets on other networks (run with ``--only``): mobilenetv2_dense,
    {resnet56,mobilenetv2}_target{50,33}[_uniform|_lowrank] (ResNet-56's dense reference is the teacher row),
    {resnet56,mobilenetv2}_target33_int8[_7bit][_uniform] (the int8 QDQ file at a third of the fp32 dense latency;
    _7bit: engine onnxruntime_7bit, for x86 CPUs without VNNI)

Budgets (``--budget``):

* ``smoke``: a few batches of one epoch on whatever ``--data`` holds (the tests pass a tiny generated
  archive); seconds per row, numbers meaningless.
* ``cpu``: 10 epochs (ResNet-56 teacher: 10 too), batch 128, bf16 autocast when the CPU has native
  bf16 (avx512_bf16 / AMX), else fp32 at 5 epochs; about 150 minutes for the table on a 2-core EPYC.
* ``cpu30`` (issue 25): 30 epochs for every row and the ResNet-56 teacher, batch 128, bf16 autocast when
  the CPU has native bf16, else fp32 (still 30 epochs); the rows of ``suite_rows.BLOCK_ROWS`` (KD at
  alpha=0.5). Estimated, not measured as a block: ~36 minutes per dense ResNet-20 row, ~1 h 45 min for
  the teacher, ~1 h 10 min per online-KD row with two rows side by side (~70 s per epoch per process, one
  thread each), about 7 h 40 min for the block's 17 rows with ``--jobs 2`` on an otherwise idle 2-core EPYC
  (beside tests the rows ran ~1.5x longer; ``--plan-only`` prints the plan with each row's estimate).
  ``--accelerator gpu`` trains rows with this recipe on a GPU instead (``device.sh --cpu30 ROWS``: rows side
  by side on a lent GPU, e.g. the teacher or the MobileNetV2 rows); each such row records ``trained_on``, the
  report says so, and the queue counts the teacher wherever it trained.
* ``gpu``: one CUDA GPU, data kept on the device, bf16, 15 epochs, batch 512; ``device.sh`` runs it under
  a deadline, most informative rows first (on an H200 its 8 minutes held nine of the twelve rows).

Every row trains with the shipped recipes' optimizer settings (``recipes/baseline_resnet20.yaml``: SGD
with Nesterov momentum, weight decay, cosine schedule, one warm-up epoch) and reports its deployed
file's own top-1 (onnxruntime) and latency beside the torch network's top-1.

Results are written as they come: one JSON line per row appended to
``<results-dir>/suite_<budget>.jsonl`` (under a lock on that file, so several row processes can write),
then ``RESULTS.md`` (+ ``suite.png``) regenerated atomically from every budget's file, so a stopped run
keeps what it measured. A row already recorded with the same config and the same code version (hash of
the package sources the row uses) is skipped, so the table can be completed over several runs;
``--force`` re-measures. A row in training saves its whole training state after every epoch
(``<partials>/<row>_<budget>_<precision>_<code version>.ckpt``, atomically; ``--partials`` defaults to ``<work-dir>/partial``);
a row stopped midway (the session ended) resumes from there when run again on the same code, and records
``resumed_after_epochs``; the state is removed when the row lands. The state names the machine it trained on
(``core.machine.cpu_description``: CPU model and ISA flags) and resumes only on such a machine: a row's
latencies and plan were measured there. Rows longer than a session (MobileNetV2's, ~5 h) go on across machines
with ``--partials benchmarks/partials``: commit that folder when the session ends, and the next session on the
same kind of CPU resumes the rows; on another CPU the run stops before training, naming both machines.

``--jobs N`` runs N rows side by side, each as its own ``suite.py --only <row> --threads 1`` process
(``suite_queue.py``): the teacher first, the KD rows once it has landed; one line per row start and end
with its wall time, each row's output in ``<work-dir>/logs/``. Stopping it (Ctrl-C) stops its rows;
the same command later runs only what has not landed.

On a shared machine, run the CPU budget with ``--threads 1``: with two torch threads on 2 cores that other
jobs keep busy (load average 7-10), ResNet-20 trained at 0.5-0.75 batches/s (the two threads wait for each
other at every parallel region); one thread trained at 3.8 batches/s under the same load. When the
machine is that busy, ``--epochs N`` shrinks the budget (its rows form their own block).

Run:  python benchmarks/suite.py --budget cpu                      (every row)
      python benchmarks/suite.py --budget cpu --only dense,gmp90     (a subset)
      python benchmarks/suite.py --budget cpu30 --jobs 2             (issue 25's block, two rows at a time)
      python benchmarks/suite.py --budget cpu30 --jobs 2 --plan-only (its plan and estimate, nothing trained)
      python benchmarks/suite.py --budget smoke --data tiny.tar.gz --results-dir /tmp/x
      python benchmarks/suite.py --report                            (re-render RESULTS.md only)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from reporting import RESULTS_DIR, SHARED_CIFAR10, cpu_description, machine_info, yield_to_timing
from lightning_compress.commands.parser import CommandParser
from suite_measure import EXAMPLE, export_function, measure_network
from suite_queue import child_command, plan_lines, plan_queue, run_queue
from suite_report import write_report
from suite_rows import (
    BUDGETS,
    PLANNING_COST,
    REPO,
    ROW_VERSION,
    ROWS,
    Budget,
    Context,
    Skip,
    budget_rows,
    code_version,
    describe,
    optimizer_settings,
    resolve_budget,
    train_steps,
)


# ----------------------------------------------------------------------------------- training
class DeviceBatches:
    """Shuffled batches indexed straight out of tensors that live on the GPU (no loader, no copies)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 with_indices: bool = False) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.with_indices = shuffle, with_indices

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n, device = len(self.labels), self.labels.device
        order = torch.randperm(n, device=device) if self.shuffle else torch.arange(n, device=device)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            batch = (self.images[index], self.labels[index])
            yield (*batch, index) if self.with_indices else batch


def datamodule(data: str, budget: Budget, **kwargs: Any) -> Any:
    """``CIFARDataModule`` for the budget; for ``data_on_device`` its training split is moved to the GPU."""
    from lightning_compress import CIFARDataModule

    class OnDevice(CIFARDataModule):
        def train_dataloader(self):
            train = self.train_set
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            if train.images.device != device:
                train.images, train.labels = train.images.to(device), train.labels.to(device)
            return DeviceBatches(train.images, train.labels, self.batch_size, shuffle=True,
                                 with_indices=self.hparams.with_indices)

    cls = OnDevice if budget.data_on_device else CIFARDataModule
    return cls(root=data, download=False, batch_size=budget.batch_size, val_size=budget.val_size,
               eval_batch_size=256, **kwargs)


def _epoch_clock(row: str) -> Any:
    """A callback printing each finished epoch and its seconds, so a long run's log shows progress."""
    import lightning.pytorch as pl

    class EpochClock(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            print(f"[suite] {row}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                  f"{time.perf_counter() - self.start:.0f} s", flush=True)

    return EpochClock()


MACHINE_KEY = "suite_machine"
"""The checkpoint entry naming the CPU a row trained on (:func:`cpu_description`)."""


def partial_progress(path: Path) -> tuple[int, dict[str, Any] | None]:
    """Epochs the row in the partial state ``path`` has finished, and the CPU it trained on (None: a state saved
    before the CPU was recorded)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["epoch"] + 1, state.get(MACHINE_KEY)


def _epoch_checkpoint(path: Path) -> Any:
    """A callback saving the row's whole training state to ``path`` after every epoch (atomically), so a row
    stopped midway (the session ended, the machine went down) resumes from its last epoch, not from scratch."""
    import lightning.pytorch as pl

    from lightning_compress.core.files import atomic_path

    class EpochCheckpoint(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            with atomic_path(path) as tmp:
                trainer.save_checkpoint(tmp, weights_only=False)

        def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               checkpoint: dict[str, Any]) -> None:
            checkpoint[MACHINE_KEY] = cpu_description()  # a partial resumes only where it trained

    return EpochCheckpoint()


def _trainer(budget: Budget, callbacks: list[Any], precision: str | None = None, fit: bool = True) -> Any:
    import lightning.pytorch as pl

    common = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0, "devices": 1,
              "callbacks": callbacks}
    if not fit:  # every row is tested the same way: fp32 (or int8) on the CPU
        return pl.Trainer(accelerator="cpu", precision="32-true", limit_test_batches=budget.limit_test_batches, **common)
    return pl.Trainer(accelerator=budget.accelerator, precision=precision or budget.precision,
                      benchmark=budget.accelerator == "gpu",  # cuDNN picks its fastest kernels (fixed shapes)
                      max_epochs=budget.epochs, limit_train_batches=budget.limit_train_batches, **common)


def planned_record(callbacks: list[Any]) -> dict[str, Any]:
    """What a ``CompressToTarget`` among ``callbacks`` planned and measured, as ``{"target_plan": ...}`` (empty
    without one): allocation, widths, predicted value, the end-to-end checks, the shipped network's latency and what
    planning cost (seconds of set-up: latency table and calibration; of sensitivity; held-out images)."""
    for callback in callbacks:
        plan = getattr(callback, "plan", None)
        if plan is not None and hasattr(callback, "measured"):
            details = plan.details
            return {"target_plan": {"allocation": details.get("allocation", "sensitivity"), "widths": plan.widths,
                                    "target": plan.as_dict()["target"], "predicted": plan.predicted, "dense": plan.dense,
                                    "sensitivity": plan.sensitivity, "checks": details.get("checks", []),
                                    "shipped": callback.measured,
                                    "planning": {key: details[key] for key in PLANNING_COST if key in details}}}
    return {}


def _test_acc(module: Any, data: Any, budget: Budget) -> float:
    return round(100 * _trainer(budget, [], fit=False).test(module, datamodule=data, verbose=False)[0]["test/acc"], 2)


def _val_acc(module: Any, data: Any, budget: Budget) -> float | None:
    """Top-1 on the validation split (training images held out), measured as ``_test_acc``: a gap to the test
    split that the dense row does not show is a finding (issue 25). None for a budget without one."""
    import lightning.pytorch as pl

    if not budget.val_size:
        return None

    trainer = pl.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=budget.limit_test_batches, devices=1)
    return round(100 * trainer.validate(module, datamodule=data, verbose=False)[0]["val/acc"], 2)


def _autocast_test_acc(module: Any, data: Any, budget: Budget) -> float:
    """Test accuracy with the network run under bf16 autocast on the CPU (how a KD teacher runs)."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_test_batches=budget.limit_test_batches, devices=1)
    return round(100 * trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"], 2)


class Suite:
    """Runs rows of one budget, records each as a JSON line and re-renders the report after each."""

    def __init__(self, budget: Budget, budget_reason: str, data: str, results_dir: Path, work_dir: Path,
                 force: bool = False, side_by_side: int = 1, accelerator: str | None = None,
                 partials: Path | None = None) -> None:
        self.budget, self.budget_reason, self.data = budget, budget_reason, data
        self.accelerator = accelerator or budget.accelerator  # where rows train (--accelerator)
        self.results_dir, self.work_dir, self.force = results_dir, work_dir, force
        self.partials = partials or work_dir / "partial"
        self.side_by_side = side_by_side
        self.jsonl = results_dir / f"suite_{budget.name}.jsonl"
        self.machine = {**machine_info(), "cpu": cpu_description()}

    def config(self, row: str) -> dict[str, Any]:
        """Everything a row's result depends on besides the code: recorded, and compared on rerun."""
        data = self.data if self.budget.name == "smoke" else Path(self.data).name
        config = {"row": row, "budget": asdict(self.budget), "optimizer": optimizer_settings(self.budget),
                  "row_version": ROW_VERSION, "seed": 0, "data": data}
        if self.accelerator != self.budget.accelerator:
            config["trained_on"] = self.accelerator
        return config

    def recorded(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        with open(self.jsonl) as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # not while another row's process is appending its line
            text = f.read()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _is_recorded(self, row: str, any_accelerator: bool = False) -> dict[str, Any] | None:
        """The latest record of ``row`` for this config and code; ``any_accelerator``: wherever it trained."""
        version, config = code_version(ROWS[row].sources), self.config(row)

        def same(recorded: dict[str, Any]) -> bool:
            if any_accelerator:
                return {**recorded, "trained_on": None} == {**config, "trained_on": None}
            return recorded == config

        for record in reversed(self.recorded()):
            if same(record["config"]) and record["code_version"] == version and record["status"] != "failed":
                return record
        return None

    def landed(self, row: str) -> bool:
        """Whether ``row`` is recorded for this config and code (the teacher: and its checkpoint is there,
        trained on any accelerator: a teacher trained on a lent GPU serves the CPU block's KD rows)."""
        if row == "teacher":
            return self._is_recorded(row, any_accelerator=True) is not None and self.teacher_file().exists()
        return self._is_recorded(row) is not None

    def _append(self, record: dict[str, Any]) -> None:
        """Append the row's line and regenerate the report, holding the lock on the JSON lines file: rows
        running side by side in other processes append to the same file."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
            write_report(self.results_dir)

    def partial_file(self, row: str) -> Path:
        """Where ``row`` keeps its training state between epochs, for this budget, precision and code: the bf16
        and fp32 blocks of a budget (CPUs with and without native bf16) carry their states side by side."""
        budget = self.budget
        return self.partials / f"{row}_{budget.name}_{budget.precision}_{code_version(ROWS[row].sources)}.ckpt"

    def foreign_partials(self, rows: list[str]) -> list[str]:
        """One line for each of ``rows`` whose partial state trained on another CPU than this one."""
        def words(cpu: dict[str, Any] | None) -> str:
            return "an unrecorded CPU" if cpu is None else f"{cpu['model']} ({' '.join(cpu['flags'])})"

        lines = []
        for row in rows:
            path = self.partial_file(row)
            if path.exists() and (machine := partial_progress(path)[1]) != self.machine["cpu"]:
                lines.append(f"{row}'s partial state {path} trained on {words(machine)}, this machine is "
                             f"{words(self.machine['cpu'])}: resume it there, or delete it to restart the row here")
        return lines

    def resumed_epochs(self, rows: list[str]) -> dict[str, int]:
        """Epochs already trained by those of ``rows`` that will resume from a partial state."""
        return {row: partial_progress(path)[0] for row in rows if (path := self.partial_file(row)).exists()}

    def teacher_file(self) -> Path:
        """Where the ResNet-56 teacher of this budget and code version is (or will be) saved."""
        budget = self.budget
        return self.work_dir / f"teacher_{budget.name}_{budget.teacher_epochs}ep_{code_version(ROWS['teacher'].sources)}.ckpt"

    def teacher_path(self) -> str:
        """Checkpoint of the suite's ResNet-56 teacher for this budget and code, trained on first need."""
        if not self.teacher_file().exists():
            record = self.run_row("teacher", force=True)
            if record["status"] != "ok":
                raise RuntimeError(f"the teacher could not be trained: {record.get('reason')}")
        return str(self.teacher_file())

    def run_row(self, row: str, force: bool = False) -> dict[str, Any]:
        import lightning.pytorch as pl

        from lightning_compress import ImageClassifier
        from lightning_compress.core.timing_lock import shared_timing
        from lightning_compress.planning.planner import UnreachableTargetError

        previous = None if (force or self.force) else self._is_recorded(row, any_accelerator=row == "teacher")
        if previous is not None and (row != "teacher" or self.teacher_file().exists()):
            print(f"[suite] {row}: recorded for this code and config, kept", flush=True)
            return previous
        budget = self.budget
        epochs = budget.teacher_epochs if row == "teacher" else budget.epochs
        ctx = Context(budget=replace(budget, epochs=epochs), steps=train_steps(budget, epochs),
                      teacher_path=self.teacher_path)
        record: dict[str, Any] = {"row": row, "config": self.config(row), "code_version": code_version(ROWS[row].sources),
                                  "what": describe(row), "budget_reason": self.budget_reason, "machine": self.machine,
                                  "side_by_side": self.side_by_side, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(f"[suite] {row}: start ({budget.name}, {epochs} epochs)", flush=True)
        partial = self.partial_file(row)
        try:
            plan = ROWS[row].plan(ctx)
        except Skip as reason:
            record.update(status="skipped", reason=str(reason))
            self._append(record)
            print(f"[suite] {row}: skipped: {reason}", flush=True)
            return record
        except Exception as err:  # e.g. the teacher could not be trained
            plan = err
        for note in getattr(plan, "notes", ()):  # what the plan decided (tuned ranks), before hours of training
            print(f"[suite] {row}: {note}", flush=True)
        yielding = yield_to_timing()
        try:
            if isinstance(plan, Exception):
                raise plan
            yielding.hold_until_first_step()  # data loading and set-up: not beside another process's timing
            pl.seed_everything(0, workers=True)
            module = ImageClassifier(plan.model, **optimizer_settings(budget), channels_last=True)
            data = datamodule(self.data, budget, **plan.data)
            trainer = _trainer(replace(budget, epochs=epochs, accelerator=self.accelerator),
                               [yielding, *plan.callbacks, _epoch_clock(row), _epoch_checkpoint(partial)],
                               plan.precision)
            if self.accelerator != budget.accelerator:
                record["trained_on"] = torch.cuda.get_device_name() if self.accelerator == "gpu" else self.accelerator
            resume = partial if partial.exists() else None
            if resume is not None:  # fit_s and wall_s then count this process's part only
                record["resumed_after_epochs"] = partial_progress(resume)[0]
                print(f"[suite] {row}: resuming after epoch {record['resumed_after_epochs']} ({resume})", flush=True)
            start = time.perf_counter()
            trainer.fit(module, datamodule=data, ckpt_path=resume)
            fit_s = time.perf_counter() - start
            # the other row's latency measurements wait for this evaluation and export, not timed beside them
            with shared_timing():
                record["precision"] = plan.precision or budget.precision
                int8 = None
                if plan.qat is not None:
                    int8 = export_function("int8_from_qat")(module.model.cpu(), plan.qat.engine,
                                                            (torch.randn(*EXAMPLE),))
                network = module.model
                measured_on = module.model
                if int8 is not None:
                    module.model = int8
                top1 = _test_acc(module, data, budget)
                record["val_top1"] = _val_acc(module, data, budget)
                module.model = measured_on
                # the deployed file's own accuracy, on the same test images
                limit = None if budget.limit_test_batches is None else budget.limit_test_batches * 256
                test = (data.transform(data.test_set.images[:limit], train=False), data.test_set.labels[:limit])
                measured = measure_network(network, int8, getattr(plan.qat, "engine", "x86"), budget.latency_repeats, test)
                measured["measure_notes"] = measured.pop("notes")
                record.update(planned_record(plan.callbacks))
                record.update(status="ok", top1=top1, fit_s=round(fit_s, 1), epochs=epochs, notes=plan.notes, **measured)
                self.work_dir.mkdir(parents=True, exist_ok=True)
                if row == "teacher":
                    record["top1_bf16_autocast"] = _autocast_test_acc(module, data, budget)
                    trainer.save_checkpoint(self.teacher_file(), weights_only=False)
                else:  # kept for questions asked after the row (e.g. the GMP validation/test gap), reloadable alone
                    trainer.save_checkpoint(self.work_dir / f"{row}_{budget.name}_{record['code_version']}.ckpt", weights_only=False)
            record["wall_s"] = round(time.perf_counter() - start, 1)
            record["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
            partial.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the folder goes with its last row's state; others' stay
                partial.parent.rmdir()
        except UnreachableTargetError as err:  # the callback refused the target before training, as designed
            record.update(status="skipped", reason=f"target refused before training: {err}"[:500])
        except Exception as err:  # recorded, so the table says what broke; other rows go on
            record.update(status="failed", reason=f"{type(err).__name__}: {err}"[:500])
            traceback.print_exc()
        finally:
            yielding.release()
        self._append(record)
        print(f"[suite] {row}: {json.dumps({k: record.get(k) for k in ('status', 'top1', 'fit_s', 'reason')})}",
              flush=True)
        return record


def _again(argv: list[str]) -> str:
    """The command that finishes what this run leaves queued: the same, without ``--force``/``--plan-only``."""
    kept = [arg for arg in argv if arg not in ("--force", "--plan-only")]
    return shlex.join(["python", "benchmarks/suite.py", *kept])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=BUDGETS, default="cpu")
    parser.add_argument("--only", default=None,
                        help="comma-separated rows (default: the budget's rows, suite_rows.BLOCK_ROWS, else all)")
    parser.add_argument("--data", default=SHARED_CIFAR10, help="CIFAR-10 in any layout CIFARDataModule reads")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "suite",
                        help="teacher checkpoints and, with --jobs, each row's log")
    parser.add_argument("--partials", type=Path, default=None,
                        help="where rows in training keep their state after each epoch (default: <work-dir>/partial); "
                             "benchmarks/partials, committed, carries unfinished rows to the next session's machine")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; with --jobs: 1 per row)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="rows side by side, each in its own process (a queue: the teacher before the KD rows)")
    parser.add_argument("--plan-only", action="store_true",
                        help="print the queue's plan and estimated finish, train nothing")
    parser.add_argument("--side-by-side", type=int, default=1, help=argparse.SUPPRESS)  # set by the queue, recorded
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the budget's epochs (student and teacher): a machine busier than the "
                             "budget assumes; rows at other epochs form their own block")
    parser.add_argument("--force", action="store_true", help="re-measure rows already recorded")
    parser.add_argument("--data-on-device", action="store_true",
                        help="index training batches out of tensors on the device (the gpu budget's data path; "
                             "on a CPU: the same code path, for the dry run)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default=None,
                        help="train on this instead of the budget's accelerator, with the budget's epochs, batch, "
                             "learning rate and precision (e.g. the cpu30 teacher on a lent GPU); recorded per row, "
                             "testing and latency stay on this machine's CPU")
    parser.add_argument("--report", action="store_true", help="only re-render RESULTS.md from the recorded rows")
    args = parser.parse_args(argv)
    if args.report:
        write_report(args.results_dir)
        return 0
    rows = list(budget_rows(args.budget)) if args.only is None else [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {list(ROWS)}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if (args.jobs or args.plan_only) and args.budget == "gpu":
        parser.error("--jobs and --plan-only are for the CPU budgets (rows side by side on the CPU's cores, "
                     "estimates from CPU timings); the gpu budget runs one row at a time (device.sh)")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget, reason = resolve_budget(args.budget)
    if args.data_on_device:
        budget = replace(budget, data_on_device=True)
    if args.epochs:
        budget = replace(budget, epochs=args.epochs, teacher_epochs=args.epochs)
        reason += f"; {args.epochs} epochs chosen for this run (--epochs)"
    if "gpu" in (budget.accelerator, args.accelerator) and not torch.cuda.is_available():
        parser.error(f"--budget {args.budget}{' --accelerator gpu' if args.accelerator else ''} needs a CUDA device")
    suite = Suite(budget, reason, args.data, args.results_dir, args.work_dir, args.force, args.side_by_side,
                  args.accelerator, args.partials)
    foreign = suite.foreign_partials(rows)
    if foreign:
        parser.error("; ".join(foreign))
    if args.plan_only or args.jobs:
        jobs, threads = args.jobs or 1, args.threads or 1
        if args.plan_only:
            landed, queue = plan_queue(suite, rows)
            for line in plan_lines(budget, queue, landed, jobs, threads, suite.resumed_epochs(queue)):
                print(f"[suite] {line}", flush=True)
            print(f"[suite] run it with: {_again(argv)}", flush=True)
            return 0
        status = run_queue(suite, rows, jobs, threads, lambda row: child_command(args, row, threads, jobs),
                           args.work_dir / "logs", _again(argv))
        write_report(args.results_dir)
        return status
    failed = [row for row in rows if suite.run_row(row)["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
