"""Per-layer pruning sensitivity: prune one layer at a time, measure accuracy, derive per-layer targets.

Distiller's sensitivity analysis: each selected layer alone is magnitude-pruned to each tested
sparsity and the model evaluated; :func:`sensitivity_targets` turns the rows into the
``final_sparsity`` mapping ``MagnitudePruning(scope="layerwise")`` accepts.

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
    """The tested sparsities sorted and de-duplicated; ``ValueError`` if empty or one is outside ``(0, 1)``.

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
    """Accuracy of ``module`` with each layer's weight alone pruned to each sparsity; ``module`` is restored.

    Args:
        module: The model (or LightningModule) holding the layers.
        evaluate: Returns the accuracy of ``module`` (e.g. on a few validation batches).
        layers: Weight labels, as :func:`~lightning_compress.core.layers.select_weights` selects them and
            ``MagnitudePruning`` takes them (a layer's name, or a parameter's: ``...in_proj_weight``).
        sparsities: Tested sparsities, in ``(0, 1)``.

    Returns:
        Rows ``{"layer", "sparsity", "accuracy", "drop"}``, each layer's first being the dense baseline
        (``sparsity=0``, measured once).

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
    """Per layer, the highest tested sparsity whose drop, and every lower one's, is at most ``max_drop``.

    ``max_drop`` is absolute (``0.01`` = one percentage point) and >= 0. The result, in layer order (0.0
    where no tested sparsity is tolerated), is ``MagnitudePruning(scope="layerwise")``'s ``final_sparsity``.

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
    """Write ``sensitivity.csv``, ``sensitivity.png`` (matplotlib) and ``pruning_targets.yaml`` atomically.

    ``pruning_targets.yaml`` holds ``MagnitudePruning`` arguments: ``final_sparsity`` (``targets``),
    ``scope: layerwise`` and the ``selection`` (``include``/``exclude``) used; ``max_drop`` goes in a
    comment. Returns the paths by kind (``csv``, ``targets``, ``png``).
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
