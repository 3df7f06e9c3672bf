"""How a user's network becomes an FX graph that quantization can prepare.

FX symbolic tracing runs ``forward`` once with proxies and records the ops. Two things go wrong with
networks users bring, and this module handles both before :func:`~lightning_compress.quantization.prepare.prepare`:

* code FX cannot trace (data-dependent control flow...): :func:`check_traceable` names the innermost
  module at fault and the ``skip`` pattern that keeps it in fp32, before any training;
* code that reads ``self.training``: tracing freezes the mode it was traced in into the graph. Traced in
  train mode for QAT, timm's ``BatchNormAct2d`` would normalize with batch statistics in eval mode too
  (and raise at batch size 1), torchvision's ``StochasticDepth`` would drop residual branches at random.
  :func:`traceable_network` traces batch norms written outside torch as torch's own ``BatchNorm`` (a
  leaf that follows the mode and folds into the convolution before it, as torchvision's do) and
  ``F.dropout(..., training=self.training)`` as a dropout module, and keeps every other module whose
  traced code depends on the mode as an fp32 leaf. A network whose own ``forward`` depends on the mode
  otherwise is refused up front (:func:`check_mode_independent`).

A network wrapped by ``torch.compile`` is seen through (the module inside is traced); a wrapped submodule is
refused by :func:`check_traceable`, naming the remedy.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class NormAct(nn.BatchNorm2d):  # as timm's BatchNormAct2d
    ...     def forward(self, x):
    ...         return torch.relu(nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
    ...                                                    self.bias, self.training, self.momentum, self.eps))
    >>> net, leaves = traceable_network(nn.Sequential(nn.Conv2d(3, 4, 3), NormAct(4), nn.Dropout(0.5)).train())
    >>> type(net.get_submodule("1")).__name__, leaves
    ('BatchNorm2d', [])
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import fx, nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_compress.core.layers import unwrap_compiled


class _PathTracer(fx.Tracer):
    """An FX tracer that knows which module each node was recorded in (``node.meta["module_path"]``),
    and which module it was inside when tracing failed."""

    def __init__(self, leaves: Sequence[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)
        self.path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()  # left on the stack when tracing raises: the innermost module at fault
        return out

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["module_path"] = self.path[-1] if self.path else ""
        return node


def check_traceable(network: nn.Module, skip: Sequence[str] = (), prefix: str = "") -> None:
    """Symbolically trace ``network`` (cheap, no data) to fail before training if FX cannot.

    Args:
        network: The network to quantize (a ``torch.compile`` wrapper: the module inside).
        skip: Module names (relative to ``network``) kept as opaque fp32 leaves.
        prefix: How the caller names the network, for the message.

    Raises:
        ValueError: Naming the innermost module whose ``forward`` cannot be traced and the skip
            pattern that keeps it in fp32, or a submodule wrapped by ``torch.compile``.

    Example:
        >>> check_traceable(nn.Sequential(nn.Linear(2, 2)))
    """
    network = unwrap_compiled(network)
    wrapped = [name for name, module in network.named_modules() if isinstance(module, OptimizedModule)
               and not any(name == leaf or name.startswith(leaf + ".") for leaf in skip)]
    if wrapped:
        name = prefix + wrapped[0]
        raise ValueError(
            f"cannot quantize {name!r}: it is wrapped by torch.compile, and FX tracing cannot see into a compiled "
            f"submodule; compile it in place instead ({name}.compile()), or compile the whole network (quantization "
            f"prepares the module inside the wrapper), or keep it in fp32 with skip=[{name!r}]"
        )
    tracer = _PathTracer(skip)
    try:
        tracer.trace(network)
    except Exception as err:  # FX raises TraceError, TypeError, AttributeError... depending on the code
        where = tracer.path[-1] if tracer.path and tracer.path[-1] else ""
        if where:
            hint = f"keep it in fp32 with skip=[{(prefix + where)!r}]"
        else:
            hint = "the failing code is in the network's own forward; skip its children or simplify that forward"
        raise ValueError(
            f"cannot trace module {(prefix + where).rstrip('.') or type(network).__name__!r} for "
            f"quantization ({type(err).__name__}: {err}); {hint}"
        ) from err


def check_mode_independent(network: nn.Module, skip: Sequence[str] = (), prefix: str = "") -> None:
    """Refuse a network whose own ``forward`` (not a submodule's) depends on ``self.training``.

    Submodules that do are kept as fp32 leaves (:func:`traceable_network`); the network itself cannot
    be. Dropout calls that take ``training=self.training`` are fine (they are traced as dropout modules).

    Args:
        network: The network to quantize.
        skip: Module names kept as fp32 leaves.
        prefix: How the caller names the network, for the message.

    Raises:
        ValueError: Saying why, and what to change.

    Example:
        >>> check_mode_independent(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    """
    network = unwrap_compiled(network)
    if "" in _mode_dependence(network, skip)[0]:
        raise _mode_dependent_forward(network, prefix)


def check_quantizable(network: nn.Module, skip: Sequence[str] = (), prefix: str = "") -> None:
    """Both checks the quantization callbacks run in ``setup``: :func:`check_traceable`, then
    :func:`check_mode_independent`.

    Args:
        network: The network to quantize.
        skip: Module names kept as fp32 leaves.
        prefix: How the caller names the network, for the messages.

    Raises:
        ValueError: As those two do.

    Example:
        >>> check_quantizable(nn.Sequential(nn.Linear(2, 2)), prefix="model.")
    """
    check_traceable(network, skip, prefix)
    check_mode_independent(network, skip, prefix)


def _mode_dependent_forward(network: nn.Module, prefix: str = "") -> ValueError:
    """The error refusing a network whose own forward depends on the mode."""
    name = prefix.rstrip(".") or type(network).__name__
    return ValueError(
        f"cannot quantize {name!r}: its own forward behaves differently in train and eval mode (code that reads "
        f"self.training other than dropout), and FX tracing would freeze train mode into the quantized network; "
        f"move that code into a submodule (it then stays fp32) or make the network's forward independent of the mode"
    )


def traceable_network(network: nn.Module, skip: Sequence[str] = ()) -> tuple[nn.Module, list[str]]:
    """``network`` in a form whose traced graph follows train/eval mode, and the modules to keep as leaves.

    * Batch norms written outside torch that call ``F.batch_norm`` once (timm's ``BatchNormAct2d``) are
      traced as torch's own class, sharing their parameters and buffers and keeping their children (the
      activation after the norm), so they fold into the convolution before them.
    * Dropout calls given ``training=self.training`` (timm's classifier head) are traced as dropout
      modules, which follow the mode.
    * Every other module outside ``torch.nn`` whose traced graph differs between train and eval mode is
      added to the leaves (fp32, run as it is: torchvision's ``StochasticDepth``, timm's ``DropPath``).

    With a rewrite the result is a ``GraphModule`` with the network's parameter names and objects; a
    network that needs none comes back as it is.

    Args:
        network: The network to quantize, in the mode it will be traced in.
        skip: Module names kept as fp32 leaves already.

    Returns:
        ``(network to prepare, leaves)``: ``skip`` plus the mode-dependent modules.

    Raises:
        ValueError: If the network's own forward depends on the mode (:func:`check_mode_independent`).

    Example:
        >>> net, leaves = traceable_network(nn.Sequential(nn.Linear(2, 2)), ["0"])
        >>> leaves
        ['0']
    """
    leaves = list(skip)
    structural, dropouts = _mode_dependence(network, leaves)
    if "" in structural:
        raise _mode_dependent_forward(network)
    norms = []
    for name in structural:
        module = network.get_submodule(name)
        (norms if isinstance(module, _BatchNorm) and _torch_norm_class(module) else leaves).append(name)
    if not norms and not dropouts:
        return network, leaves
    graph = _PathTracer(leaves).trace(network)
    unrewritable = [name for name in norms if len(_calls(graph, name, (nn.functional.batch_norm,))) != 1]
    if unrewritable:  # kept as leaves, traced again without them
        leaves += unrewritable
        norms = [name for name in norms if name not in unrewritable]
        graph = _PathTracer(leaves).trace(network)
    model = fx.GraphModule(network, graph)
    for name in norms:
        _trace_as_torch_norm(model, name, network.get_submodule(name))
    for name in dropouts:
        for node in _calls(model.graph, name, tuple(_DROPOUTS)):
            _trace_as_dropout_module(model, node)
    model.graph.lint()
    model.recompile()
    return model, leaves


_DROPOUTS = {nn.functional.dropout: nn.Dropout, nn.functional.dropout1d: nn.Dropout1d,
             nn.functional.dropout2d: nn.Dropout2d, nn.functional.dropout3d: nn.Dropout3d,
             nn.functional.alpha_dropout: nn.AlphaDropout, nn.functional.feature_alpha_dropout: nn.FeatureAlphaDropout}
"""Functional dropouts and the modules that compute them following the module's mode."""


def _mode_dependence(network: nn.Module, leaves: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Modules outside ``torch`` whose traced graph differs between train and eval mode, innermost first:
    ``(structurally, only in the training flag of dropout calls)``."""
    structural: list[str] = []
    dropouts: list[str] = []
    modules = [(name, module) for name, module in network.named_modules()
               if not type(module).__module__.startswith("torch.")
               and not any(name == leaf or name.startswith(leaf + ".") for leaf in leaves)]
    for name, module in sorted(modules, key=lambda item: (item[0] == "", -item[0].count("."))):  # innermost first
        try:
            if "training" not in inspect.getsource(type(module)):  # forward and the methods it calls
                continue
        except (OSError, TypeError):  # no source (defined interactively): traced in both modes below
            pass
        inner = [other[len(name) + 1:] if name else other for other in (*structural, *leaves)
                 if not name or other.startswith(name + ".")]
        mode = module.training
        try:
            graphs = []
            for training in (True, False):
                module.train(training)
                graphs.append(_PathTracer(inner).trace(module))
        except Exception:  # noqa: BLE001 -- not traceable alone: check_traceable judges the whole network
            continue
        finally:
            module.train(mode)
        codes = [fx.GraphModule(module, graph).code for graph in graphs]
        if codes[0] == codes[1]:
            continue
        for graph in graphs:  # the same but for dropout's training flag?
            for node in graph.nodes:
                if node.target in _DROPOUTS:
                    node.args, node.kwargs = node.args[:2], {**node.kwargs, "training": None}
        same = fx.GraphModule(module, graphs[0]).code == fx.GraphModule(module, graphs[1]).code
        (dropouts if same else structural).append(name)
    return structural, dropouts


def _calls(graph: fx.Graph, name: str, functions: tuple) -> list[fx.Node]:
    """The calls of ``functions`` recorded by module ``name`` itself."""
    return [node for node in graph.nodes if node.meta.get("module_path") == name
            and node.op == "call_function" and node.target in functions]


def _trace_as_dropout_module(model: fx.GraphModule, node: fx.Node) -> None:
    """Replace a functional dropout call by a call of the equivalent dropout module (registered on ``model``)."""
    probability = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    inplace = node.args[3] if len(node.args) > 3 else node.kwargs.get("inplace", False)
    if isinstance(probability, fx.Node) or isinstance(inplace, fx.Node):
        raise ValueError(f"cannot quantize: dropout {node.name!r} takes its probability from the data")
    target = f"{node.name}_module"
    model.add_module(target, _DROPOUTS[node.target](probability, inplace))
    with model.graph.inserting_before(node):
        replacement = model.graph.call_module(target, (node.args[0],))
    node.replace_all_uses_with(replacement)
    model.graph.erase_node(node)


def _torch_norm_class(module: _BatchNorm) -> type[_BatchNorm] | None:
    """The public torch batch-norm class ``module``'s class derives from (``nn.BatchNorm2d``...), or None."""
    return next((cls for cls in type(module).__mro__
                 if cls.__module__ == "torch.nn.modules.batchnorm" and not cls.__name__.startswith("_")), None)


def _trace_as_torch_norm(model: fx.GraphModule, name: str, module: _BatchNorm) -> None:
    """Replace the ops ``module`` recorded in ``model`` (one ``F.batch_norm`` call, input checks, the
    ``num_batches_tracked`` update) by one call of an equivalent torch batch norm at the same path."""
    own = [node for node in model.graph.nodes if node.meta.get("module_path") == name]
    calls = _calls(model.graph, name, (nn.functional.batch_norm,))
    norm = _torch_norm_class(module)(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
    for key, parameter in module.named_parameters(recurse=False):
        norm.register_parameter(key, parameter)
    for key, buffer in module.named_buffers(recurse=False):
        norm.register_buffer(key, buffer)
    for key, child in module.named_children():
        norm.add_module(key, child)
    norm.train(module.training)
    parent, _, last = name.rpartition(".")
    (model.get_submodule(parent) if parent else model).add_module(last, norm)
    with model.graph.inserting_before(calls[0]):
        replacement = model.graph.call_module(name, (calls[0].args[0],))
    calls[0].replace_all_uses_with(replacement)
    for node in reversed(own):  # the norm's own bookkeeping (input checks, num_batches_tracked += 1)
        if not node.users:
            model.graph.erase_node(node)
