"""Runs scripts in forks of one process that has imported torch, Lightning and the package once.

Started as ``python script.py``, each benchmark script of the tests would first spend seconds importing torch
and Lightning. This process (:class:`ScriptForks` starts it) imports them once; then, for each request read from
its standard input (one JSON line: ``{"argv", "cwd", "env", "out", "timeout"}``), it forks, and the child runs
``argv[0]`` as ``python argv[0] argv[1:]`` would: as ``__main__``, with that ``sys.argv``, the script's folder
first on ``sys.path``, that environment and working directory, and its standard output and error going to the
file ``out``. The reply, one JSON line on standard output, is ``{"returncode"}``: the script's exit status, or
minus the signal that ended it (SIGKILL after ``timeout`` seconds). The process ends when its input closes.

It must be started with the environment variables that are read when torch loads (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path


def _exit_code(code: object) -> int:
    """The process exit status ``sys.exit(code)`` gives (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_script(argv: list[str], cwd: str, env: dict[str, str], out: str) -> int:
    """In the forked child: run the script as ``python`` would; its exit status."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    output = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.argv = list(argv)
    sys.path[0] = str(Path(argv[0]).resolve().parent)
    try:
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    atexit._run_exitfuncs()
    return code


def serve() -> None:
    """Answer requests from standard input until it closes (see the module docstring)."""
    import lightning.pytorch  # noqa: F401 - imported once here, inherited by every fork
    import torch  # noqa: F401

    import lightning_compress  # noqa: F401
    from tests.forked import in_child

    for line in iter(sys.stdin.readline, ""):
        request = json.loads(line)
        code = in_child(_run_script, request["argv"], request["cwd"], request["env"], request["out"],
                        timeout=request["timeout"])
        print(json.dumps({"returncode": code}), flush=True)


class ScriptForks:
    """The forking process, from the test's side.

    Args:
        env: Its environment (also what torch reads when it loads).
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)

    def run(self, argv: list[str], cwd: Path | str, env: dict[str, str], timeout: float,
            out: Path) -> subprocess.CompletedProcess:
        """Run one script in a fork; its exit status, and its standard output and error (together) as ``stdout``.

        Args:
            argv: The script's path, then its arguments.
            cwd: Its working directory.
            env: Its environment.
            timeout: Seconds until it is SIGKILLed.
            out: The file its output is written to.
        """
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "out": str(out), "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError(f"the forking process ended (exit status {self.process.wait()})")
        return subprocess.CompletedProcess(argv, json.loads(reply)["returncode"], Path(out).read_text(), "")

    def close(self) -> None:
        """End the process (its input closes)."""
        self.process.stdin.close()
        self.process.wait(timeout=60)


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not tests/ (each fork puts its script's)
    serve()
