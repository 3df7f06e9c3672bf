"""The runtimes an export ships to: which artifact each runs, which checkpoints it takes, what it needs installed.

``lightning-compress export --runtime ...`` names runtimes; :func:`select_artifacts` turns them into the artifacts
to write, and refuses, in one line, a runtime that cannot take the checkpoint (naming the engines to train with)
or is not installed (naming the pip command). Without ``--runtime`` an export writes every installed runtime
that takes the checkpoint and is built by default.

Example:
    >>> select_artifacts(["onnxruntime"], engine=None)
    ('packed', 'onnx_fp32', 'onnx_int8')
    >>> select_artifacts(["aoti"], engine="x86")
    Traceback (most recent call last):
    ...
    ValueError: runtime 'aoti' cannot run an int8 checkpoint of engine 'x86'; train with engine='x86_inductor', or export with --runtime onnxruntime openvino torch
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_compress.core.executorch import EXECUTORCH_EXTRA
from lightning_compress.core.onnx import EXPORT_EXTRA, MissingExtraError
from lightning_compress.export.openvino import OPENVINO_EXTRA
from lightning_compress.quantization.engines import ONNX_ENGINES, TORCH_ENGINES

ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


@dataclass(frozen=True)
class Runtime:
    """One runtime an export can ship to.

    Attributes:
        name: What ``--runtime`` takes.
        artifacts: The artifacts it runs (``fp32`` and ``int8`` forms where they differ).
        int8_engines: The engines whose int8 checkpoints it runs.
        packages: Python packages the export needs to build and check its artifact.
        install: How to get them.
        fp32: Whether it runs fp32 checkpoints.
        defaults: The checkpoints an export without ``--runtime`` builds it for: engines of int8 checkpoints,
            ``None`` for fp32 ones.
    """

    name: str
    artifacts: tuple[str, ...]
    int8_engines: tuple[str, ...]
    packages: tuple[str, ...] = ()
    install: str = ""
    fp32: bool = True
    defaults: tuple[str | None, ...] = ()

    def installed(self) -> bool:
        """Whether every package it needs can be imported.

        Returns:
            True if so.
        """
        return all(importlib.util.find_spec(package) is not None for package in self.packages)

    def takes(self, engine: str | None) -> bool:
        """Whether it runs a checkpoint of ``engine`` (None: fp32).

        Args:
            engine: The checkpoint's int8 engine, or None.

        Returns:
            True if so.
        """
        return self.fp32 if engine is None else engine in self.int8_engines

    def by_default(self, engine: str | None) -> bool:
        """Whether an export without ``--runtime`` builds it for a checkpoint of ``engine`` (None: fp32).

        Args:
            engine: The checkpoint's int8 engine, or None.

        Returns:
            True if so.
        """
        return engine in self.defaults


_FX = (*TORCH_ENGINES, *ONNX_ENGINES)
RUNTIME_TABLE: dict[str, Runtime] = {runtime.name: runtime for runtime in (
    Runtime("onnxruntime", ("onnx_fp32", "onnx_int8"), _FX, ONNX_PACKAGES, EXPORT_EXTRA, defaults=(None, *_FX)),
    Runtime("openvino", ("openvino",), _FX, ("openvino", *ONNX_PACKAGES), OPENVINO_EXTRA, defaults=(None, *_FX)),
    Runtime("aoti", ("aoti",), ("x86_inductor",), defaults=("x86_inductor",)),
    Runtime("executorch", ("executorch",), ("xnnpack",), ("executorch",), EXECUTORCH_EXTRA, defaults=("xnnpack",)),
    Runtime("torch", ("torchscript_int8",), TORCH_ENGINES, fp32=False),
)}
"""Every runtime, by name: onnxruntime and OpenVINO run the same ONNX file; AOTInductor a ``.pt2`` package and
ExecuTorch a ``.pte`` program (fp32, or the int8 graph of their PT2E engine; slow to build, so fp32 checkpoints get
them only when asked); torch the int8 TorchScript model of torch's own engines (deprecated by torch; when asked)."""
RUNTIMES: tuple[str, ...] = tuple(RUNTIME_TABLE)


def select_artifacts(runtimes: Sequence[str] | None, engine: str | None) -> tuple[str, ...]:
    """The artifacts an export writes for ``runtimes`` (packed weights always, where they apply).

    Args:
        runtimes: Names from :data:`RUNTIMES`, or None: every installed runtime that takes the checkpoint and is
            built by default.
        engine: The checkpoint's int8 engine, or None for an fp32 checkpoint.

    Returns:
        Artifact names, runtime by runtime.

    Raises:
        ValueError: On an unknown runtime, or one that cannot run the checkpoint (names the engines that it can).
        MissingExtraError: If a named runtime is not installed, or (default) none of those for the checkpoint is
            (names the pip command).
    """
    if runtimes is None:
        candidates = [r for r in RUNTIME_TABLE.values() if r.takes(engine) and r.by_default(engine)]
        chosen = [r for r in candidates if r.installed()]
        if candidates and not chosen:
            raise MissingExtraError(f"none of the runtimes for this checkpoint ({', '.join(r.name for r in candidates)}"
                                    f") is installed: {candidates[0].install}")
        return ("packed", *(artifact for runtime in chosen for artifact in runtime.artifacts))
    unknown = [name for name in runtimes if name not in RUNTIME_TABLE]
    if unknown or not runtimes:
        raise ValueError(f"runtimes must be a non-empty selection of {list(RUNTIMES)}, got {list(runtimes)}")
    for name in runtimes:
        runtime = RUNTIME_TABLE[name]
        if not runtime.takes(engine):
            raise ValueError(_refusal(runtime, engine))
        if not runtime.installed():
            raise MissingExtraError(f"runtime {name!r} needs {', '.join(runtime.packages)}, not all installed: "
                                    f"{runtime.install}")
    return ("packed", *(artifact for name in runtimes for artifact in RUNTIME_TABLE[name].artifacts))


def _refusal(runtime: Runtime, engine: str | None) -> str:
    if engine is None:
        return f"runtime {runtime.name!r} runs int8 models only; export this fp32 checkpoint with --runtime " \
               f"{' '.join(r.name for r in RUNTIME_TABLE.values() if r.fp32)}"
    engines = list(runtime.int8_engines)
    others = [r.name for r in RUNTIME_TABLE.values() if r.takes(engine)]
    return (f"runtime {runtime.name!r} cannot run an int8 checkpoint of engine {engine!r}; train with "
            f"engine={engines[0]!r}" + "".join(f" or engine={e!r}" for e in engines[1:])
            + f", or export with --runtime {' '.join(others)}")
