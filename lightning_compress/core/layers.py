"""Which layers a technique acts on: selection by layer type and name pattern.

Callbacks keep qualified names (``model.layer1.0.conv1``), never module objects, because other
callbacks replace modules. The default rule, shared by every technique: every ``Conv`` and ``Linear``
layer except the first convolution (the stem) and the last ``Linear`` (the classifier). Patterns are
shell-style globs matched against the whole name, e.g. ``"model.layer3.*"``. A network wrapped by
``torch.compile`` is seen through (:func:`unwrap_compiled`): patterns match the names the uncompiled
network has.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

WEIGHTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layer types whose ``weight`` compression techniques act on by default."""

WEIGHT_MATRICES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}
"""Weight matrices held as parameters other than ``weight``, by module type: candidates of :func:`select_weights`.
``nn.MultiheadAttention`` registers ``in_proj_weight`` when queries, keys and values share one size
and the three ``*_proj_weight`` otherwise (the absent ones are ``None``); its output projection is an
``nn.Linear`` and a candidate anyway."""


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (``compiled._orig_mod``), or ``module`` if not wrapped.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrap_compiled(torch.compile(net)) is net, unwrap_compiled(net) is net
        (True, True)
    """
    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs compiled: wrapped by ``torch.compile(module)``, or ``module.compile()`` in place."""
    return isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None


def uncompiled_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` parts a ``torch.compile`` wrapper adds: the name users write.

    Example:
        >>> uncompiled_name("net._orig_mod.conv1")
        'net.conv1'
    """
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _as_patterns(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether the qualified ``name`` matches one of the glob ``patterns`` as a whole."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def weighted_layers(
    module: nn.Module, layer_types: tuple[type[nn.Module], ...] = WEIGHTED_LAYER_TYPES
) -> list[str]:
    """Names of all layers of ``layer_types`` (subclasses included) with a ``weight`` tensor, in order."""
    return [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, layer_types) and isinstance(getattr(layer, "weight", None), torch.Tensor)
    ]


def select_layers(
    module: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_types: tuple[type[nn.Module], ...] = WEIGHTED_LAYER_TYPES,
    argument_names: tuple[str, str] = ("include", "exclude"),
) -> list[str]:
    """Names of the layers selected by the default rule or ``include``, minus ``exclude``, in order.

    Args:
        module: The model (or LightningModule) to scan.
        include: Glob patterns of layers to select; ``None`` applies the default rule.
        exclude: Glob patterns of layers to leave out.
        layer_types: The layer classes that are candidates.
        argument_names: How the caller names ``include`` and ``exclude``, for errors.

    Raises:
        ValueError: If a pattern matches no candidate or nothing is selected (the message lists candidates).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> select_layers(net), select_layers(net, include="*", exclude="3")
        (['1'], ['0', '1'])
    """
    candidates = weighted_layers(module, layer_types)
    return _apply_rule({name: module.get_submodule(name) for name in candidates}, include, exclude, argument_names)


def _apply_rule(
    owners: dict[str, nn.Module],
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    argument_names: tuple[str, str],
) -> list[str]:
    """The default rule or ``include``, minus ``exclude``, over candidate labels mapped to their modules.

    A label matches a pattern as it is or as :func:`uncompiled_name` writes it; errors list the latter."""
    candidates = list(owners)
    shown = [uncompiled_name(name) for name in candidates]

    def matches(name: str, patterns: Iterable[str]) -> bool:
        return matches_any(name, patterns) or matches_any(uncompiled_name(name), patterns)

    include_patterns, exclude_patterns = _as_patterns(include), _as_patterns(exclude)
    for patterns, argument in zip((include_patterns, exclude_patterns), argument_names):
        for pattern in patterns:
            if not any(matches(name, [pattern]) for name in candidates):
                raise ValueError(f"{argument} pattern {pattern!r} matches no layer; candidate layers are: {shown}")
    if include_patterns:
        selected = [name for name in candidates if matches(name, include_patterns)]
    else:
        first_conv = next((n for n in candidates if isinstance(owners[n], nn.modules.conv._ConvNd)), None)
        last_linear = next((n for n in reversed(candidates) if isinstance(owners[n], nn.Linear)), None)
        selected = [name for name in candidates if name not in (first_conv, last_linear)]
    selected = [name for name in selected if not matches(name, exclude_patterns)]
    if not selected:
        raise ValueError(
            f"no layer selected by {argument_names[0]}={include!r}, {argument_names[1]}={exclude!r}; "
            f"candidate layers are: {shown}"
        )
    return selected


def weight_label(parameter_name: str) -> str:
    """The name patterns match a weight by: its layer's name for a ``weight``, else the parameter's name.

    Example:
        >>> weight_label("model.fc.weight"), weight_label("model.attn.in_proj_weight")
        ('model.fc', 'model.attn.in_proj_weight')
    """
    return parameter_name[: -len(".weight")] if parameter_name.endswith(".weight") else parameter_name


def weight_parameters(
    module: nn.Module, layer_types: tuple[type[nn.Module], ...] = WEIGHTED_LAYER_TYPES
) -> list[str]:
    """Names of every weight matrix: each ``layer_types`` layer's ``weight``, and :data:`WEIGHT_MATRICES`.

    Example:
        >>> weight_parameters(nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1, kdim=2, vdim=2)))
        ['0.weight', '1.q_proj_weight', '1.k_proj_weight', '1.v_proj_weight', '1.out_proj.weight']
    """
    names = []
    for name, layer in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(layer, layer_types) and isinstance(getattr(layer, "weight", None), torch.Tensor):
            names.append(prefix + "weight")
        for owner_type, attributes in WEIGHT_MATRICES.items():
            if isinstance(layer, owner_type):
                names += [prefix + a for a in attributes if isinstance(getattr(layer, a, None), torch.Tensor)]
    return names


def select_weights(
    module: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    argument_names: tuple[str, str] = ("include", "exclude"),
) -> list[str]:
    """Select weight matrices by parameter: the rule of :func:`select_layers` over :func:`weight_parameters`.

    Patterns match each weight's :func:`weight_label`; arguments and errors are as for :func:`select_layers`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.MultiheadAttention(8, 2), nn.Linear(8, 2))
        >>> select_weights(net)
        ['2.in_proj_weight', '2.out_proj.weight']
        >>> select_weights(net, exclude="*.in_proj_weight")
        ['2.out_proj.weight']
    """
    parameters = {weight_label(name): name for name in weight_parameters(module)}
    owners = {label: module.get_submodule(name.rpartition(".")[0]) for label, name in parameters.items()}
    return [parameters[label] for label in _apply_rule(owners, include, exclude, argument_names)]


def resolve_parameters(module: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Map qualified parameter names to the tensors in the module's *current* tree (``KeyError`` if gone)."""
    params = dict(module.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise KeyError(f"parameters {missing} are not in the model any more; it has: {sorted(params)}")
    return {name: params[name] for name in names}


def find_network(pl_module: nn.Module, attribute: str | None = None) -> tuple[str, nn.Module]:
    """``(attribute, network)``: the child of ``pl_module`` named ``attribute``, or else the only child
    holding Conv/Linear layers. Raises ``ValueError`` if there is no such child, or several.

    ``network`` is the module that computes: a ``torch.compile`` wrapper is seen through
    (:func:`unwrap_compiled`).

    Example:
        >>> holder = nn.Module(); holder.net = nn.Linear(2, 2)
        >>> find_network(holder)[0]
        'net'
    """
    if attribute is not None:
        child = getattr(pl_module, attribute, None)
        if not isinstance(child, nn.Module):
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(f"network attribute {attribute!r} is not a submodule; submodules are: {children}")
        return attribute, unwrap_compiled(child)
    found = [(name, child) for name, child in pl_module.named_children() if weighted_layers(child)]
    if len(found) != 1:
        raise ValueError(
            "cannot tell which submodule is the network: submodules with Conv/Linear layers are "
            f"{[name for name, _ in found]}; pass the attribute name explicitly (e.g. network='model')"
        )
    return found[0][0], unwrap_compiled(found[0][1])
