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
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.architecture import ArchitectureRecord, replay_onto_network
from lightning_compress.core.files import atomic_path, write_text_atomic
from lightning_compress.core.comparison import Parity, parity
from lightning_compress.core.onnx import OnnxRuntimeNetwork, onnx_bytes, require_onnx
from lightning_compress.export.onnx import onnx_metadata
from lightning_compress.export.packed import PACKED_SUFFIX, VALUE_FORMATS, read_packed, write_packed
from lightning_compress.models import create_model
from lightning_compress.quantization.convert import convert
from lightning_compress.quantization.engines import ENGINE_TABLE, Engine, KernelFamily
from lightning_compress.quantization.files import load_quantized, save_quantized
from lightning_compress.quantization.prepare import frozen_copy, is_prepared
from lightning_compress.quantization.qdq import qdq_network, qdq_onnx_bytes

ARTIFACTS: tuple[str, ...] = ("packed", "onnx_fp32", "onnx_int8", "torchscript_int8")
"""What an export can hold: packed sparse weights; the fp32 ONNX model (fp32 checkpoints); the int8 QDQ ONNX
model (QAT checkpoints: the int8 deployment artifact); the int8 TorchScript model of torch's own int8
engines (deprecated by torch; only when asked for)."""
DEFAULT_ARTIFACTS: tuple[str, ...] = ("packed", "onnx_fp32", "onnx_int8")
FILES = {"packed": "weights.lcpk", "onnx_fp32": "model_fp32.onnx", "onnx_int8": "model_int8.onnx",
         "torchscript_int8": "model_int8.pt"}
"""File names inside an export directory."""
MANIFEST = "manifest.json"
_PREFERENCE = ("onnx_int8", "onnx_fp32", "torchscript_int8", "packed")


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
    qat = is_prepared(network)
    reference = frozen_copy(network) if qat else network
    reference_logits = _logits(reference, images)
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

    def build_packed(path: Path) -> None:
        write_packed(path, network.state_dict(), metadata, values)
        packed = load_artifact(path)
        check("packed", _logits(packed.logits, images))

    def build_onnx_fp32(path: Path) -> None:
        if qat:
            raise _NotApplicable("the network holds quantization-aware-training fake-quant modules; its deployable "
                                 "form is onnx_int8")
        blob = onnx_bytes(network, images[:1], metadata)
        check("onnx_fp32", _logits(OnnxRuntimeNetwork(blob, threads=1), images))
        _write_bytes(path, blob)

    def build_onnx_int8(path: Path) -> None:
        if not qat:
            raise _NotApplicable("the checkpoint is fp32: train with QuantizationAwareTraining to get an int8 model")
        require_onnx("the int8 ONNX model")
        blob = qdq_onnx_bytes(qdq_network(network), images[:1], metadata)
        check("onnx_int8", _logits(OnnxRuntimeNetwork(blob, threads=1), images))
        _write_bytes(path, blob)

    def build_torchscript_int8(path: Path) -> None:
        if not qat:
            raise _NotApplicable("the checkpoint is fp32: train with QuantizationAwareTraining to get an int8 model")
        engine = ENGINE_TABLE.get((metadata.get("quantization") or {}).get("engine", "x86"))
        engine = engine if engine is not None and engine.family is KernelFamily.TORCH_INT8 else ENGINE_TABLE["x86"]
        int8 = int8_from_qat(network, engine)
        check("torchscript_int8", _logits(int8, images))
        save_quantized(int8, path, (images[:1],), engine)

    builders = {"packed": build_packed, "onnx_fp32": build_onnx_fp32, "onnx_int8": build_onnx_int8,
                "torchscript_int8": build_torchscript_int8}
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        for name in ARTIFACTS:
            entry = manifest["artifacts"][name] = {"file": FILES[name]}
            if name not in selected:
                entry.update(status="skipped", reason="not selected (--only)")
                continue
            try:
                builders[name](staging / FILES[name])
            except _NotApplicable as why:
                entry.update(status="skipped", reason=str(why))
            except (_Refused, RuntimeError, ValueError, ImportError) as err:
                entry.update(status="failed", reason=str(err) or type(err).__name__)
                (staging / FILES[name]).unlink(missing_ok=True)
            else:
                entry.update(status="written", bytes=(staging / FILES[name]).stat().st_size)
        write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(final, manifest)


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
        kind: ``"packed"``, ``"onnx"`` or ``"torchscript_int8"``.
        metadata: ``classes``, ``mean``, ``std``, ``input_size`` and the model description.
        logits: Maps a ``(N, 3, H, W)`` float batch of normalized images to ``(N, classes)`` logits.
    """

    path: Path
    kind: str
    metadata: dict[str, Any]
    logits: Callable[[torch.Tensor], torch.Tensor]


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Load an exported model: an export directory, ``weights.lcpk``, an ``.onnx`` file or ``model_int8.pt``.

    A directory is read through its best written model: the int8 ONNX model, else the fp32 ONNX model,
    else the int8 TorchScript model, else the packed weights.

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
    if path.suffix == ".pt":
        manifest = path.parent / MANIFEST
        if not manifest.exists():
            raise ValueError(f"{path}: an int8 model needs the {MANIFEST} of its export directory beside it "
                             "(class names and normalization live there)")
        network = load_quantized(path)
        return Artifact(path, "torchscript_int8", json.loads(manifest.read_text())["metadata"], _torch_logits(network))
    raise ValueError(f"{path}: unknown model file type {path.suffix!r}; expected an export directory, "
                     f"{FILES['packed']}, an .onnx file or {FILES['torchscript_int8']}")


def _torch_logits(network: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def logits(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(images)

    return logits
