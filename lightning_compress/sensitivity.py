"""Per-layer pruning sensitivity: prune one layer at a time, measure accuracy, derive per-layer targets.

Distiller's sensitivity analysis, for this project's layer names: for every selected layer and
every tested sparsity, the layer alone is magnitude-pruned (the others stay dense), the model is
evaluated, and the weights are put back. :func:`sensitivity_targets` then picks, per layer, the
highest tested sparsity whose accuracy drop stays within a tolerance -- a mapping that
:class:`~lightning_compress.pruning.MagnitudePruning` accepts as ``final_sparsity`` with
``scope="layerwise"``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    >>> rows = layer_sensitivity(net, lambda m: 0.5, ["1"], [0.5, 0.9])
    >>> [(r["layer"], r["sparsity"], r["accuracy"]) for r in rows]
    [('1', 0.0, 0.5), ('1', 0.5, 0.5), ('1', 0.9, 0.5)]
    >>> sensitivity_targets(rows, max_drop=0.01)
    {'1': 0.9}
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.files import atomic_path, write_text_atomic
from lightning_compress.core.layers import weight_label, weight_parameters
from lightning_compress.pruning.masks import layerwise_magnitude_masks

DEFAULT_SPARSITIES: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
"""Sparsities tested per layer by default."""


def check_sparsities(sparsities: Sequence[float]) -> list[float]:
    """Validate and sort the tested sparsities.

    Args:
        sparsities: Values in ``(0, 1)``.

    Returns:
        The sorted, de-duplicated values.

    Raises:
        ValueError: If empty or a value is outside ``(0, 1)``.

    Example:
        >>> check_sparsities([0.9, 0.5, 0.9])
        [0.5, 0.9]
    """
    if not sparsities or not all(isinstance(s, (int, float)) and 0.0 < s < 1.0 for s in sparsities):
        raise ValueError(f"sparsities must be a non-empty list of numbers in (0, 1), got {list(sparsities)!r}")
    return sorted(set(float(s) for s in sparsities))


def layer_sensitivity(
    module: nn.Module,
    evaluate: Callable[[nn.Module], float],
    layers: Sequence[str],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
) -> list[dict[str, Any]]:
    """Accuracy of ``module`` with each layer's weight alone pruned to each sparsity.

    The weights are restored after each measurement, so ``module`` is unchanged on return.

    Args:
        module: The model (or LightningModule) holding the layers.
        evaluate: Returns the accuracy of ``module`` (e.g. on a few validation batches).
        layers: Labels of the weights to analyze: a layer's qualified name for its ``weight``, the
            parameter's name for attention projections (``...in_proj_weight``), as
            :func:`~lightning_compress.core.layers.select_weights` selects and ``MagnitudePruning`` takes them.
        sparsities: Tested sparsities, in ``(0, 1)``.

    Returns:
        Rows ``{"layer", "sparsity", "accuracy", "drop"}``, with a ``sparsity=0`` row (the dense
        baseline, measured once) first for every layer.

    Raises:
        ValueError: On invalid ``sparsities`` or no layers.

    Example:
        >>> rows = layer_sensitivity(nn.Sequential(nn.Linear(2, 2)), lambda m: 1.0, ["0"], [0.5])
        >>> rows[-1]["drop"]
        0.0
    """
    sparsities = check_sparsities(sparsities)
    if not layers:
        raise ValueError("layers must name at least one layer")
    parameters = {weight_label(name): name for name in weight_parameters(module)}
    unknown = [layer for layer in layers if layer not in parameters]
    if unknown:
        raise ValueError(f"layers {unknown} name no weight; weights are: {list(parameters)}")
    baseline = float(evaluate(module))
    rows = []
    for layer in layers:
        weight = module.get_parameter(parameters[layer])
        original = weight.detach().clone()
        rows.append({"layer": layer, "sparsity": 0.0, "accuracy": baseline, "drop": 0.0})
        try:
            for sparsity in sparsities:
                mask = layerwise_magnitude_masks({layer: original}, {layer: sparsity})[layer]
                with torch.no_grad():
                    weight.copy_(original * mask)
                accuracy = float(evaluate(module))
                rows.append({"layer": layer, "sparsity": sparsity, "accuracy": accuracy, "drop": baseline - accuracy})
        finally:
            with torch.no_grad():
                weight.copy_(original)
    return rows


def sensitivity_targets(rows: Sequence[Mapping[str, Any]], max_drop: float = 0.01) -> dict[str, float]:
    """Per layer, the highest tested sparsity whose accuracy drop is at most ``max_drop``.

    Args:
        rows: From :func:`layer_sensitivity`.
        max_drop: Tolerated absolute accuracy drop (``0.01`` = one percentage point), >= 0.

    Returns:
        ``{layer name: sparsity}`` in layer order (0.0 for a layer that tolerates no tested sparsity):
        ``MagnitudePruning(final_sparsity=targets, scope="layerwise")`` takes it as it is.

    Raises:
        ValueError: If ``max_drop < 0``.

    Example:
        >>> sensitivity_targets([{"layer": "a", "sparsity": 0.5, "drop": 0.2}], max_drop=0.1)
        {'a': 0.0}
    """
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    by_layer: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], []).append(row)
    targets = {}
    for layer, layer_rows in by_layer.items():
        targets[layer] = 0.0
        # a higher sparsity counts only if every lower one was tolerated too (noise can go back up)
        for row in sorted(layer_rows, key=lambda r: r["sparsity"]):
            if row["drop"] > max_drop:
                break
            targets[layer] = float(row["sparsity"])
    return targets


def write_sensitivity(
    rows: Sequence[Mapping[str, Any]],
    targets: Mapping[str, float],
    directory: str | os.PathLike[str],
    max_drop: float,
    selection: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``sensitivity.csv``, ``sensitivity.png`` (with matplotlib) and ``pruning_targets.yaml``, atomically.

    ``pruning_targets.yaml`` holds ``MagnitudePruning`` constructor arguments: ``final_sparsity`` (the
    per-layer mapping), ``scope: layerwise`` and the ``selection`` (``include``/``exclude``) used.

    Args:
        rows: From :func:`layer_sensitivity`.
        targets: From :func:`sensitivity_targets`.
        directory: Where to write.
        max_drop: The tolerance the targets were derived with (recorded in a comment).
        selection: ``include``/``exclude`` patterns used to select the layers, if any.

    Returns:
        Paths by kind (``csv``, ``targets``, ``png``).

    Example:
        >>> # write_sensitivity(rows, sensitivity_targets(rows), "sensitivity/", 0.01)
    """
    import yaml

    directory = Path(directory)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["layer", "sparsity", "accuracy", "drop"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in writer.fieldnames} for row in rows)
    paths = {"csv": directory / "sensitivity.csv", "targets": directory / "pruning_targets.yaml"}
    write_text_atomic(paths["csv"], buffer.getvalue())
    arguments = {"final_sparsity": dict(targets), "scope": "layerwise"}
    arguments.update({k: v for k, v in (selection or {}).items() if v})
    header = (f"# MagnitudePruning arguments from a sensitivity analysis: per layer, the highest tested\n"
              f"# sparsity that cost at most {max_drop} accuracy when that layer alone was pruned.\n")
    write_text_atomic(paths["targets"], header + yaml.safe_dump(arguments, sort_keys=False))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return paths
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for layer in dict.fromkeys(row["layer"] for row in rows):
        points = [(r["sparsity"], r["accuracy"]) for r in rows if r["layer"] == layer]
        ax.plot(*zip(*points), marker="o", label=layer)
    ax.set_xlabel("sparsity of the one pruned layer")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=6, ncol=2)
    paths["png"] = directory / "sensitivity.png"
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return paths
