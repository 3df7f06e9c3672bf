"""Read an ImageClassifier checkpoint into its network and a description of it, with clear errors.

Example:
    >>> load_checkpoint("missing.ckpt")
    Traceback (most recent call last):
    ...
    FileNotFoundError: checkpoint missing.ckpt does not exist
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.architecture import checkpoint_records
from lightning_compress.core.layers import uncompiled_name
from lightning_compress.data.readers import SPECS
from lightning_compress.export import build_network
from lightning_compress.quantization.qat import RECORD_KIND as QAT_RECORD_KIND

NETWORK = "model"
"""Attribute of ImageClassifier holding the network: checkpoint keys start with ``model.``."""
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_EXPECTED = ("a Lightning checkpoint of lightning_compress.ImageClassifier (a .ckpt written by Trainer/ModelCheckpoint "
             "or `lightning-compress fit`, with 'state_dict' and 'hyper_parameters' naming a zoo model)")


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_checkpoint(path: Path) -> Any:
    """Read a checkpoint as data: ``torch.load(weights_only=True)``, so no code in the file ever runs.

    Args:
        path: The checkpoint file.

    Returns:
        The loaded object (tensors, containers and plain values only).

    Raises:
        ValueError: If the file is unreadable, or holds a Python object that is not data (naming its type).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _UNSAFE_GLOBAL.search(str(err))
        if unsafe is None:
            raise ValueError(f"{path} is not a readable checkpoint (UnpicklingError: {err}); expected {_EXPECTED}") from err
        raise ValueError(f"{path} holds a Python object that is not data ({unsafe.group(1)}); lightning-compress reads "
                         "checkpoints with torch.load(weights_only=True) and never runs code from a file") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); expected {_EXPECTED}") from err


@dataclass
class LoadedCheckpoint:
    """A checkpoint's network and what artifacts need to know about it.

    Attributes:
        path: The checkpoint file.
        network: The network with the checkpoint's weights (CPU, eval; QAT-prepared for a QAT checkpoint).
        metadata: ``model``, ``num_classes``, ``model_kwargs``, ``architecture``, ``quantization``,
            ``classes``, ``mean``, ``std``, ``input_size`` (see :func:`lightning_compress.export.build_network`).
        checkpoint: The raw checkpoint dictionary.
    """

    path: Path
    network: nn.Module
    metadata: dict[str, Any]
    checkpoint: dict[str, Any]


def load_checkpoint(path: str | os.PathLike[str], classes: list[str] | None = None) -> LoadedCheckpoint:
    """Load an ImageClassifier checkpoint (fp32, sparse, channel-pruned or QAT).

    Normalization comes from the datamodule's ``dataset`` recorded in the checkpoint (CIFAR-10 when
    absent); class names from ``classes``, else CIFAR-10's names for 10 classes, else ``"0"``, ``"1"``, ...

    Args:
        path: The checkpoint.
        classes: Class names, in label order.

    Returns:
        The loaded checkpoint.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a readable ImageClassifier checkpoint (the message says what was expected).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or not isinstance(hparams, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint; expected {_EXPECTED}")
    if not isinstance(hparams.get("model"), str) or "num_classes" not in hparams:
        raise ValueError(f"{path} was not written by ImageClassifier with a zoo model (its hyper_parameters are "
                         f"{sorted(hparams)}); expected {_EXPECTED}")
    prefix = NETWORK + "."
    state = {uncompiled_name(k[len(prefix):]): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        records = checkpoint_records(checkpoint)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    qat = next((r for r in records if r.kind == QAT_RECORD_KIND), None)
    dataset = (checkpoint.get("datamodule_hyper_parameters") or {}).get("dataset", "cifar10")
    spec = SPECS.get(dataset, SPECS["cifar10"])
    num_classes = hparams["num_classes"]
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"classes has {len(classes)} names but the model has {num_classes} classes")
    if classes is None:
        classes = list(CIFAR10_CLASSES) if num_classes == 10 else [str(i) for i in range(num_classes)]
    metadata = {
        "model": hparams["model"], "num_classes": num_classes, "model_kwargs": hparams.get("model_kwargs") or {},
        "architecture": [record.to_dict() for record in records],
        "quantization": {"engine": qat.payload["engine"]} if qat else None,
        "classes": classes, "mean": list(spec.mean), "std": list(spec.std), "input_size": [32, 32],
    }
    try:
        network = build_network(metadata, state)
    except RuntimeError as err:
        raise ValueError(f"the weights in {path} do not fit ImageClassifier(model={hparams['model']!r}): {err}") from err
    return LoadedCheckpoint(path, network, metadata, checkpoint)
