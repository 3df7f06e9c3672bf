"""Wall time and test accuracy of the README's quickstart command, from a cold data cache.

Runs ``lightning-compress fit --config recipes/quickstart.yaml`` exactly as the README does (from the
repository root), with an empty data cache so the one-time archive extraction and decoding are
included, and logs into a temporary folder. Records the wall time, the int8 model's test accuracy
printed at the end, and the machine's load. Arguments after ``--`` are appended to the command (and
recorded with it), e.g. to run the same pipeline on other data or at a smaller budget.

Run:
    python benchmarks/quickstart_time.py
    python benchmarks/quickstart_time.py --name quickstart_small -- --trainer.max_epochs=1
Writes ``benchmarks/results/quickstart_time.{json,md}`` (or ``--results-dir``/``--name``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reporting import add_output_arguments, machine_info, write_results
from lightning_compress.commands.parser import CommandParser

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["lightning-compress", "fit", "--config", "recipes/quickstart.yaml"]


def run_quickstart(workdir: Path, extra: list[str]) -> tuple[float, str]:
    """Run the quickstart with an empty cache under ``workdir``; return wall seconds and its output.

    Args:
        workdir: Temporary folder for the data cache and the logs.
        extra: Arguments appended to the command.

    Raises:
        RuntimeError: If the command fails; the message ends with the end of its output.
    """
    env = {**os.environ, "LIGHTNING_COMPRESS_CACHE": str(workdir / "cache")}
    executable = Path(sys.executable).with_name("lightning-compress")
    command = [str(executable), *COMMAND[1:], f"--trainer.logger.init_args.save_dir={workdir / 'runs'}",
               *extra]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    output = completed.stdout + completed.stderr
    if completed.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {completed.returncode}:\n{output[-4000:]}")
    return time.perf_counter() - start, output


def main() -> None:
    parser = CommandParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extra", nargs="*", metavar="ARG",
                        help="arguments appended to the command, after `--` (e.g. -- --data.root=DIR)")
    add_output_arguments(parser, "quickstart_time")
    args = parser.parse_args()
    load_before = [round(value, 2) for value in os.getloadavg()]
    workdir = Path(tempfile.mkdtemp(prefix="quickstart-"))
    try:
        seconds, output = run_quickstart(workdir, args.extra)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    match = re.search(r"test/acc[\s│|]+([0-9.]+)", output)  # plain or rich table
    result = {
        "machine": {**machine_info(), "load_average_before": load_before},
        "command": " ".join([*COMMAND, *args.extra]),
        "cache": "cold (archive extracted and decoded during the run)",
        "wall_seconds": round(seconds, 1),
        "test_acc_int8": float(match.group(1)) if match else None,
    }
    markdown = (
        "# Quickstart wall time\n\n"
        f"`{result['command']}` from the repository root, cold data cache: **{seconds / 60:.1f} min** "
        f"({seconds:.0f} s); test accuracy of the int8, 50 %-sparse ResNet-20: {result['test_acc_int8']}.\n\n"
        f"Machine: {result['machine']}\n"
    )
    print(markdown)
    write_results(args.name, result, markdown, directory=args.results_dir)


if __name__ == "__main__":
    main()
