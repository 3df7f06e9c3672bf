"""Per-layer latency measured on the runtime a model ships to, cached per machine.

NetAdapt's lookup table (Yang et al., 2018): each convolution or linear layer of a candidate network is
built alone as an ONNX model (fp32, or the int8 form onnxruntime fuses from a QDQ model: ``uint8`` codes
in and out, ``int8`` per-channel weights), timed in the runtime at the deployment's batch size and thread
count, and stored under its shape, so a network's candidate widths cost one measurement per new layer
shape. Each layer is timed in rounds taking turns with a fixed reference convolution and stored in the
reference's units, so that a machine whose speed drifts between (or during) measurements still gives layers
costs that compare. :class:`LatencyTable` keeps the table in a JSON file per (CPU, runtime, batch size,
threads).

Example:
    >>> table = LatencyTable(runtime="onnxruntime", batch_size=1, threads=1, repeats=5)
    >>> shape = LayerShape("conv", 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    >>> table.layer_ms(shape, int8=False) >= 0.0
    True
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress.core.files import write_text_atomic
from lightning_compress.core.machine import cpu_description
from lightning_compress.core.onnx import OPSET, onnx_session, require_onnx
from lightning_compress.core.timing_lock import exclusive_timing
from lightning_compress.quantization.engines import INT8_WEIGHT_MAX

TABLE_RUNTIMES = ("onnxruntime", "openvino")
"""Runtimes a per-layer latency table is measured on (both run ONNX models, built one layer at a time)."""
RUNTIMES = (*TABLE_RUNTIMES, "executorch")
"""Runtimes a plan can target. ExecuTorch's layers are costed by onnxruntime's table (lowering one program per
layer takes tens of seconds), scaled by the end-to-end ExecuTorch measurements the latency model is calibrated
and checked on."""
CACHE_VERSION = 2
MEASURE_ROUNDS = 5
"""Rounds in which a layer and the reference take turns; an entry is the median of the rounds' ratios."""


@dataclass(frozen=True)
class LayerShape:
    """What decides one layer's latency: its kind, channels, kernel geometry and input size.

    Args:
        kind: ``"conv"`` (``Conv2d``) or ``"linear"``.
        in_channels: Input channels (features of a linear layer).
        out_channels: Output channels.
        kernel: Kernel height and width (``(1, 1)`` for a linear layer).
        stride: Convolution stride.
        padding: Convolution padding.
        dilation: Convolution dilation.
        groups: Convolution groups (``in_channels`` for a depthwise convolution).
        size: Input height and width (``(1, 1)`` for a linear layer).
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    size: tuple[int, int]

    def key(self) -> str:
        """The table key: every field, in order.

        Example:
            >>> LayerShape("linear", 64, 10, (1, 1), (1, 1), (0, 0), (1, 1), 1, (1, 1)).key()
            'linear 64x10 k1x1 s1x1 p0x0 d1x1 g1 @1x1'
        """
        def pair(values: tuple[int, int]) -> str:
            return f"{values[0]}x{values[1]}"

        return (f"{self.kind} {self.in_channels}x{self.out_channels} k{pair(self.kernel)} s{pair(self.stride)} "
                f"p{pair(self.padding)} d{pair(self.dilation)} g{self.groups} @{pair(self.size)}")

    def macs(self) -> int:
        """Multiply-accumulates of one image through the layer.

        Example:
            >>> LayerShape("conv", 3, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8)).macs()
            13824
        """
        height, width = self.output_size()
        per_output = self.in_channels // self.groups * self.kernel[0] * self.kernel[1]
        return self.out_channels * per_output * height * width

    def output_size(self) -> tuple[int, int]:
        """Output height and width."""
        return tuple((self.size[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1)
                     // self.stride[i] + 1 for i in range(2))

    def parameters(self) -> int:
        """Weights and bias elements."""
        return self.out_channels * (self.in_channels // self.groups * self.kernel[0] * self.kernel[1] + 1)


def layer_shapes(network: nn.Module, example: torch.Tensor) -> dict[str, LayerShape]:
    """The shape of every ``Conv2d`` and ``Linear`` of ``network``, seen on one forward pass of ``example``.

    Args:
        network: The network (left unchanged).
        example: An input batch.

    Returns:
        ``{layer name: LayerShape}`` in call order.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
        >>> {name: s.key() for name, s in layer_shapes(net, torch.randn(1, 3, 4, 4)).items()}["2"]
        'linear 128x2 k1x1 s1x1 p0x0 d1x1 g1 @1x1'
    """
    shapes: dict[str, LayerShape] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if isinstance(module, nn.Conv2d):
                padding = module.padding if isinstance(module.padding, tuple) else (0, 0)
                shapes.setdefault(name, LayerShape(
                    "conv", module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                    tuple(padding), tuple(module.dilation), module.groups, tuple(args[0].shape[-2:])))
            else:
                shapes.setdefault(name, LayerShape("linear", module.in_features, module.out_features,
                                                   (1, 1), (1, 1), (0, 0), (1, 1), 1, (1, 1)))
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in network.named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear))]
    modes = [(m, m.training) for m in network.modules()]
    try:
        network.eval()
        with torch.no_grad():
            network(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return shapes


def layer_onnx(shape: LayerShape, batch_size: int, int8: bool, weight_max: int = INT8_WEIGHT_MAX) -> bytes:
    """One layer alone as an ONNX model, with random weights.

    fp32: a ``Conv`` (or ``Gemm``) on float input. int8: ``DequantizeLinear -> Conv -> QuantizeLinear`` on
    ``uint8`` codes with per-channel ``int8`` weights, which onnxruntime fuses into one int8 kernel, as it
    does inside a QDQ network (no extra quantize/dequantize of the layer's own input and output).

    Args:
        shape: The layer.
        batch_size: The input batch size.
        int8: Build the int8 form.
        weight_max: The int8 form's largest weight code (the engine's
            :attr:`~lightning_compress.quantization.engines.Engine.weight_quant_max`): on x86 CPUs without
            VNNI our exact sessions run a layer whose weights leave -64..63 on slower kernels.

    Returns:
        The serialized model.
    """
    require_onnx("latency tables")
    from onnx import TensorProto, helper, numpy_helper

    generator = np.random.default_rng(0)
    per_output = shape.in_channels // shape.groups * shape.kernel[0] * shape.kernel[1]
    if shape.kind == "conv":
        weight_shape = [shape.out_channels, shape.in_channels // shape.groups, *shape.kernel]
        input_shape = [batch_size, shape.in_channels, *shape.size]
        output_shape = [batch_size, shape.out_channels, *shape.output_size()]
    else:
        weight_shape = [shape.out_channels, shape.in_channels]
        input_shape, output_shape = [batch_size, shape.in_channels], [batch_size, shape.out_channels]
    bias = numpy_helper.from_array(generator.standard_normal(shape.out_channels).astype(np.float32), "bias")
    initializers, nodes = [bias], []
    x, y = "x", "y"
    if int8:
        codes = generator.integers(-weight_max, weight_max + 1, size=weight_shape, dtype=np.int8)
        initializers += [numpy_helper.from_array(codes, "w_codes"),
                         numpy_helper.from_array(np.full(shape.out_channels, 1.0 / per_output, np.float32), "w_scale"),
                         numpy_helper.from_array(np.zeros(shape.out_channels, np.int8), "w_zero"),
                         numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
                         numpy_helper.from_array(np.array(128, np.uint8), "a_zero")]
        nodes += [helper.make_node("DequantizeLinear", ["w_codes", "w_scale", "w_zero"], ["w"], axis=0),
                  helper.make_node("DequantizeLinear", ["x", "a_scale", "a_zero"], ["x_float"])]
        x, y = "x_float", "y_float"
    else:
        weight = (generator.standard_normal(weight_shape) / np.sqrt(per_output)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, "w"))
    if shape.kind == "conv":
        nodes.append(helper.make_node("Conv", [x, "w", "bias"], [y], kernel_shape=list(shape.kernel),
                                      strides=list(shape.stride), dilations=list(shape.dilation), group=shape.groups,
                                      pads=[shape.padding[0], shape.padding[1], shape.padding[0], shape.padding[1]]))
    else:
        nodes.append(helper.make_node("Gemm", [x, "w", "bias"], [y], transB=1))
    if int8:
        nodes.append(helper.make_node("QuantizeLinear", [y, "a_scale", "a_zero"], ["y"]))
    element = TensorProto.UINT8 if int8 else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", element, input_shape)],
                              [helper.make_tensor_value_info("y", element, output_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return model.SerializeToString()


def table_runtime(runtime: str) -> str:
    """The runtime whose per-layer table costs ``runtime``'s layers: itself, or onnxruntime for ExecuTorch.

    Example:
        >>> table_runtime("openvino"), table_runtime("executorch")
        ('openvino', 'onnxruntime')
    """
    return runtime if runtime in TABLE_RUNTIMES else "onnxruntime"


def runtime_runner(model: bytes, runtime: str, threads: int) -> Callable[[np.ndarray], Any]:
    """A callable running ``model`` in ``runtime`` on one input array.

    Args:
        model: ONNX bytes; for ``"executorch"`` an ExecuTorch program's (its thread pool is resized to ``threads``).
        runtime: One of :data:`RUNTIMES`.
        threads: Inference threads.

    Returns:
        ``run(array)``.
    """
    if runtime == "executorch":
        from lightning_compress.core.executorch import ExecuTorchNetwork, use_threads

        use_threads(threads)
        program = ExecuTorchNetwork(model).loaded()
        return lambda array: program(torch.from_numpy(array))
    if runtime == "onnxruntime":
        session = onnx_session(model, threads)
        name = session.get_inputs()[0].name
        return lambda array: session.run(None, {name: array})
    from lightning_compress.export.openvino import OpenVinoNetwork

    return OpenVinoNetwork(model, threads).compiled()


def channel_block(runtime: str, int8: bool) -> int:
    """The channel block of the runtime's blocked convolution layout on this CPU, or 0 where it has none.

    onnxruntime's fp32 convolutions run in its NCHWc layout, channels in blocks of the CPU's vector width (8 floats
    on AVX2, 16 on AVX-512): a convolution whose input channels fill a block takes blocked input, one with fewer
    runs on plain input and reorders its output. A width between two multiples of the block runs no faster in a
    network than the next multiple up, which a layer timed alone does not show, so plans keep widths above the
    block at its multiples (:attr:`~lightning_compress.planning.widths.ChannelSpace.block`). The block is read from
    the graph onnxruntime optimizes for this CPU: the fewest input channels (of 8 and 16) a convolution takes in
    blocks. int8 kernels, OpenVINO and ExecuTorch get 0 (no block known to matter).

    Args:
        runtime: One of :data:`RUNTIMES`.
        int8: The network runs int8.

    Returns:
        The block (8 or 16), or 0.

    Example:
        >>> channel_block("onnxruntime", int8=False) in (0, 8, 16), channel_block("executorch", int8=False)
        (True, 0)
    """
    return 0 if int8 or runtime != "onnxruntime" else _onnxruntime_block()


@functools.cache
def _onnxruntime_block() -> int:
    require_onnx("latency tables")
    import onnx
    import onnxruntime

    for channels in (8, 16):
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # its warning that the optimized file fits this CPU only
        with tempfile.TemporaryDirectory() as folder:
            options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
            shape = LayerShape("conv", channels, channels, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
            onnxruntime.InferenceSession(layer_onnx(shape, 1, int8=False), options,
                                         providers=["CPUExecutionProvider"])
            nodes = onnx.load(options.optimized_model_filepath).graph.node
        if any(node.op_type == "ReorderInput" for node in nodes):
            return channels
    return 0


def round_medians(calls: Mapping[str, Callable[[], Any]], repeats: int, rounds: int,
                  warmup: int = 3) -> dict[str, list[float]]:
    """Each call's median milliseconds in each of ``rounds`` rounds of ``repeats`` timed calls, the calls taking
    turns one call at a time (their order reversed every other round), so that a machine whose speed drifts
    within seconds, or load from other processes, hits all alike.

    Example:
        >>> sorted(len(ms) for ms in round_medians({"a": lambda: 1, "b": lambda: 2}, repeats=3, rounds=2).values())
        [2, 2]
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        for _ in range(warmup):
            for name in order:
                calls[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name in order:
                begin = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - begin)
        for name in names:
            times[name].append(statistics.median(samples[name]) * 1e3)
    return times


def interleaved_ms(runners: Mapping[str, Callable[[np.ndarray], Any]], array: np.ndarray, repeats: int,
                   rounds: int = 3) -> dict[str, float]:
    """Each runner's median milliseconds on ``array`` over ``rounds`` interleaved rounds (the median of its
    per-round medians, :func:`round_medians`).

    Example:
        >>> sorted(interleaved_ms({"a": lambda x: x, "b": lambda x: x * 2}, np.ones(4), repeats=3, rounds=2))
        ['a', 'b']
    """
    calls = {name: functools.partial(runner, array) for name, runner in runners.items()}
    return {name: statistics.median(values) for name, values in round_medians(calls, repeats, rounds).items()}


def timed_programs(programs: Mapping[str, bytes], runtime: str, threads: int, array: np.ndarray, repeats: int,
                   rounds: int = 3) -> dict[str, float]:
    """Each runtime program's milliseconds on ``array`` (:func:`runtime_runner`, :func:`interleaved_ms`), timed
    holding the machine's timing lock (:func:`~lightning_compress.core.timing_lock.exclusive_timing`).

    Example:
        >>> timed_programs({"empty": _empty_onnx(np.ones(4, np.float32))}, "onnxruntime", 1, np.ones(4, np.float32),
        ...                repeats=2, rounds=1)["empty"] >= 0
        True
    """
    runners = {name: runtime_runner(program, runtime, threads) for name, program in programs.items()}
    with exclusive_timing():
        return interleaved_ms(runners, array, repeats, rounds)


def _input_array(shape: LayerShape, batch_size: int, int8: bool) -> np.ndarray:
    dims = [batch_size, shape.in_channels, *shape.size] if shape.kind == "conv" else [batch_size, shape.in_channels]
    generator = np.random.default_rng(1)
    if int8:
        return generator.integers(0, 256, size=dims, dtype=np.uint8)
    return generator.standard_normal(dims).astype(np.float32)


REFERENCE_LAYER = LayerShape("conv", 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))
"""The fp32 convolution every table entry is measured against (a ResNet-20 middle-stage layer)."""


class LatencyTable:
    """Measured per-layer latency on one runtime, batch size and thread count, cached in a JSON file.

    A layer's figure is its model's time minus an empty model's on the same input (the runtime's fixed cost per
    call), divided by :data:`REFERENCE_LAYER`'s figure timed in the same rounds: the table stores layers in the
    reference's units, and gives milliseconds at the reference's speed when the table is first used in this
    process. A network's latency is predicted by the sum of its layers mapped through end-to-end measurements
    (:class:`~lightning_compress.planning.planner.LatencyModel` calibrates it).

    Args:
        runtime: One of :data:`TABLE_RUNTIMES`.
        batch_size: The deployment's batch size.
        threads: The deployment's inference threads.
        path: The JSON cache (read if it exists and was measured on this CPU with this runtime version;
            written by :meth:`save`); ``None`` keeps the table in memory.
        repeats: Timed calls per layer (spread over :data:`MEASURE_ROUNDS` rounds).
        weight_max: The int8 layers' largest weight code (the engine's ``weight_quant_max``: 127, or 63 for
            ``onnxruntime_7bit``); layers timed with other codes are other entries of the same cache.

    Example:
        >>> LatencyTable(runtime="tensorrt")
        Traceback (most recent call last):
        ...
        ValueError: runtime must be one of ('onnxruntime', 'openvino'), got 'tensorrt'
    """

    def __init__(self, runtime: str = "onnxruntime", batch_size: int = 1, threads: int = 1,
                 path: str | os.PathLike[str] | None = None, repeats: int = 50,
                 weight_max: int = INT8_WEIGHT_MAX) -> None:
        if runtime not in TABLE_RUNTIMES:
            raise ValueError(f"runtime must be one of {TABLE_RUNTIMES}, got {runtime!r}")
        if isinstance(weight_max, bool) or not isinstance(weight_max, int) or not 1 <= weight_max <= INT8_WEIGHT_MAX:
            raise ValueError(f"weight_max must be an integer in 1..{INT8_WEIGHT_MAX}, got {weight_max!r}")
        for name, value in (("batch_size", batch_size), ("threads", threads), ("repeats", repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.runtime, self.batch_size, self.threads, self.repeats = runtime, batch_size, threads, repeats
        self.weight_max = weight_max
        self.path = Path(path) if path is not None else None
        self.machine = {"cpu": cpu_description(), "runtime": runtime, "version": _runtime_version(runtime),
                        "batch_size": batch_size, "threads": threads}
        self.entries: dict[str, float] = {}
        self.measured = 0
        self._reference_ms: float | None = None
        if self.path is not None and self.path.is_file():
            stored = json.loads(self.path.read_text())
            if stored.get("machine") == self.machine and stored.get("version") == CACHE_VERSION:
                self.entries = {str(k): float(v) for k, v in stored["entries"].items()}

    @property
    def reference_ms(self) -> float:
        """The reference layer's milliseconds, timed once per table object (on first use)."""
        if self._reference_ms is None:
            with exclusive_timing():
                self._reference_ms = statistics.median(self._round_ms({})["reference"])
        return self._reference_ms

    def layer_ms(self, shape: LayerShape, int8: bool) -> float:
        """The layer's latency in milliseconds at the reference's speed (measured on first request, then looked up).

        Args:
            shape: The layer.
            int8: Its int8 form.

        Returns:
            Milliseconds, at least 0.
        """
        key = f"{self._precision_key(int8)} {shape.key()}"
        if key not in self.entries:
            array = _input_array(shape, self.batch_size, int8)
            model = layer_onnx(shape, self.batch_size, int8, self.weight_max)
            with exclusive_timing():
                rounds = self._round_ms({"layer": (self._runner(model), array)})
            self.entries[key] = statistics.median(max(0.0, layer) / max(reference, 1e-6) for layer, reference
                                                  in zip(rounds["layer"], rounds["reference"], strict=True))
            self.measured += 1
        return self.entries[key] * self.reference_ms

    def _precision_key(self, int8: bool) -> str:
        """An entry's precision: ``fp32``, ``int8`` (weights on -127..127) or ``int8w<weight_max>`` (``int8w63``)."""
        if not int8:
            return "fp32"
        return "int8" if self.weight_max == INT8_WEIGHT_MAX else f"int8w{self.weight_max}"

    def _round_ms(self, programs: Mapping[str, tuple[Callable[[np.ndarray], Any], np.ndarray]]
                  ) -> dict[str, list[float]]:
        """Per round, each program's and the reference's milliseconds less the empty model's on the same input."""
        calls = dict(self._reference_calls)
        for name, (runner, array) in programs.items():
            calls[name] = functools.partial(runner, array)
            calls[f"{name} empty"] = functools.partial(self._runner(_empty_onnx(array)), array)
        rounds = round_medians(calls, max(1, self.repeats // MEASURE_ROUNDS), MEASURE_ROUNDS, warmup=1)
        return {name: [ms - empty for ms, empty in zip(rounds[name], rounds[f"{name} empty"], strict=True)]
                for name in (*programs, "reference")}

    @functools.cached_property
    def _reference_calls(self) -> dict[str, Callable[[], Any]]:
        array = _input_array(REFERENCE_LAYER, self.batch_size, False)
        return {"reference": functools.partial(self._runner(layer_onnx(REFERENCE_LAYER, self.batch_size, False)), array),
                "reference empty": functools.partial(self._runner(_empty_onnx(array)), array)}

    def _runner(self, model: bytes) -> Callable[[np.ndarray], Any]:
        return runtime_runner(model, self.runtime, self.threads)

    def network_ms(self, shapes: Mapping[str, LayerShape], int8: bool) -> float:
        """The sum of the layers' latencies (no constant), in milliseconds."""
        return sum(self.layer_ms(shape, int8) for shape in shapes.values())

    def save(self) -> None:
        """Write the table to :attr:`path` atomically (nothing without a path)."""
        if self.path is not None:
            payload = {"version": CACHE_VERSION, "machine": self.machine, "reference": REFERENCE_LAYER.key(),
                       "entries": self.entries}
            write_text_atomic(self.path, json.dumps(payload, indent=1, sort_keys=True) + "\n")

    def describe(self) -> dict[str, Any]:
        """Where and how the table was measured, for reports."""
        return {**self.machine, "layers_in_table": len(self.entries), "repeats": self.repeats,
                "int8_weight_max": self.weight_max,
                "reference_layer": REFERENCE_LAYER.key(), "reference_layer_ms": self._reference_ms}


def _empty_onnx(array: np.ndarray) -> bytes:
    import onnx
    from onnx import helper

    element = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                              [helper.make_tensor_value_info("x", element, list(array.shape))],
                              [helper.make_tensor_value_info("y", element, list(array.shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]).SerializeToString()


def _runtime_version(runtime: str) -> str:
    try:
        module = __import__(runtime)
    except ImportError:
        return "not installed"
    return str(getattr(module, "__version__", None) or getattr(module, "get_version", lambda: "?")())
