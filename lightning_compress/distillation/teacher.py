"""Getting a teacher (a module, a LightningModule checkpoint, or a zoo name + checkpoint) and freezing it.

Example:
    >>> from torch import nn
    >>> teacher = FrozenTeacher(load_teacher(nn.Linear(4, 3)))
    >>> teacher(torch.randn(2, 4)).requires_grad
    False
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress.core.architecture import RestoresArchitecture, checkpoint_records, replay_onto_network
from lightning_compress.models import create_model, list_models

TeacherPrecision = Literal["32", "bf16", "16"]
_PRECISIONS: dict[str, torch.dtype] = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
DEFAULT_TEACHER_CLASS = "lightning_compress.module.ImageClassifier"
SELF = "self"
"""``teacher=SELF``: the student network itself, copied at fit start before any compression acts on it."""


def _import_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"teacher_class {class_path!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ValueError(f"teacher_class must name a LightningModule class, got {class_path!r}")
    return cls


def _check_file(path: str, argument: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{argument}: teacher checkpoint {path!r} does not exist or is not a file")


def _read_checkpoint(path: str) -> Mapping[str, Any]:
    _check_file(path, "checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling/zip failure means the same thing to the user
        raise ValueError(f"cannot read teacher checkpoint {path!r}: {type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"teacher checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def load_state_dict_by_prefix(
    network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load ``state_dict`` into ``network``, stripping the prefix a LightningModule added (``model.``).

    ``source`` names the weights in the ``ValueError`` raised when no prefix (nor none) fits.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> weights = {"model.weight": torch.ones(2, 2), "model.bias": torch.zeros(2)}
        >>> load_state_dict_by_prefix(net, weights, "example")
        >>> net.bias.tolist()
        [0.0, 0.0]
    """
    wanted = set(network.state_dict())
    prefixes = [""] + sorted({key.split(".", 1)[0] + "." for key in state_dict if "." in key})
    for prefix in prefixes:
        stripped = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if wanted <= set(stripped):
            network.load_state_dict({key: stripped[key] for key in wanted})
            return
    raise ValueError(
        f"the weights in {source} do not fit the teacher network {type(network).__name__}: it expects keys like "
        f"{sorted(wanted)[:3]}, the checkpoint has {sorted(state_dict)[:3]} (tried prefixes {prefixes})"
    )


def copy_network(network: nn.Module) -> nn.Module:
    """An independent copy of ``network`` (own parameters and buffers, same device), for a ``"self"`` teacher.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> twin = copy_network(net)
        >>> twin.weight is net.weight, bool(torch.equal(twin.weight, net.weight))
        (False, True)
    """
    return copy.deepcopy(network)


def load_teacher(
    teacher: nn.Module | str, checkpoint: str | None = None, teacher_class: str | None = None
) -> nn.Module:
    """Resolve a teacher given as a module, a checkpoint path, or a zoo name plus checkpoint, on the CPU.

    Args:
        teacher: An ``nn.Module``, used as given; a Lightning checkpoint path, rebuilt with
            ``teacher_class.load_from_checkpoint``; or a zoo model name (created with the checkpoint's
            ``num_classes``/``model_kwargs`` when it has them).
        checkpoint: Weights for a zoo name (a Lightning checkpoint or a plain state dict); for an
            ``nn.Module``, optional weights to load into it.
        teacher_class: Class path a checkpoint path is rebuilt with; default ``ImageClassifier``.

    Raises:
        FileNotFoundError: If a checkpoint path does not exist.
        ValueError: If a checkpoint cannot be read or does not fit, a zoo name has no ``checkpoint``,
            or the arguments form none of the three ways.

    Example:
        >>> load_teacher(nn.Linear(2, 2)).out_features
        2
    """
    if isinstance(teacher, nn.Module):
        if teacher_class is not None:
            raise ValueError("teacher_class only applies when teacher is a checkpoint path")
        if checkpoint is not None:
            state = _read_checkpoint(checkpoint)
            load_state_dict_by_prefix(teacher, state.get("state_dict", state), repr(checkpoint))
        return teacher
    if not isinstance(teacher, str):
        raise ValueError(
            f"teacher must be an nn.Module, a checkpoint path or a zoo model name, got {type(teacher)}"
        )

    if teacher in list_models() and not os.path.exists(teacher):
        if checkpoint is None:
            raise ValueError(
                f"teacher={teacher!r} is a zoo model name: pass checkpoint=<path> with its trained weights"
            )
        if teacher_class is not None:
            raise ValueError("teacher_class only applies when teacher is a checkpoint path")
        state = _read_checkpoint(checkpoint)
        hparams = state.get("hyper_parameters", {})
        network = create_model(
            teacher, num_classes=hparams.get("num_classes", 10), **(hparams.get("model_kwargs") or {})
        )
        network = replay_onto_network(network, checkpoint_records(state))
        load_state_dict_by_prefix(network, state.get("state_dict", state), repr(checkpoint))
        return network

    if checkpoint is not None:
        raise ValueError(
            f"teacher={teacher!r} is not a zoo model name ({list_models()}); a checkpoint path goes in "
            "teacher=<path> alone, a zoo name with checkpoint=<path>"
        )
    if not os.path.exists(teacher):
        raise FileNotFoundError(
            f"teacher: {teacher!r} is neither an existing checkpoint file nor a zoo model name ({list_models()})"
        )
    _check_file(teacher, "teacher")
    cls = _import_class(teacher_class or DEFAULT_TEACHER_CLASS)
    if not issubclass(cls, RestoresArchitecture):  # compressed checkpoints of any class load back
        cls = type(cls.__name__, (RestoresArchitecture, cls), {"__module__": cls.__module__})
    try:
        return cls.load_from_checkpoint(teacher, map_location="cpu", weights_only=True)  # data, never code
    except Exception as err:  # corrupt file, or hyperparameters the class does not accept
        raise ValueError(
            f"cannot rebuild the teacher {cls.__name__} from checkpoint {teacher!r}: {type(err).__name__}: {err}"
        ) from err


class FrozenTeacher:
    """A teacher that cannot train: eval mode, ``requires_grad=False``, run under ``torch.no_grad``.

    Not an ``nn.Module``, so it never becomes part of the student's LightningModule (saved, optimized,
    DDP-wrapped). ``precision`` (``"32"``, ``"bf16"`` or ``"16"``) is the dtype of its weights, inputs
    and logits. ``no_grad``, not ``inference_mode``: the KL term's autograd graph saves the logits.

    Example:
        >>> teacher = FrozenTeacher(nn.Linear(4, 2), precision="bf16")
        >>> teacher(torch.randn(3, 4)).dtype
        torch.bfloat16
    """

    def __init__(self, module: nn.Module, precision: TeacherPrecision = "32") -> None:
        if precision not in _PRECISIONS:
            raise ValueError(f"teacher_precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        self.dtype = _PRECISIONS[precision]
        self.module = module.eval().requires_grad_(False).to(self.dtype)

    def to(self, device: torch.device) -> FrozenTeacher:
        """Move the teacher to ``device`` (in place) and return it."""
        self.module.to(device)
        return self

    def _cast(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().to(self.dtype)
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The teacher's output for the given network inputs, without gradients."""
        if self.module.training:  # someone called .train() on the module they passed us
            self.module.eval()
        with torch.no_grad():
            return self.module(*map(self._cast, args), **{k: self._cast(v) for k, v in kwargs.items()})
