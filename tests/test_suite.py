"""The benchmark suite (``benchmarks/suite.py``) and the GPU script (``benchmarks/device.sh``) at the smoke budget.

The suite runs as the README runs it (its own process) on a tiny generated JPEG archive in the layout of
the shared CIFAR-10 copy, writing into ``tmp_path``; the checks read the JSON lines and the RESULTS.md it
wrote: the measured values of a ResNet-20 (parameters, MACs, non-zeros after pruning, int8 artifact
smaller than fp32, latencies), not only that files exist. ``device.sh --dry-run`` runs the GPU script's
whole sequence on the CPU. Unit tests cover budgets, code versions, the skip-on-rerun rule, the queue
of ``--jobs`` (with stand-in row processes that append a line in a fraction of a second) and the report's
target and queue lines in-process; one slow test runs ``--jobs 2`` for real.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.data.cifar_fakes import write_image_tree, write_tarball

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESNET20_PARAMS = 272_474
RESNET20_MACS = 40_813_184  # per 32x32 image, convolutions and the classifier
TIMEOUT_S = 300

sys.path.insert(0, str(BENCHMARKS))
import reporting  # (benchmarks/ is not a package: imported from its folder, as the scripts import each other)
import suite
import suite_queue
import suite_report
import suite_rows

BF16 = {"model": "x", "flags": ["avx512_bf16"], "bf16": True}
NO_BF16 = {"model": "x", "flags": ["avx2"], "bf16": False}


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_image_tree(root / "tree", n_train=4, n_test=2, fmt="jpg")
    return write_tarball(root / "tree", root / "cifar10-jpeg.tar.gz")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LIGHTNING_COMPRESS_CACHE": str(tmp_path / "cache")}


def _records(path: Path) -> dict[str, dict]:
    return {r["row"]: r for r in map(json.loads, path.read_text().splitlines())}


def _check_measured_rows(rows: dict[str, dict], markdown: str) -> None:
    dense = rows["dense"]
    assert dense["status"] == "ok" and 0.0 <= dense["top1"] <= 100.0
    assert dense["params"] == dense["nonzero"] == RESNET20_PARAMS
    assert dense["macs"] == RESNET20_MACS
    assert dense["artifact"]["kind"] == "onnx fp32" and dense["artifact"]["bytes"] > 4 * RESNET20_PARAMS
    assert dense["latency_ms"]["ort_fp32"] > 0 and dense["wall_s"] >= dense["fit_s"] > 0
    assert dense["config"]["budget"]["name"] == "smoke" and len(dense["code_version"]) == 12
    assert dense["machine"]["cpu"]["model"]
    qat = rows["qat"]
    assert qat["status"] == "ok" and qat["artifact"]["kind"] in ("onnx int8 (QDQ)", "onnx int8", "torchscript int8")
    assert qat["artifact"]["bytes"] < dense["artifact"]["bytes"] / 2  # int8 weights: about a quarter
    assert set(qat["latency_ms"]) & {"ort_int8", "torchscript_int8"}
    assert 0.0 <= dense["top1_deployed"] <= 100.0 and 0.0 <= qat["top1_deployed"] <= 100.0  # the shipped files
    assert 0.0 <= dense["val_top1"] <= 100.0  # the validation split (held-out training images), beside test
    assert f"| dense | The dense ResNet-20: the reference of every row; top-1 of the deployed onnx fp32 file in " \
           f"onnxruntime: {dense['top1_deployed']:.2f} %; validation split (held-out training images) top-1: " \
           f"{dense['val_top1']:.2f} % | {dense['top1']:.2f} | - | 272,474 | 272,474 | 40.8 | onnx fp32 " in markdown
    assert "## Budget: smoke" in markdown and "Targets (" in markdown and "- QAT int8: " in markdown


def test_suite_smoke_rows(tmp_path: Path, cifar_archive: Path) -> None:
    out = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "benchmarks/suite.py", "--budget", "smoke", "--only", "dense,gmp90,qat,lowrank",
         "--data", str(cifar_archive), "--results-dir", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=BENCHMARKS.parent, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = _records(out / "suite_smoke.jsonl")
    markdown = (out / "RESULTS.md").read_text()
    _check_measured_rows(rows, markdown)
    gmp = rows["gmp90"]
    assert gmp["params"] == RESNET20_PARAMS and gmp["nonzero"] < 0.2 * RESNET20_PARAMS  # stem/classifier kept
    assert gmp["packed_bytes"] < rows["dense"]["packed_bytes"] / 3
    assert all(0 <= row["val_top1"] <= 100 for row in rows.values() if row["status"] == "ok")
    assert all(row["what"] == suite_rows.describe(name) for name, row in rows.items())  # recorded as it was run
    # each row's network is kept and reloads without its callbacks, as sparse as measured
    from lightning_compress import ImageClassifier

    kept = ImageClassifier.load_from_checkpoint(tmp_path / "work" / f"gmp90_smoke_{gmp['code_version']}.ckpt")
    assert sum(int(p.count_nonzero()) for p in kept.model.parameters()) < 0.2 * RESNET20_PARAMS
    lowrank = rows["lowrank"]
    assert lowrank["status"] in ("ok", "skipped")
    if lowrank["status"] == "skipped":
        assert lowrank["reason"].startswith("not available in this code version")
        assert "| lowrank | " in markdown and "skipped: not available in this code version" in markdown
    else:  # what a plan decided is printed when it is made, before the hours of training, not only recorded after
        assert f"[suite] lowrank: {lowrank['notes'][0]}" in completed.stdout
    assert (out / "suite.png").stat().st_size > 10_000


@pytest.mark.slow
def test_jobs_2_runs_rows_side_by_side_and_a_rerun_skips_them(tmp_path: Path, cifar_archive: Path) -> None:
    out = tmp_path / "results"
    command = [sys.executable, "benchmarks/suite.py", "--budget", "smoke", "--jobs", "2", "--only", "dense,kd",
               "--data", str(cifar_archive), "--results-dir", str(out), "--work-dir", str(tmp_path / "work")]
    completed = subprocess.run(command, cwd=BENCHMARKS.parent, env=_env(tmp_path), capture_output=True, text=True,
                               timeout=TIMEOUT_S, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [line.split(" ", 2)[2] for line in completed.stdout.splitlines() if line.startswith("[suite] ")]
    # kd needs the teacher: the queue adds it, runs it beside dense, and starts kd when it has landed
    assert _index(lines, "start teacher") < _index(lines, "start dense") < _index(lines, "end ")
    assert _index(lines, "end teacher: ok") < _index(lines, "start kd")
    assert lines[-1] == "done; every row landed (teacher, dense, kd)"
    rows = _records(out / "suite_smoke.jsonl")
    assert sorted(rows) == ["dense", "kd", "teacher"]
    assert all(r["status"] == "ok" and r["side_by_side"] == 2 and r["machine"]["torch_threads"] == 1
               for r in rows.values())
    assert all(0.0 <= r["top1_deployed"] <= 100.0 for r in rows.values())  # the deployed file's own top-1
    assert (tmp_path / "work/logs/smoke_kd.log").read_text().count("[suite] kd: epoch 1/1") == 1
    markdown = (out / "RESULTS.md").read_text()
    for row in rows:
        assert f"| {row} | " in markdown
    assert "rows run 2 side by side" in markdown
    again = subprocess.run(command, cwd=BENCHMARKS.parent, env=_env(tmp_path), capture_output=True, text=True,
                           timeout=TIMEOUT_S, check=False)
    assert again.returncode == 0 and "landed, kept: teacher, dense, kd" in again.stdout
    assert "nothing to run" in again.stdout and " start " not in again.stdout
    assert len((out / "suite_smoke.jsonl").read_text().splitlines()) == 3


def test_plan_only_prints_the_plan_and_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert suite.main(["--budget", "cpu30", "--jobs", "2", "--plan-only", "--results-dir", str(tmp_path),
                       "--work-dir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    order = re.findall(r"^\[suite\] +\d+ +(\w+) ", printed, flags=re.MULTILINE)
    assert order == list(suite_rows.budget_rows("cpu30"))
    assert "2 rows at a time, 1 torch thread each" in printed and "estimated finish: +" in printed
    assert f"run it with: python benchmarks/suite.py --budget cpu30 --jobs 2 --results-dir {tmp_path} " in printed
    assert list(tmp_path.iterdir()) == []


def test_recorded_row_is_kept_and_changed_code_is_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budget, _ = suite_rows.resolve_budget("smoke")
    runner = suite.Suite(budget, "test", "data.tar.gz", tmp_path, tmp_path / "work")
    record = {"row": "dense", "config": runner.config("dense"), "code_version": suite.code_version(()),
              "status": "ok", "top1": 12.5}
    runner.jsonl.write_text(json.dumps(record) + "\n")
    assert runner.run_row("dense") == record  # same config and code: kept, nothing trained
    assert runner._is_recorded("gmp90") is None  # another row
    other = suite.Suite(budget, "test", "other.tar.gz", tmp_path, tmp_path / "work")
    assert other._is_recorded("dense") is None  # other data: another config
    monkeypatch.setattr(suite, "code_version", lambda sources: "0" * 12)
    assert runner._is_recorded("dense") is None  # changed code: measured again


class _Stopped(Exception):
    pass


def test_a_row_stopped_midway_resumes_after_its_last_epoch(tmp_path: Path, cifar_archive: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """The session ends during the second of two epochs: the rerun restores the state saved after the first,
    trains the second only, and lands the same network as a run never stopped; the saved state is then removed."""
    from dataclasses import replace

    budget = replace(suite_rows.resolve_budget("smoke")[0], epochs=2)
    straight = suite.Suite(budget, "test", str(cifar_archive), tmp_path / "straight", tmp_path / "straight_work")
    assert straight.run_row("dense")["status"] == "ok"
    runner = suite.Suite(budget, "test", str(cifar_archive), tmp_path / "results", tmp_path / "work")
    clock = suite._epoch_clock

    def stopped_in_epoch_two(row):
        callback = clock(row)
        start = callback.on_train_epoch_start

        def on_train_epoch_start(trainer, pl_module):
            if trainer.current_epoch == 1:
                raise _Stopped
            start(trainer, pl_module)

        callback.on_train_epoch_start = on_train_epoch_start
        return callback

    monkeypatch.setattr(suite, "_epoch_clock", stopped_in_epoch_two)
    assert runner.run_row("dense")["status"] == "failed"
    partial = list((tmp_path / "work/partial").glob("dense_smoke_*.ckpt"))
    assert len(partial) == 1 and partial == [runner.partial_file("dense")]
    assert suite.partial_progress(partial[0]) == (1, reporting.cpu_description())  # one epoch, resumes only on this CPU
    monkeypatch.setattr(suite, "_epoch_clock", clock)
    capsys.readouterr()
    record = runner.run_row("dense", force=True)
    printed = capsys.readouterr().out
    assert record["status"] == "ok" and record["resumed_after_epochs"] == 1
    assert "[suite] dense: epoch 2/2" in printed and "epoch 1/2" not in printed
    assert not partial[0].parent.exists()  # the state, and its folder once empty, go when the row lands
    kept = [torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            for path in (tmp_path / f"{folder}/dense_smoke_{record['code_version']}.ckpt"
                         for folder in ("straight_work", "work"))]
    assert kept[0].keys() == kept[1].keys()
    assert all(torch.equal(kept[0][key], kept[1][key]) for key in kept[0])


def test_a_partial_state_from_another_cpu_stops_the_run_before_training(tmp_path: Path, cifar_archive: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A row carried in ``--partials`` (committed, resumed by a later session) resumes only on the CPU it trained
    on: elsewhere the run is one line naming both machines, exit code 2, nothing trained; on its CPU it resumes."""
    from dataclasses import replace

    budget = suite_rows.resolve_budget("smoke")[0]
    carried = tmp_path / "carried"
    runner = suite.Suite(budget, "test", str(cifar_archive), tmp_path / "results", tmp_path / "work", partials=carried)
    state = runner.partial_file("dense")
    assert state.parent == carried
    state.parent.mkdir()
    other = {"model": "Intel(R) Xeon(R) Platinum 8480+", "flags": ["avx2", "avx512f", "amx_tile"], "bf16": True}
    argv = ["--budget", "smoke", "--only", "dense", "--data", str(cifar_archive), "--results-dir",
            str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), "--partials", str(carried)]
    for machine, named in ((other, "Intel(R) Xeon(R) Platinum 8480+ (avx2 avx512f amx_tile)"),
                           (None, "an unrecorded CPU")):
        torch.save({"epoch": 0, suite.MACHINE_KEY: machine}, state)
        with pytest.raises(SystemExit) as stopped:
            suite.main(argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert stopped.value.code == 2 and f"dense's partial state {state} trained on {named}" in error
        assert f"this machine is {reporting.cpu_description()['model']}" in error and "delete it" in error
    assert not (tmp_path / "results").exists()  # nothing trained, nothing recorded
    torch.save({"epoch": 11, suite.MACHINE_KEY: reporting.cpu_description()}, state)
    assert runner.foreign_partials(["dense", "gmp90"]) == []
    assert runner.resumed_epochs(["dense", "gmp90"]) == {"dense": 12}
    # the same row in the budget's other precision (a CPU without native bf16) keeps its own state beside it
    other_block = suite.Suite(replace(budget, precision="bf16-mixed"), "test", str(cifar_archive),
                              tmp_path / "results", tmp_path / "work", partials=carried)
    assert other_block.partial_file("dense").parent == carried and other_block.partial_file("dense") != state
    assert other_block.foreign_partials(["dense"]) == [] and other_block.resumed_epochs(["dense"]) == {}


def test_a_target_refused_before_training_is_recorded_as_skipped(tmp_path: Path, cifar_archive: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl

    from lightning_compress.planning.planner import UnreachableTargetError

    class Refuses(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            raise UnreachableTargetError("latency_ratio=0.1 cannot be reached: ... ask for 0.35 x dense or more")

    monkeypatch.setitem(suite_rows.ROWS, "dense", suite_rows.Row(lambda ctx: suite_rows.Plan(callbacks=[Refuses()])))
    runner = suite.Suite(suite_rows.resolve_budget("smoke")[0], "test", str(cifar_archive), tmp_path, tmp_path / "w")
    record = runner.run_row("dense")
    assert record["status"] == "skipped"
    assert record["reason"].startswith("target refused before training: latency_ratio=0.1 cannot be reached")


def test_code_version_follows_the_row_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("module.py", "pruning/magnitude.py", "quantization/qat.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    monkeypatch.setattr(suite_rows, "PACKAGE", tmp_path)
    version = suite_rows.code_version
    pruning, quantization = version(("pruning",)), version(("quantization",))
    (tmp_path / "quantization/qat.py").write_text("x = 2\n")
    assert version(("pruning",)) == pruning
    assert version(("quantization",)) != quantization
    (tmp_path / "module.py").write_text("x = 3\n")  # a base source: every row changes
    assert version(("pruning",)) != pruning


def test_code_version_follows_imports_not_the_whole_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "lightning_compress"
    files = {"module.py": "from lightning_compress.core.used import x\n", "core/__init__.py": "",
             "core/used.py": "def f():\n    import lightning_compress.core.deep\n", "core/deep.py": "y = 1\n",
             "core/unused.py": "z = 1\n", "__init__.py": "from lightning_compress.core import unused\n"}
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    monkeypatch.setattr(suite_rows, "PACKAGE", package)
    assert [p.relative_to(package).as_posix() for p in suite_rows.source_closure(("module.py",))] == [
        "core/__init__.py", "core/deep.py", "core/used.py", "module.py"]
    before = suite_rows.code_version(())
    (package / "core/unused.py").write_text("z = 2\n")  # imported only by the root's re-exports
    assert suite_rows.code_version(()) == before
    (package / "core/deep.py").write_text("y = 2\n")  # imported inside a function of an imported module
    assert suite_rows.code_version(()) != before


def test_budgets_follow_the_cpu() -> None:
    with_bf16, _ = suite_rows.resolve_budget("cpu", BF16)
    without, reason = suite_rows.resolve_budget("cpu", NO_BF16)
    assert (with_bf16.precision, with_bf16.epochs) == ("bf16-mixed", 10)
    assert (without.precision, without.epochs) == ("32-true", 5) and "no native bf16" in reason
    gpu, _ = suite_rows.resolve_budget("gpu")
    assert gpu.accelerator == "gpu" and gpu.data_on_device
    with pytest.raises(ValueError, match="budget must be one of smoke, cpu, cpu30, gpu, got 'tpu'"):
        suite_rows.resolve_budget("tpu")


def test_cpu30_budget_is_30_epochs_of_the_recipes_training() -> None:
    with_bf16, reason = suite_rows.resolve_budget("cpu30", BF16)
    without, reason_fp32 = suite_rows.resolve_budget("cpu30", NO_BF16)
    for budget in (with_bf16, without):  # 30 epochs either way: only the precision follows the CPU
        assert (budget.epochs, budget.teacher_epochs, budget.batch_size, budget.accelerator) == (30, 30, 128, "cpu")
        assert (budget.limit_train_batches, budget.limit_test_batches, budget.val_size) == (None, None, 5000)
    assert with_bf16.precision == "bf16-mixed" and "native bf16" in reason
    assert without.precision == "32-true" and "no native bf16" in reason_fp32
    assert suite_rows.train_steps(with_bf16, 30) == 352 * 30  # 45,000 images at batch 128
    # every shipped ResNet recipe trains with the settings the suite's rows use
    settings = suite_rows.optimizer_settings(with_bf16)
    assert settings == {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "lr_schedule": "cosine",
                        "warmup": "1ep"}
    recipes = sorted(suite_rows.REPO.glob("recipes/resnet*.yaml")) + [suite_rows.RECIPE]
    assert len(recipes) >= 7 and all(suite_rows.recipe_optimizer(r) == settings for r in recipes)
    runner = suite.Suite(with_bf16, reason, "cifar10-jpeg.tar.gz", Path("/nonexistent"), Path("/nonexistent"))
    assert runner.config("dense")["optimizer"] == settings  # a recipe change re-measures the rows
    # the block's rows: issue 25's list, KD at the alpha the 4-epoch block chose, teacher first
    rows = suite_rows.budget_rows("cpu30")
    assert rows[0] == "teacher" and "kd_alpha05" in rows and "kd" not in rows and "kd_cached" not in rows
    assert set(rows) >= {"dense", "gmp50", "gmp90", "nm24", "channel50", "qat", "lowrank", "pipeline"}
    assert suite_rows.budget_rows("cpu") == tuple(suite_rows.ROWS)


def test_docstring_examples_run() -> None:
    for module in (suite_rows, suite_queue):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_plan_runs_the_teacher_first_and_kd_after_it() -> None:
    budget, _ = suite_rows.resolve_budget("cpu30", BF16)
    queue = suite_queue.queue_order(list(suite_rows.budget_rows("cpu30")))
    estimates = {row: suite_queue.estimate_s(row, budget) for row in queue}
    slots = {slot.row: slot for slot in suite_queue.schedule(queue, estimates, jobs=2)}
    assert set(slots) == set(queue) and slots["teacher"].start_s == 0
    for row in ("kd_alpha05", "pipeline"):
        assert slots[row].start_s >= slots["teacher"].end_s
    for t in {slot.start_s for slot in slots.values()}:  # never more than two at a time
        assert sum(slot.start_s <= t < slot.end_s for slot in slots.values()) <= 2
    assert 6 * 3600 < max(slot.end_s for slot in slots.values()) < 7.5 * 3600  # ~6 h 50 min at ~70 s/epoch
    fp32, _ = suite_rows.resolve_budget("cpu30", NO_BF16)
    assert suite_queue.estimate_s("dense", fp32) > 1.5 * estimates["dense"]
    # a KD row asked for alone queues its teacher first; a landed teacher is not run again
    assert suite_queue.queue_order(["dense", "kd"]) == ["dense", "kd"]
    lines = suite_queue.plan_lines(budget, ["kd"], ["teacher"], jobs=2, threads=1)
    assert "landed, kept: teacher" in lines[1] and re.search(r"1 +kd +teacher", lines[3])
    assert lines[-1].startswith("estimated finish: +1:")
    # a row resuming from its partial state is estimated for the epochs it has left, and says so
    resuming = suite_queue.plan_lines(budget, ["dense"], [], jobs=2, threads=1, resumed={"dense": 20})
    assert resuming[3].endswith("resumes after epoch 20")
    assert suite_queue.estimate_s("dense", budget, done_epochs=20) < 0.4 * estimates["dense"]
    # the columns line up under a row name longer than the header's
    wide = suite_queue.plan_lines(budget, ["mobilenetv2_target33_uniform", "dense"], [], jobs=2, threads=1)
    assert len({line.index(" -") for line in wide[3:5]}) == 1 and wide[2].index("needs") == wide[3].index(" -") + 1
    with pytest.raises(ValueError, match=r"rows \['kd'\] need rows that are neither queued nor landed"):
        suite_queue.schedule(["kd"], {"kd": 1.0}, jobs=2)


STAND_IN = """
import json, pathlib, sys, time
row, spec = sys.argv[1], json.loads(pathlib.Path(sys.argv[2]).read_text())
time.sleep(spec["sleep"].get(row, 0.2))
if row in spec["fail"]:
    sys.exit(3)
if row == "teacher":
    pathlib.Path(spec["teacher_file"]).touch()
with open(spec["jsonl"], "a") as f:
    f.write(json.dumps(spec["records"][row]) + "\\n")
"""


def _queue(tmp_path: Path, rows: list[str], fail: tuple[str, ...] = (), sleep: dict | None = None,
           stale: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """``run_queue`` with stand-in row processes that append the row's record (or exit 3 for ``fail``; for
    ``stale``, a record of other code, as when the package is edited while the row trains)."""
    budget, _ = suite_rows.resolve_budget("smoke")
    runner = suite.Suite(budget, "test", "data.tar.gz", tmp_path / "results", tmp_path / "work")
    (tmp_path / "work").mkdir(exist_ok=True)
    (tmp_path / "results").mkdir(exist_ok=True)
    records = {row: {"row": row, "config": runner.config(row), "status": "ok", "top1": 10.0,
                     "code_version": "0" * 12 if row in stale else suite.code_version(suite_rows.ROWS[row].sources)}
               for row in suite_rows.ROWS}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"records": records, "fail": list(fail), "sleep": sleep or {}, "jsonl": str(runner.jsonl),
                                "teacher_file": str(runner.teacher_file())}))
    lines: list[str] = []
    original, suite_queue.say = suite_queue.say, lines.append
    try:
        status = suite_queue.run_queue(runner, rows, 2, 1, lambda row: [sys.executable, "-c", STAND_IN, row, str(spec)],
                                       tmp_path / "logs", "python benchmarks/suite.py --budget smoke --jobs 2")
    finally:
        suite_queue.say = original
    return status, lines


def _index(lines: list[str], prefix: str) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(prefix))


def test_queue_runs_two_at_a_time_and_kd_after_its_teacher(tmp_path: Path) -> None:
    status, lines = _queue(tmp_path, ["dense", "kd", "gmp90"], sleep={"teacher": 1.0, "dense": 0.2})
    assert status == 0, lines
    # the teacher (needed by kd) and dense start together; gmp90 takes dense's place; kd waits for the teacher
    assert _index(lines, "start teacher") < _index(lines, "start dense") < _index(lines, "end ")
    assert _index(lines, "end dense") < _index(lines, "start gmp90") < _index(lines, "end teacher")
    assert _index(lines, "end teacher") < _index(lines, "start kd")
    assert re.search(r"^end kd: ok, top-1 10\.00 %, wall \d+ s \(estimate 1 min\)$", lines[_index(lines, "end kd")])
    recorded = [json.loads(line)["row"] for line in (tmp_path / "results/suite_smoke.jsonl").read_text().splitlines()]
    assert sorted(recorded) == ["dense", "gmp90", "kd", "teacher"]
    # run again: everything landed, nothing starts
    status, lines = _queue(tmp_path, ["dense", "kd", "gmp90"])
    assert status == 0 and "landed, kept: teacher, dense, kd, gmp90" in lines and "nothing to run" in lines
    assert not [line for line in lines if line.startswith("start ")]


def test_queue_does_not_start_rows_whose_teacher_failed(tmp_path: Path) -> None:
    status, lines = _queue(tmp_path, ["kd", "dense"], fail=("teacher",), stale=("dense",))
    assert status == 1
    assert lines[_index(lines, "end teacher")].startswith("end teacher: failed: exit 3, nothing recorded")
    assert "not started kd: it needs teacher, which did not land" in lines
    assert "start kd" not in "\n".join(lines)
    # a row whose code changed while it ran still ended (its record stands, marked older code)
    assert lines[_index(lines, "end dense")].startswith("end dense: ok, top-1 10.00 %")
    assert "its package sources changed while it ran (recorded for code 000000000000, now " in lines[_index(lines, "end dense")]
    assert lines[-1] == "done; not landed: teacher, kd. Retry with: python benchmarks/suite.py --budget smoke --jobs 2"


def test_report_says_which_cpu30_rows_are_done_and_queued(tmp_path: Path) -> None:
    markdown = suite_report.write_report(tmp_path).read_text()
    assert "## Budget: cpu30" in markdown and "No row has landed yet; estimated " in markdown
    assert "**Done (0 of 17):** none yet. **Queued** (not run, failed, or measured with older code): teacher, dense," \
           in markdown and "`python benchmarks/suite.py --budget cpu30 --jobs 2`" in markdown
    budget, reason = suite_rows.resolve_budget("cpu30", suite_report.BF16_CPU)  # the block BLOCK_ROWS names
    runner = suite.Suite(budget, reason, "cifar10-jpeg.tar.gz", tmp_path, tmp_path / "work", side_by_side=2)
    landed = {"row": "lowrank", "config": runner.config("lowrank"), "status": "skipped", "reason": "not available",
              "code_version": suite.code_version(suite_rows.ROWS["lowrank"].sources), "machine": runner.machine,
              "side_by_side": 2, "budget_reason": reason}
    failed = {**landed, "row": "dense", "status": "failed", "reason": "RuntimeError: x",
              "code_version": suite.code_version(())}
    runner.jsonl.write_text(json.dumps(landed) + "\n" + json.dumps(failed) + "\n")
    markdown = suite_report.write_report(tmp_path).read_text()
    block = markdown[markdown.index("## Budget: cpu30"):]
    assert "No row has landed yet" not in block and "rows run 2 side by side" in block
    assert "**Done (1 of 17):** lowrank. **Queued** (not run, failed, or measured with older code): teacher, dense, " \
           "qat, gmp90, kd_alpha05, gmp90_kd, channel50, channel50_kd, gmp90_early, gmp50, nm24, pipeline, channel50_planned, " \
           "target50, target50_uniform, pipeline_quarter." in block
    assert "| dense | The dense ResNet-20: the reference of every row | failed: RuntimeError: x |" in block
    runner.jsonl.write_text(json.dumps({**failed, "what": "The dense ResNet-20 as a recipe since changed ran it"}) + "\n")
    block = suite_report.write_report(tmp_path).read_text()  # a row is described as it was run, not as it is now
    assert "| dense | The dense ResNet-20 as a recipe since changed ran it | failed: RuntimeError: x |" in block


def test_rows_trained_in_fp32_are_a_block_of_their_own_read_against_their_targets(tmp_path: Path) -> None:
    """The same budget trained in fp32 (a CPU without native bf16) is another block, named so, whichever machine
    renders it; its CompressToTarget pair is read against its target and its uniform baseline with no dense row,
    and a row resumed from its partial checkpoint says its seconds are the last process's."""
    no_bf16 = {"model": "AMD EPYC", "flags": ["avx2"], "bf16": False}
    records = []
    for cpu, top1 in ((suite_report.BF16_CPU, 80.0), (no_bf16, 85.0)):
        budget, reason = suite_rows.resolve_budget("cpu30", cpu)
        runner = suite.Suite(budget, reason, "cifar10-jpeg.tar.gz", tmp_path, tmp_path / "work")
        for row, lead in (("resnet56_target33", 1.0), ("resnet56_target33_uniform", 0.0)):
            shipped = {"measured_ms": 33.0, "dense_ms": 100.0, "prediction_error": -0.01}
            plan = {"target": {"kind": "latency_ratio", "value": 1 / 3}, "predicted": 0.33, "shipped": shipped,
                    "checks": [{"measured": 0.33, "measured_ms": 33.0, "dense_measured_ms": 100.0}]}
            records.append({"row": row, "config": runner.config(row), "status": "ok", "top1": top1 + lead,
                            "params": 1, "nonzero": 1, "macs": 1, "fit_s": 1.0, "wall_s": 2.0, "budget_reason": reason,
                            "artifact": {"kind": "onnx fp32", "bytes": 1000}, "packed_bytes": 500, "machine": runner.machine,
                            "code_version": suite.code_version(suite_rows.ROWS[row].sources), "target_plan": plan,
                            **({"resumed_after_epochs": 12} if cpu is no_bf16 else {})})
    (tmp_path / "suite_cpu30.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    markdown = suite_report.write_report(tmp_path).read_text()
    assert "## Budget: cpu30\n" in markdown and "## Budget: cpu30, 32-true\n" in markdown
    fp32 = markdown[markdown.index("## Budget: cpu30, 32-true"):]
    fp32 = fp32[:fp32.index("## Budget: cpu30\n")] if "## Budget: cpu30\n" in fp32 else fp32
    assert "| resnet56_target33 | " in fp32 and "| 86.00 |" in fp32 and "| 81.00 |" not in fp32
    assert "resumed after epoch 12 from the row's partial checkpoint: fit s and wall s count the last" in fp32
    assert "Targets: not evaluated against dense (no dense row yet)." in fp32
    assert "uniform widths at the same target" in fp32 and "planned +1.00 points above it: met" in fp32


def test_a_block_names_every_machine_its_rows_ran_on(tmp_path: Path) -> None:
    budget, reason = suite_rows.resolve_budget("cpu30")
    runner = suite.Suite(budget, reason, "cifar10-jpeg.tar.gz", tmp_path, tmp_path / "work")
    dense = {"row": "dense", "config": runner.config("dense"), "status": "ok", "top1": 86.0, "params": 272_474,
             "nonzero": 272_474, "macs": 40_000_000, "fit_s": 100.0, "wall_s": 110.0, "budget_reason": reason,
             "artifact": {"kind": "onnx fp32", "bytes": 1_100_000}, "packed_bytes": 800_000,
             "code_version": suite.code_version(suite_rows.ROWS["dense"].sources), "machine": runner.machine}
    xeon = {**runner.machine, "cpu": {"model": "Intel(R) Xeon(R) Processor", "flags": ["avx2", "amx_int8"]}}
    other = {**dense, "row": "channel50", "config": runner.config("channel50"), "machine": xeon,
             "code_version": suite.code_version(suite_rows.ROWS["channel50"].sources)}
    runner.jsonl.write_text(json.dumps(dense) + "\n" + json.dumps(other) + "\n")
    block = suite_report.write_report(tmp_path).read_text()
    first = suite_report._machine(dense)
    assert f"Machine: {first}; Intel(R) Xeon(R) Processor (" in block and " for the rows that say so; load" in block
    line = next(line for line in block.splitlines() if line.startswith("| channel50 |"))
    assert "; ran on Intel(R) Xeon(R) Processor (" in line and "comparable only with rows of that machine" in line
    assert "; ran on " not in next(line for line in block.splitlines() if line.startswith("| dense |"))


def test_a_teacher_trained_on_a_gpu_serves_the_cpu_block_and_says_so(tmp_path: Path) -> None:
    budget, reason = suite_rows.resolve_budget("cpu30")
    on_gpu = suite.Suite(budget, reason, "cifar10-jpeg.tar.gz", tmp_path, tmp_path / "work", accelerator="gpu")
    on_cpu = suite.Suite(budget, reason, "cifar10-jpeg.tar.gz", tmp_path, tmp_path / "work")
    assert on_gpu.config("teacher") == {**on_cpu.config("teacher"), "trained_on": "gpu"}
    assert on_gpu.teacher_file() == on_cpu.teacher_file()
    teacher = {"row": "teacher", "config": on_gpu.config("teacher"), "status": "ok", "top1": 87.0, "params": 855_770,
               "nonzero": 855_770, "macs": 125_485_706, "fit_s": 200.0, "wall_s": 230.0, "trained_on": "NVIDIA H200",
               "code_version": suite.code_version(suite_rows.ROWS["teacher"].sources), "machine": on_gpu.machine,
               "budget_reason": reason}
    on_cpu.jsonl.write_text(json.dumps(teacher) + "\n")
    assert not on_cpu.landed("teacher")  # recorded, but its checkpoint is not here
    on_cpu.teacher_file().parent.mkdir(parents=True)
    on_cpu.teacher_file().write_bytes(b"checkpoint")
    assert on_cpu.landed("teacher") and on_cpu.run_row("teacher") == teacher  # kept: the KD rows use it
    assert on_cpu._is_recorded("teacher") is None  # other rows' records are matched exactly
    args = suite.argparse.Namespace(budget="cpu30", data="d", results_dir=tmp_path, work_dir=tmp_path, epochs=None,
                                    force=False, data_on_device=False, accelerator="gpu", partials=None)
    assert suite_queue.child_command(args, "teacher", 1, 2)[-2:] == ["--accelerator", "gpu"]
    args.partials = tmp_path / "carried"
    command = suite_queue.child_command(args, "teacher", 1, 2)
    assert command[command.index("--partials") + 1] == str(tmp_path / "carried")
    block = suite_report.write_report(tmp_path).read_text()
    assert "| teacher | " in block and "; trained on NVIDIA H200 (this budget's recipe), tested and timed on that " \
           "machine's CPU (" in block and "its latency is not comparable with the other rows'" in block


def test_device_batches_cover_the_split_once_per_epoch() -> None:
    import torch

    images, labels = torch.arange(10).view(10, 1).expand(10, 3), torch.arange(10)
    batches = list(suite.DeviceBatches(images, labels, batch_size=4, shuffle=True, with_indices=True))
    assert len(batches) == len(suite.DeviceBatches(images, labels, 4, True)) == 3
    seen = torch.cat([index for _, _, index in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert all(torch.equal(x[:, 0], y) and torch.equal(y, i) for x, y, i in batches)


def _ok(row: str, top1: float, **extra) -> dict:
    return {"row": row, "status": "ok", "top1": top1, **extra}


def test_targets_say_met_or_not() -> None:
    dense = _ok("dense", 80.0, artifact={"bytes": 1_000_000}, latency_ms={"ort_fp32": 1.0})
    ok = {"dense": dense, "gmp90": _ok("gmp90", 77.5), "qat": _ok("qat", 79.8), "kd": _ok("kd", 79.0),
          "pipeline": _ok("pipeline", 78.0, artifact={"bytes": 90_000}, packed_bytes=50_000,
                          latency_ms={"ort_int8": 0.3})}
    lines = "\n".join(suite_report.targets(ok))
    assert "- GMP 90 %: +2.50 points below dense (limit 2.0): NOT met" in lines
    assert "- QAT int8: +0.20 points below dense (limit 0.3): met" in lines
    assert "- channel pruning, half the MACs: not measured" in lines
    assert "- kd vs student alone: -1.00 points: NOT met" in lines
    assert "- full pipeline: deployed artifact 11.1x smaller than dense's fp32 ONNX (packed weights 20.0x), " \
           "int8 3.33x faster" in lines and lines.endswith("+2.00 points below dense: met")
    # issue 25's limits at cpu30: a GMP fix row is read against GMP's target, low-rank against channel pruning
    ok |= {"gmp90_kd": _ok("gmp90_kd", 78.5), "channel50": _ok("channel50", 79.2, macs=20),
           "lowrank": _ok("lowrank", 78.0, macs=21)}
    lines = "\n".join(suite_report.targets(ok, "cpu30"))
    assert "- channel pruning, half the MACs: +0.80 points below dense (limit 1.0): met" in lines
    assert "  - fix `gmp90_kd` (GMP 90 % as ``gmp90``, recovering with distillation from the ResNet-56 teacher " \
           "(T=4, alpha=0.5)): +1.50 points below dense (limit 2.0): met" in lines
    assert "- low-rank vs channel pruning: +1.20 points below it at 1.05x its MACs (limit 1.0): NOT met" in lines
    assert lines.endswith("+2.00 points below dense: met") and "within 2.5 points" in lines
    ok["pipeline_quarter"] = _ok("pipeline_quarter", 79.0, artifact={"bytes": 80_000}, packed_bytes=40_000,
                                 latency_ms={"ort_int8": 0.25})
    lines = "\n".join(suite_report.targets(ok, "cpu30"))
    assert "  - fix `pipeline_quarter`: deployed artifact 12.5x smaller than dense's fp32 ONNX (packed weights " \
           "25.0x), int8 4.00x faster" in lines and lines.endswith("+1.00 points below dense: met")


def test_target_rows_are_read_against_their_check_and_the_uniform_widths() -> None:
    def target_plan(*measured: float) -> dict:
        return {"predicted": 0.45, "checks": [{"measured": m, "measured_ms": 10 * m, "dense_measured_ms": 10.0}
                                              for m in measured]}

    ok = {"dense": _ok("dense", 80.0), "target50": _ok("target50", 79.0, target_plan=target_plan(0.55, 0.48)),
          "target50_uniform": _ok("target50_uniform", 79.4, target_plan=target_plan(0.5))}
    lines = suite_report.target_lines(ok)
    assert lines == ["- `target50`, CompressToTarget at half the dense latency: planned at 0.450x predicted after 1 "
                     "budget shrink(s) (checks measured 0.550x, 0.480x), measured 0.480x the dense latency (4.8 vs 10 "
                     "ms), +1.00 points below dense (`dense`)",
                     "  - uniform widths at the same target (planned at 0.450x predicted, measured 0.500x the dense "
                     "latency (5 vs 10 ms)): 79.40 %; planned -0.40 points above it: NOT met"]
    assert suite_report.target_lines({"dense": ok["dense"]}) == []
    shipped = {"measured_ms": 5.4, "dense_ms": 10.0, "prediction_error": -0.1}  # 0.54x: above 1.05 x 0.5
    ok["resnet56_target50"] = _ok("resnet56_target50", 78.0, target_plan={
        **target_plan(0.49), "target": {"kind": "latency_ratio", "value": 0.5}, "shipped": shipped})
    lines = suite_report.target_lines(ok)
    assert lines[2] == ("- `resnet56_target50`, CompressToTarget at half the dense latency: planned at 0.450x predicted, "
                        "measured 0.490x the dense latency (4.9 vs 10 ms); shipped 0.540x the dense latency timed "
                        "beside it after fit (ABOVE 1.05x the target), predicted -10.0%")  # no teacher row: no drop
    ok["resnet56_target50"]["target_plan"]["planning"] = {"setup_seconds": 780.7, "sensitivity_seconds": 1475.9,
                                                          "sensitivity_images": 128}
    assert suite_report.target_lines(ok)[2].endswith(
        "predicted -10.0%; planning took 781 s for the latency table and calibration and 1476 s for the sensitivity "
        "on 128 held-out images")


def test_planned_record_keeps_what_compress_to_target_planned_and_measured() -> None:
    from lightning_compress import CompressToTarget
    from lightning_compress.planning import Plan, Target

    callback = CompressToTarget(latency_ratio=0.5, allocation="uniform")
    assert suite.planned_record([callback]) == {}  # nothing planned yet
    callback.plan = Plan(Target("latency_ratio", 0.5), False, {"a": 8}, {"a": 16}, 0.49, 1.0, 0.1,
                         {"allocation": "uniform", "checks": [{"measured": 0.5}], "setup_seconds": 12.5,
                          "sensitivity_seconds": 3.25, "sensitivity_images": 128})
    callback.measured = {"measured_ms": 5.0}
    record = suite.planned_record([object(), callback])["target_plan"]
    assert record["allocation"] == "uniform" and record["widths"] == {"a": 8} and record["shipped"]["measured_ms"] == 5.0
    assert record["target"] == {"kind": "latency_ratio", "value": 0.5} and record["checks"] == [{"measured": 0.5}]
    assert record["planning"] == {"setup_seconds": 12.5, "sensitivity_seconds": 3.25, "sensitivity_images": 128}


@pytest.mark.slow
def test_device_sh_dry_run(tmp_path: Path, cifar_archive: Path) -> None:
    out = tmp_path / "out"
    env = {**_env(tmp_path), "OUT": str(out), "CIFAR10": str(cifar_archive),
           "VIRTUAL_ENV": os.environ.get("VIRTUAL_ENV") or sys.prefix,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(["bash", "benchmarks/device.sh", "--dry-run", "--cpu30", "teacher,dense", "--only",
                                "kd_cached"], cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True,
                               timeout=TIMEOUT_S, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "no install" in completed.stdout and "suite at the smoke budget" in completed.stdout
    # --cpu30 (dry run: the smoke budget): both rows side by side, their records, checkpoints (the teacher's kept
    # for the CPU queue) and logs in the work folder, no partial state left once they landed
    kept = _records(out / "cpu30" / "suite_smoke.jsonl")
    assert sorted(kept) == ["dense", "teacher"] and {r["status"] for r in kept.values()} == {"ok"}
    assert {r["side_by_side"] for r in kept.values()} == {2}
    work = out / "cpu30" / "work"
    assert sorted(p.name for p in work.iterdir()) == [f"dense_smoke_{kept['dense']['code_version']}.ckpt", "logs",
                                                      f"teacher_smoke_1ep_{kept['teacher']['code_version']}.ckpt"]
    assert sorted(p.name for p in (work / "logs").iterdir()) == ["smoke_dense.log", "smoke_teacher.log"]
    rows = _records(out / "suite_smoke.jsonl")
    assert "| kd_cached | " in (out / "RESULTS.md").read_text()
    assert rows["kd_cached"]["config"]["budget"]["data_on_device"] is True  # the gpu budget's data path
    teacher, cached = rows["teacher"], rows["kd_cached"]  # the KD row trained its teacher first
    assert teacher["status"] == "ok" and teacher["params"] > 3 * RESNET20_PARAMS and "top1_bf16_autocast" in teacher
    assert cached["status"] == "ok" and cached["params"] == RESNET20_PARAMS
    assert "pytest exit 0" in completed.stdout or "pytest exit 5" in completed.stdout
    assert (out / "device_pytest.log").exists() and not (out / ".suite_work").exists()


def test_target_rows_plan_each_network_at_its_fraction_with_its_uniform_baseline_beside_it() -> None:
    from lightning_compress import CompressToTarget

    ctx = suite_rows.Context(suite_rows.resolve_budget("smoke")[0], steps=100, teacher_path=lambda: "")
    for planned, (uniform, dense, _) in suite_rows.TARGET_ROWS.items():
        model = "resnet20" if planned.startswith("target") else planned.split("_target")[0]
        percent, _, suffix = planned.rsplit("target", 1)[1].partition("_")
        ratio = {"50": 0.5, "33": 1 / 3}[percent]
        for row, allocation in ((planned, "sensitivity"), (uniform, "uniform")):
            plan = suite_rows.ROWS[row].plan(ctx)
            callback, *qat = plan.callbacks
            assert isinstance(callback, CompressToTarget) and plan.model == model
            assert callback.target == ("latency_ratio", ratio) and callback.allocation == allocation
            assert (callback.batch_size, callback.threads, callback.round_to) == (64, 1, 8)
            assert callback.factorize == (suffix == "factorized" and row == planned)
            # int8 rows ship the QDQ file onnxruntime runs; the suite converts (and tests) the QAT network
            engines = {"int8": ["onnxruntime"], "int8_7bit": ["onnxruntime_7bit"]}.get(suffix, [])
            assert [q.engine.name for q in qat] == engines and plan.qat in (
                *qat, None) and (plan.qat is None) == (not qat)
        assert suite_rows.ROWS[dense].plan(ctx).model == model and not suite_rows.ROWS[dense].plan(ctx).callbacks


def test_lowrank_at_latency_row_tunes_ranks_on_measured_time_and_factorizes_every_layer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The factorization baseline of the target rows: the largest uniform rank fraction measuring within half the
    dense time (here a stand-in clock: a program's bytes), carried out by ``LowRankFactorization`` on every layer
    it selects by default."""
    import lightning.pytorch as pl

    from lightning_compress import ImageClassifier, LowRankFactorization
    from lightning_compress.planning import latency
    from tests.toy import random_loader

    ratios, as_slow_as_dense = [], []

    def timed_programs(programs, runtime, threads, array, repeats, rounds=3):  # time = the program's bytes
        ratios.append(len(programs["factorized"]) / len(programs["dense"]))
        if as_slow_as_dense:
            return {"dense": 10.0, "factorized": 10.0}
        return {name: float(len(program)) for name, program in programs.items()}

    monkeypatch.setattr(latency, "timed_programs", timed_programs)
    ranks, tuned = suite_rows.ranks_at_latency(0.5)
    assert tuned["measured_ratio"] <= 0.5 and tuned["macs_ratio"] <= 0.5 and 0 < tuned["fraction"] < 1
    assert ratios[-1] == tuned["measured_ratio"] and all(r > 0.5 for r in ratios[:-1])  # the largest that met
    assert set(ranks.values()) <= {8, 16, 24, 32, 40, 48, 56, 64}
    ctx = suite_rows.Context(suite_rows.resolve_budget("smoke")[0], steps=100, teacher_path=lambda: "")
    search = suite_rows.ranks_at_latency
    asked = []
    monkeypatch.setattr(suite_rows, "ranks_at_latency",  # searched once, above
                        lambda ratio, model="resnet20": asked.append((ratio, model)) or (ranks, tuned))
    assert suite_rows.ROWS["resnet56_target33_lowrank"].plan(ctx).model == "resnet56"
    plan = suite_rows.ROWS["target50_lowrank"].plan(ctx)
    assert asked == [(1 / 3, "resnet56"), (0.5, "resnet20")] and plan.model == "resnet20"
    (callback,) = plan.callbacks
    assert isinstance(callback, LowRankFactorization) and f"{tuned['fraction']:.2f} of each layer" in plan.notes[0]
    module = ImageClassifier("resnet20", num_classes=4)
    trainer = pl.Trainer(max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, random_loader(n=32, batch_size=8, size=32))
    assert {name: rank for name, (_, rank) in callback._factorized.items()} == ranks
    as_slow_as_dense.append(True)
    with pytest.raises(suite_rows.Skip, match=r"within 0.2x the dense latency; closest: 0\.\d\d of full rank .* "
                                              r"measured 1\.000x \(10\.0 vs 10\.0 ms\)"):
        search(0.2)


def test_a_rows_training_step_waits_while_another_process_measures(tmp_path, monkeypatch):
    """The suite's rows (and deploy_parity's fine-tuning) hold the timing lock shared during each training step: a
    step starting while another process times (a row's planning or fit-end measurement) waits for it, then lets it
    go at step end."""
    from lightning_compress.core.timing_lock import LOCK_ENVIRONMENT, held_mode
    from tests.core.test_timing_lock import hold_in_another_process

    monkeypatch.setenv(LOCK_ENVIRONMENT, str(tmp_path / "timing.lock"))
    callback = reporting.yield_to_timing()
    holder = hold_in_another_process("exclusive", 1.0, tmp_path)
    began = time.perf_counter()
    callback.on_train_batch_start(None, None, None, 0)
    waited = time.perf_counter() - began
    assert held_mode() == "shared"
    callback.on_train_batch_end(None, None, None, None, 0)
    holder.wait()
    assert waited > 0.5 and held_mode() is None


def test_a_rows_evaluation_after_fit_holds_the_timing_lock_shared(tmp_path, cifar_archive, monkeypatch):
    """A row loads its data before fit, and after fit tests, converts, exports and measures its network: another
    process's latency measurement (the other row's checks or fit-end reading) waits for that work instead of timing
    beside it; the hold ends with the row."""
    from lightning_compress.core.timing_lock import LOCK_ENVIRONMENT, held_mode

    monkeypatch.setenv(LOCK_ENVIRONMENT, str(tmp_path / "timing.lock"))
    seen = []

    def recording(call):
        def recorded(*args, **kwargs):
            seen.append(held_mode())
            return call(*args, **kwargs)
        return recorded

    for name in ("datamodule", "_test_acc", "_val_acc"):
        monkeypatch.setattr(suite, name, recording(getattr(suite, name)))
    runner = suite.Suite(suite_rows.resolve_budget("smoke")[0], "test", str(cifar_archive), tmp_path / "results",
                         tmp_path / "work")
    assert runner.run_row("dense")["status"] == "ok"
    assert seen == ["shared", "shared", "shared"] and held_mode() is None


def test_crowded_row_names_are_spread_a_line_apart_around_where_they_belong() -> None:
    wanted = [10.0, 11.0, 12.0, 50.0, 11.5]
    runs = suite_report._spread(wanted, gap=9.0)
    position = {member: start + rank * 9.0 for members, start in runs for rank, member in enumerate(members)}
    assert position[3] == 50.0  # alone: where it belongs
    crowded = sorted(position[i] for i in (0, 1, 4, 2))
    assert [round(b - a, 9) for a, b in zip(crowded, crowded[1:])] == [9.0, 9.0, 9.0]
    assert sum(crowded) / 4 == pytest.approx(sum(wanted[i] for i in (0, 1, 4, 2)) / 4)  # centred on them
    assert [position[i] for i in (0, 1, 4, 2)] == crowded  # in their order
