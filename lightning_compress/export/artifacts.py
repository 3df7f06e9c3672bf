"""Write every deployable artifact of a network, each checked against its model; read them back.

:func:`export_artifacts` writes the selected :data:`ARTIFACTS` into a temporary sibling directory, then
renames it into place: the destination never holds a half-written export. Each artifact is built and
checked on its own; one that cannot be built, or whose outputs are really wrong
(:func:`~lightning_compress.core.comparison.parity` below ``min_agreement``), is recorded as ``failed``
with the reason, and the others are still written. ``manifest.json`` lists every artifact's status
(``written`` / ``skipped`` / ``failed``, with the reason), its file and size, and its parity on the check
images (agreement, logit error and, with labels, accuracy of the model and of the artifact); ``check.sample``
says how those images were drawn (:mod:`.sample`).

Example:
    >>> # result = export_artifacts(network, metadata, "export/", images, labels)
    >>> # result.manifest["artifacts"]["onnx_int8"]["status"]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.architecture import ArchitectureRecord, replay_onto_network
from lightning_compress.core.comparison import Parity, parity
from lightning_compress.core.files import atomic_path, write_text_atomic
from lightning_compress.core.machine import cpu_description
from lightning_compress.core.onnx import OnnxRuntimeNetwork, onnx_bytes, require_onnx
from lightning_compress.export.aoti import AotiNetwork, aoti_package
from lightning_compress.export.executorch import ExecuTorchNetwork, pte_bytes
from lightning_compress.export.onnx import onnx_metadata
from lightning_compress.export.openvino import OpenVinoNetwork, require_openvino
from lightning_compress.export.packed import PACKED_SUFFIX, VALUE_FORMATS, read_packed, write_packed
from lightning_compress.models import create_model
from lightning_compress.quantization.convert import convert
from lightning_compress.quantization.engines import ENGINE_TABLE, Engine, KernelFamily
from lightning_compress.quantization.families import family_of
from lightning_compress.quantization.files import load_quantized, save_quantized
from lightning_compress.quantization.prepare import frozen_copy, is_prepared
from lightning_compress.quantization.qdq import qdq_network, qdq_onnx_bytes

ARTIFACTS: tuple[str, ...] = (
    "packed", "onnx_fp32", "onnx_int8", "openvino", "aoti", "executorch", "torchscript_int8")
"""What an export can hold: packed sparse weights; the fp32 ONNX model (fp32 checkpoints); the int8 QDQ ONNX
model (QAT checkpoints of the FX engines); ``openvino``: that same ONNX file checked in OpenVINO (no file of its
own); an AOTInductor package (fp32 checkpoints, or the int8 graph of the PT2E engine ``x86_inductor``); an
ExecuTorch program for XNNPACK (fp32, or the int8 graph of the PT2E engine ``xnnpack``); the int8 TorchScript
model of torch's own int8 engines (deprecated by torch). Which runtime runs which: :mod:`.runtimes`."""
DEFAULT_ARTIFACTS: tuple[str, ...] = ("packed", "onnx_fp32", "onnx_int8")
FILES = {"packed": "weights.lcpk", "onnx_fp32": "model_fp32.onnx", "onnx_int8": "model_int8.onnx",
         "aoti": "model.pt2", "executorch": "model.pte", "torchscript_int8": "model_int8.pt"}
"""File names inside an export directory (``openvino`` reads the ONNX model's)."""
MANIFEST = "manifest.json"
_PREFERENCE = ("onnx_int8", "onnx_fp32", "aoti", "executorch", "torchscript_int8", "packed")
_RUNTIME_OF = {"onnx_fp32": "onnxruntime", "onnx_int8": "onnxruntime", "openvino": "openvino", "aoti": "aoti",
               "executorch": "executorch", "torchscript_int8": "torch"}


# ------------------------------------------------------------------------------------- networks
def build_network(metadata: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a zoo network from artifact/checkpoint metadata and (optionally) load its weights.

    ``metadata`` holds ``model`` (a zoo name), ``num_classes``, ``model_kwargs`` and optionally
    ``architecture``: the checkpoint's architecture records (channel slimming, QAT preparation, ...; see
    :mod:`lightning_compress.core.architecture`), replayed before the weights load.

    Args:
        metadata: The description above.
        state_dict: The network's weights (keys relative to the network).

    Returns:
        The network, in eval mode, on CPU.

    Example:
        >>> net = build_network({"model": "resnet20", "num_classes": 10, "model_kwargs": {}})
        >>> type(net).__name__
        'ResNet'
    """
    network = create_model(metadata["model"], num_classes=metadata["num_classes"], **metadata.get("model_kwargs", {}))
    records = [ArchitectureRecord.from_dict(record) for record in metadata.get("architecture") or []]
    network = replay_onto_network(network, records)
    if state_dict is not None:
        network.load_state_dict(state_dict)
    return network.eval()


def int8_from_qat(network: nn.Module, engine: str | Engine, example_inputs: tuple | None = None) -> nn.Module:
    """Convert a copy of a QAT-prepared network to int8 (the network is left as is).

    Args:
        network: A network prepared for quantization-aware training.
        engine: One of :data:`~lightning_compress.quantization.engines.ENGINES`: a torch engine gives torch's
            int8 model, an ONNX engine the QDQ ONNX model run by onnxruntime (the deployed file).
        example_inputs: Positional inputs to export with; required for the ONNX engines.

    Returns:
        The int8 network.

    Example:
        >>> # int8 = int8_from_qat(prepared_network, "x86")
        >>> # onnx_int8 = int8_from_qat(prepared_network, "onnxruntime", (torch.randn(1, 3, 32, 32),))
    """
    return convert(copy.deepcopy(network), engine, example_inputs)


def _logits(function: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([function(images[i:i + batch]).float() for i in range(0, len(images), batch)])


# -------------------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What :func:`export_artifacts` wrote.

    Attributes:
        directory: The export directory.
        manifest: The content of its ``manifest.json``.
    """

    directory: Path
    manifest: dict[str, Any]

    def failed(self) -> list[str]:
        """The artifacts that were asked for and could not be written.

        Returns:
            Their names.
        """
        return [name for name, entry in self.manifest["artifacts"].items() if entry["status"] == "failed"]


def check_export_directory(directory: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a non-empty existing directory unless ``overwrite``; refuse a file.

    Args:
        directory: The destination.
        overwrite: Whether its content may be replaced.

    Returns:
        The directory as a path.

    Raises:
        FileExistsError: If ``directory`` is a file, or a non-empty directory and not ``overwrite``.

    Example:
        >>> check_export_directory("/nonexistent/export", overwrite=False).name
        'export'
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"export destination {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"export directory {path} exists and is not empty; pass --overwrite to replace "
                              "its content, or choose another directory")
    return path


def check_artifacts(only: Sequence[str] | None) -> tuple[str, ...]:
    """Validate an artifact selection.

    Args:
        only: Names from :data:`ARTIFACTS`, or None for :data:`DEFAULT_ARTIFACTS`.

    Returns:
        The selection, in :data:`ARTIFACTS` order.

    Raises:
        ValueError: On an unknown name or an empty selection.

    Example:
        >>> check_artifacts(["onnx_int8", "packed"])
        ('packed', 'onnx_int8')
    """
    if only is None:
        return DEFAULT_ARTIFACTS
    unknown = [name for name in only if name not in ARTIFACTS]
    if unknown or not only:
        raise ValueError(f"artifacts must be a non-empty selection of {list(ARTIFACTS)}, got {list(only)}")
    return tuple(name for name in ARTIFACTS if name in only)


class _Refused(Exception):
    """An artifact was built but its check failed: it is not written."""


def export_artifacts(
    network: nn.Module,
    metadata: Mapping[str, Any],
    directory: str | os.PathLike[str],
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    image_source: str = "given",
    only: Sequence[str] | None = None,
    values: str = "int8",
    overwrite: bool = False,
    min_agreement: float = 0.95,
    tolerance: float = 0.05,
    sample: Mapping[str, Any] | None = None,
    latency_repeats: int = 20,
) -> ExportResult:
    """Write the deployable artifacts of a network into ``directory``, each one checked, none half-written.

    Args:
        network: The network (fp32, possibly sparse or slimmed; or QAT-prepared) to export.
        metadata: See :func:`build_network`; plus ``classes``, ``mean``, ``std``, ``input_size``.
        directory: Destination directory.
        images: Check images (a batch of normalized model inputs), ideally real ones.
        labels: Their true classes, if known (accuracies go into the manifest).
        image_source: Where the check images come from, for the manifest.
        only: Which of :data:`ARTIFACTS` to write (default :data:`DEFAULT_ARTIFACTS`).
        values: Storage of non-zero packed values: ``"int8"`` or ``"fp16"``.
        overwrite: Replace the content of a non-empty ``directory``.
        min_agreement: Near-tie-tolerant agreement below which an artifact is refused (``failed``).
        tolerance: Near-tie tolerance of :func:`~lightning_compress.core.comparison.parity`.
        sample: How the check images were drawn (:meth:`~lightning_compress.export.sample.CheckSample.to_dict`),
            for the manifest.
        latency_repeats: Timed batch-1 runs of each written model, interleaved, for the manifest's ``latency``
            (medians, one thread, this CPU, and the fastest runtime); 0: not timed.

    Returns:
        What was written; :meth:`ExportResult.failed` lists what was refused.

    Raises:
        FileExistsError: See :func:`check_export_directory`.
        ValueError: On a bad ``values``/``only``/``min_agreement``.

    Example:
        >>> # export_artifacts(net, meta, "export/", test_images, test_labels, "CIFAR-10 test split")
    """
    if values not in VALUE_FORMATS:
        raise ValueError(f"values must be one of {list(VALUE_FORMATS)}, got {values!r}")
    if not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    selected = check_artifacts(only)
    final = check_export_directory(directory, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    network = network.cpu().eval()
    engine = (metadata.get("quantization") or {}).get("engine")
    family = family_of(engine) if engine else None  # without it: an fp32 network, or an FX one given by the API
    qat = family.is_prepared(network) if family else is_prepared(network)
    graph = qat and family is not None and family.engine.family is KernelFamily.PT2E  # deploys by AOTInductor only
    reference = (family.frozen_copy(network) if family else frozen_copy(network)) if qat else network
    reference_logits = _logits(reference, images)
    runners: dict[str, nn.Module] = {}
    onnx_model: dict[str, bytes] = {}
    manifest: dict[str, Any] = {
        "metadata": dict(metadata), "packed_values": values,
        "check": {"images": len(images), "source": image_source, "sample": dict(sample or {"method": "given"}),
                  "labels": labels is not None,
                  "reference": "the fake-quant (QAT) network" if qat else "the fp32 network",
                  "min_agreement": min_agreement, "tolerance": tolerance},
        "artifacts": {},
    }

    def check(name: str, logits: torch.Tensor) -> Parity:
        result = parity(reference_logits, logits, labels, tolerance)
        manifest["artifacts"][name]["parity"] = result.to_dict()
        if result.agreement < min_agreement:
            raise _Refused(f"agrees with the model on {result.agreement:.1%} of {len(images)} {image_source} images "
                           f"(near-tie tolerant, tolerance {tolerance}) < min_agreement {min_agreement:.0%}; "
                           f"max logit error {result.max_logit_error:.3g} of the logit range")
        return result

    def not_for_graph(artifact: str) -> None:
        if graph:
            raise _NotApplicable(f"engine {engine!r} trains a PT2E graph, which deploys by its runtime "
                                 f"({ENGINE_TABLE[engine].runtime}); {artifact} needs a checkpoint of another engine")

    def program_input(artifact: str, own_engine: str) -> nn.Module:
        """What a compiled program takes: the fp32 network, or the int8 graph of its own PT2E engine."""
        if qat and engine != own_engine:
            raise _NotApplicable(f"{artifact} packages fp32 checkpoints and those of engine {own_engine!r}, not of "
                                 f"engine {engine or 'x86'!r}")
        return family.convert_qat(network, None, "") if graph and family else network

    def onnx_blob() -> tuple[str, bytes]:
        """The checkpoint's ONNX model, built once for onnxruntime and OpenVINO: ``(artifact, bytes)``."""
        not_for_graph("an ONNX model")
        if not onnx_model:
            require_onnx("the ONNX model")
            onnx_model["onnx_int8" if qat else "onnx_fp32"] = (
                qdq_onnx_bytes(qdq_network(network), images[:1], metadata) if qat
                else onnx_bytes(network, images[:1], metadata))
        return next(iter(onnx_model.items()))

    def build_packed() -> str:
        not_for_graph("packed weights")
        write_packed(staging / FILES["packed"], network.state_dict(), metadata, values)
        packed = load_artifact(staging / FILES["packed"])
        check("packed", _logits(packed.logits, images))
        return FILES["packed"]

    def build_onnx(name: str) -> str:
        not_for_graph("an ONNX model")
        if (name == "onnx_int8") != qat:
            raise _NotApplicable("the network holds quantization-aware-training fake-quant modules; its deployable "
                                 "form is onnx_int8" if qat else "the checkpoint is fp32: train with "
                                 "QuantizationAwareTraining to get an int8 model")
        blob = onnx_blob()[1]
        runners[name] = OnnxRuntimeNetwork(blob, threads=1)
        check(name, _logits(runners[name], images))
        _write_bytes(staging / FILES[name], blob)
        return FILES[name]

    def build_openvino() -> str:
        require_openvino("the openvino artifact")
        name, blob = onnx_blob()
        runner = OpenVinoNetwork(blob, threads=1)
        check("openvino", _logits(runner, images))
        runners["openvino"] = runner
        if not (staging / FILES[name]).exists():
            _write_bytes(staging / FILES[name], blob)
        return FILES[name]

    def build_aoti() -> str:
        aoti_package(program_input("an AOTInductor package", "x86_inductor"), images[:2], staging / FILES["aoti"])
        runners["aoti"] = AotiNetwork(staging / FILES["aoti"])
        check("aoti", _logits(runners["aoti"], images))
        return FILES["aoti"]

    def build_executorch() -> str:
        blob = pte_bytes(program_input("an ExecuTorch program", "xnnpack"), images[:2])
        runners["executorch"] = ExecuTorchNetwork(blob)
        check("executorch", _logits(runners["executorch"], images))
        _write_bytes(staging / FILES["executorch"], blob)
        return FILES["executorch"]

    def build_torchscript_int8() -> str:
        not_for_graph("TorchScript")
        if not qat:
            raise _NotApplicable("the checkpoint is fp32: train with QuantizationAwareTraining to get an int8 model")
        torch_engine = ENGINE_TABLE.get(engine or "x86")
        torch_engine = torch_engine if torch_engine.family is KernelFamily.TORCH_INT8 else ENGINE_TABLE["x86"]
        int8 = int8_from_qat(network, torch_engine)
        check("torchscript_int8", _logits(int8, images))
        runners["torchscript_int8"] = int8
        save_quantized(int8, staging / FILES["torchscript_int8"], (images[:1],), torch_engine)
        return FILES["torchscript_int8"]

    builders = {"packed": build_packed, "onnx_fp32": lambda: build_onnx("onnx_fp32"),
                "onnx_int8": lambda: build_onnx("onnx_int8"), "openvino": build_openvino, "aoti": build_aoti,
                "executorch": build_executorch,
                "torchscript_int8": build_torchscript_int8}
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        for name in ARTIFACTS:
            entry = manifest["artifacts"][name] = {"file": FILES.get(name)}
            if name not in selected:
                entry.update(status="skipped", reason="not selected (--only / --runtime)")
                continue
            try:
                file = builders[name]()
            except _NotApplicable as why:
                entry.update(status="skipped", reason=str(why))
            except (_Refused, RuntimeError, ValueError, ImportError) as err:
                entry.update(status="failed", reason=str(err) or type(err).__name__)
                if name in FILES:
                    (staging / FILES[name]).unlink(missing_ok=True)
                runners.pop(name, None)
            else:
                entry.update(file=file, status="written", bytes=(staging / file).stat().st_size)
        if latency_repeats and runners:
            manifest["latency"] = runtime_latencies(runners, images[:1], latency_repeats)
        write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(final, manifest)


def runtime_latencies(runners: Mapping[str, nn.Module], example: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Median latency of each model on ``example``, one thread, runs interleaved so all see the same load.

    Args:
        runners: The models, by artifact name.
        example: The input (a batch of one image).
        repeats: Timed runs of each (after one untimed).

    Returns:
        The manifest's ``latency``: batch size, threads, repeats, this CPU, ``median_ms`` by artifact and the
        ``fastest`` artifact with its runtime.
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for runner in runners.values():
                runner(example)
            for _ in range(repeats):
                for name, runner in runners.items():
                    begin = time.perf_counter()
                    runner(example)
                    times[name].append(time.perf_counter() - begin)
    finally:
        torch.set_num_threads(threads)
    medians = {name: round(statistics.median(values) * 1e3, 4) for name, values in times.items()}
    fastest = min(medians, key=medians.__getitem__)
    return {"batch_size": len(example), "threads": 1, "repeats": repeats, "cpu": cpu_description(),
            **({"executorch_threads": "ExecuTorch's own pool, one thread per core"} if "executorch" in runners else {}),
            "median_ms": medians, "fastest": {"artifact": fastest, "runtime": _RUNTIME_OF[fastest]}}


class _NotApplicable(Exception):
    """The artifact does not exist for this network (e.g. int8 of an fp32 checkpoint)."""


def _write_bytes(path: Path, blob: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)


def _replace_directory(staging: Path, final: Path) -> None:
    """Move ``staging`` to ``final``; an old ``final`` is moved aside first and deleted last."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old.{os.getpid()}"
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- reading
@dataclass
class Artifact:
    """A loaded model artifact, ready to classify preprocessed images.

    Attributes:
        path: The file it was loaded from.
        kind: ``"packed"``, ``"onnx"``, ``"aoti"``, ``"executorch"`` or ``"torchscript_int8"``.
        metadata: ``classes``, ``mean``, ``std``, ``input_size`` and the model description.
        logits: Maps a ``(N, 3, H, W)`` float batch of normalized images to ``(N, classes)`` logits.
    """

    path: Path
    kind: str
    metadata: dict[str, Any]
    logits: Callable[[torch.Tensor], torch.Tensor]


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Load an exported model: an export directory, ``weights.lcpk``, an ``.onnx`` file, ``model.pt2``,
    ``model.pte`` or ``model_int8.pt``.

    A directory is read through its best written model: the int8 ONNX model, else the fp32 ONNX model,
    else the AOTInductor package, else the ExecuTorch program, else the int8 TorchScript model, else the packed
    weights.

    Args:
        path: The artifact.

    Returns:
        The loaded artifact.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is not an artifact written by :func:`export_artifacts` (says what was expected).
        MissingExtraError: For an ONNX model without the ``[export]`` extra.

    Example:
        >>> # artifact = load_artifact("export/"); artifact.logits(images)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.is_dir():
        for key in _PREFERENCE:
            if (path / FILES[key]).exists():
                return load_artifact(path / FILES[key])
        raise ValueError(f"{path} holds none of {sorted(FILES.values())}; expected a directory written by "
                         "`lightning-compress export`")
    if path.suffix == PACKED_SUFFIX:
        state, metadata = read_packed(path)
        network = build_network(metadata, state)
        if is_prepared(network):
            network = frozen_copy(network)
        return Artifact(path, "packed", metadata, _torch_logits(network))
    if path.suffix == ".onnx":
        metadata = onnx_metadata(path)
        network = OnnxRuntimeNetwork(path.read_bytes())
        return Artifact(path, "onnx", metadata, _torch_logits(network))
    if path.suffix in (".pt", ".pt2", ".pte"):
        manifest = path.parent / MANIFEST
        if not manifest.exists():
            raise ValueError(f"{path}: a {path.suffix} model needs the {MANIFEST} of its export directory beside it "
                             "(class names and normalization live there)")
        metadata = json.loads(manifest.read_text())["metadata"]
        if path.suffix == ".pt2":
            return Artifact(path, "aoti", metadata, _torch_logits(AotiNetwork(path)))
        if path.suffix == ".pte":
            return Artifact(path, "executorch", metadata, _torch_logits(ExecuTorchNetwork(path)))
        return Artifact(path, "torchscript_int8", metadata, _torch_logits(load_quantized(path)))
    raise ValueError(f"{path}: unknown model file type {path.suffix!r}; expected an export directory, "
                     f"{FILES['packed']}, an .onnx file, {FILES['aoti']}, {FILES['executorch']} or "
                     f"{FILES['torchscript_int8']}")


def _torch_logits(network: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def logits(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(images)

    return logits
