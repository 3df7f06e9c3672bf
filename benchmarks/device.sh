#!/usr/bin/env bash
# The whole GPU check on a machine with one CUDA GPU (sized for an H200), under an 8-minute deadline:
#   1. a venv (unless one is active): torch==2.14.1 torchvision==0.29.1, then the package with [test];
#   2. pytest -m gpu (the tests that need a CUDA device);
#   3. benchmarks/suite.py at the gpu budget (data kept on the GPU), stopped at the deadline: rows are
#      recorded one by one, so what finished is kept and a rerun completes the table.
# Results: benchmarks/results/ (suite_gpu.jsonl, RESULTS.md, suite.png), or $OUT/ when OUT is set; the
# pytest log and the suite log go beside them (device_pytest.log, device_suite.log).
#
# Usage: benchmarks/device.sh [--dry-run] [--only ROW,ROW] [--deadline SECONDS] [--cpu30 ROW,ROW] [--cpu30-teacher]
#   --dry-run   on a CPU: no GPU needed, the suite at the smoke budget (data still indexed "on the device",
#               i.e. the same code path on the CPU); the install is skipped when a venv is already active.
#   --only      rows of the suite at the gpu budget (default: all, the most informative first; "" for none).
#   --cpu30     first train these rows of the cpu30 budget here, with that budget's recipe (30 epochs, batch 128,
#               bf16) on the GPU, all side by side (suite.py --budget cpu30 --accelerator gpu --jobs N), within the
#               deadline: e.g. issue 24's MobileNetV2 rows (mobilenetv2_dense, mobilenetv2_target50[_uniform],
#               mobilenetv2_target33[_uniform]), ~9 h each on a 2-core CPU. Records go to
#               $results/cpu30/suite_cpu30.jsonl, checkpoints and each row's log to $CPU30_WORK; a row the
#               deadline stops keeps its state of its last epoch in $CPU30_WORK/partial/ and resumes from it when
#               run again with that folder on a machine with the same CPU model and ISA flags (the state names
#               the one it trained on; suite.py --work-dir or --partials). Appended to
#               benchmarks/results/suite_cpu30.jsonl (and the teacher's checkpoint copied to runs/suite/ on the
#               CPU machine, for the CPU queue's KD rows), the records join the CPU-trained ones. With --dry-run:
#               the smoke budget on the CPU.
#   --cpu30-teacher  --cpu30 teacher (the cpu30 block's ResNet-56 teacher).
# Environment: CIFAR10 (the data; default: the first of ../shared/data/cifar10-jpeg.tar.gz,
#   shared/data/cifar10-jpeg.tar.gz, .cache/cifar10-jpeg.tar.gz -- .cache/ is git-ignored, so a copy there
#   can travel to a device machine as a carried path), OUT, CPU30_WORK (default: $results/cpu30/work; a carried
#   folder with an earlier call's partial/ resumes its rows).
# On an image with torch preinstalled and no package index (the lent H200, 2026-12-04): put its venv first
# on PATH and set VIRTUAL_ENV to it (no install then), bring what it lacks as wheels on PYTHONPATH, e.g.
#   export PATH=/opt/torch/.venv/bin:$PATH VIRTUAL_ENV=/opt/torch/.venv
#   python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl   # torch-pruning, torchdata,
#   export PYTHONPATH=/tmp/site:$PWD                                             # jsonargparse + its two deps
#   CIFAR10=.cache/cifar10-jpeg.tar.gz bash benchmarks/device.sh
# Each row records the torch it ran with.
set -euo pipefail
started=$SECONDS
cd "$(dirname "$0")/.."

dry_run=0
deadline=480
cpu30_rows=""
rows="dense,gmp90,qat,teacher,kd,channel50,pipeline,gmp50,nm24,kd_alpha05,kd_cached,lowrank"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --only) rows="$2"; shift ;;
    --deadline) deadline="$2"; shift ;;
    --cpu30) cpu30_rows="$2"; shift ;;
    --cpu30-teacher) cpu30_rows="teacher" ;;
    *) echo "device.sh: unknown argument $1 (use --dry-run, --only ROWS, --deadline SECONDS, --cpu30 ROWS, --cpu30-teacher)" >&2
       exit 2 ;;
  esac
  shift
done

results="${OUT:-benchmarks/results}"
mkdir -p "$results"
data="${CIFAR10:-}"
if [ -z "$data" ]; then
  for candidate in ../shared/data/cifar10-jpeg.tar.gz shared/data/cifar10-jpeg.tar.gz .cache/cifar10-jpeg.tar.gz; do
    if [ -e "$candidate" ]; then data="$candidate"; break; fi
  done
fi
if [ -z "$data" ]; then
  echo "device.sh: no CIFAR-10 found; set CIFAR10=<path> (any layout CIFARDataModule reads)" >&2
  exit 2
fi
say() { echo "[device.sh $((SECONDS - started))s] $*"; }

if [ -z "${VIRTUAL_ENV:-}" ]; then
  say "installing into .venv-device"
  # --system-site-packages: a machine that has torch preinstalled (and no index) still gets a working venv
  python3 -m venv --system-site-packages .venv-device
  # shellcheck disable=SC1091
  . .venv-device/bin/activate
  python -m pip install -q --upgrade pip || true
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
  python -m pip install -q -e '.[test]'
else
  say "using the active venv $VIRTUAL_ENV (no install)"
fi
python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
EOF

if [ "$dry_run" = 1 ]; then
  budget=smoke
  suite_args=(--budget smoke --data-on-device)
else
  budget=gpu
  suite_args=(--budget gpu)
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'device.sh: no CUDA device (use --dry-run on a CPU)')"
fi

if [ -n "$cpu30_rows" ]; then
  if [ "$dry_run" = 1 ]; then cpu30_args=(--budget smoke); else cpu30_args=(--budget cpu30 --accelerator gpu); fi
  IFS=, read -ra cpu30_list <<< "$cpu30_rows"
  left=$((deadline - (SECONDS - started) - 10))
  say "cpu30 rows $cpu30_rows side by side (${cpu30_args[*]}), at most ${left}s"
  cpu30_status=0
  timeout --signal=TERM --kill-after=30 "$left" \
    python benchmarks/suite.py "${cpu30_args[@]}" --only "$cpu30_rows" --jobs "${#cpu30_list[@]}" --data "$data" \
    --results-dir "$results/cpu30" --work-dir "${CPU30_WORK:-$results/cpu30/work}" \
    > "$results/device_cpu30.log" 2>&1 || cpu30_status=$?
  grep '^\[suite\]' "$results/device_cpu30.log" || tail -n 5 "$results/device_cpu30.log"
  say "cpu30 rows: exit $cpu30_status (124: stopped at the deadline, each row's last epoch kept)"
  if [ $((deadline - (SECONDS - started))) -lt 60 ]; then
    say "deadline reached: pytest -m gpu and the $budget budget's rows not run"
    if [ "$cpu30_status" = 124 ]; then exit 0; fi
    exit "$cpu30_status"
  fi
fi

say "pytest -m gpu"
pytest_status=0
# only the files that hold gpu tests: a device image without the optional runtimes (torchao, ExecuTorch,
# import-linter) still collects them; its own options (no pyproject addopts: the image may lack pytest-xdist)
mapfile -t gpu_tests < <(grep -rlE "pytest\.mark\.gpu" tests --include='*.py' | sort)
python -m pytest -o addopts="" -m gpu -q -p no:cacheprovider "${gpu_tests[@]}" > "$results/device_pytest.log" 2>&1 || pytest_status=$?
tail -n 3 "$results/device_pytest.log"
# exit 5: no test selected (nothing marked gpu); anything else non-zero is a failure, reported at the end

if [ -z "$rows" ]; then
  say "done: pytest exit $pytest_status, no rows at the $budget budget (--only \"\"), results in $results"; exit 0
fi
left=$((deadline - (SECONDS - started) - 10))
if [ "$left" -lt 30 ]; then
  say "no time left for the suite (deadline ${deadline}s)"; exit 1
fi
say "suite at the $budget budget, rows $rows, at most ${left}s"
suite_status=0
timeout --signal=TERM --kill-after=10 "$left" \
  python benchmarks/suite.py "${suite_args[@]}" --only "$rows" --data "$data" --results-dir "$results" \
  --work-dir "$results/.suite_work" > "$results/device_suite.log" 2>&1 || suite_status=$?
grep '^\[suite\]' "$results/device_suite.log" || true
python benchmarks/suite.py --report --results-dir "$results"
rm -rf "$results/.suite_work"
say "done: pytest exit $pytest_status, suite exit $suite_status (124: stopped at the deadline), results in $results"
if [ "$pytest_status" != 0 ] && [ "$pytest_status" != 5 ]; then exit 1; fi
if [ "$suite_status" != 0 ] && [ "$suite_status" != 124 ]; then exit 1; fi
exit 0
