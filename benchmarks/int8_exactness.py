"""Does each runtime compute an int8 convolution's sum exactly on this CPU?

The worst case for x86 int8 kernels without VNNI: uint8 activation codes of 255 into a 1x1 convolution of int8
weights of 127 over 16 input channels. Kernels that sum pairs of products in saturating int16 (``vpmaddubsw``)
get 8 x 32,767 = 262,136 instead of 518,160; quantized again at a scale of 4,096 the output code is 64 instead of
127. Read per runtime: onnxruntime as a default session, onnxruntime as ``core.onnx.onnx_session`` opens it
(``session.x64quantprecision``), and OpenVINO (its default precision and ``INFERENCE_PRECISION_HINT=f32``); then
the same with weights of 63, the largest code of the ``onnxruntime_7bit`` engine (pairs of 255 x 63 fit int16).

Run:  python benchmarks/int8_exactness.py
Writes ``benchmarks/results/int8_exactness.{json,md}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from reporting import add_output_arguments, machine_info, machine_line, run_settings, write_results

from lightning_compress.commands.parser import CommandParser
from lightning_compress.core.onnx import onnx_session

CHANNELS, OUTPUT_SCALE = 16, 4096.0
EXACT_CODE = round(255 * 127 * CHANNELS / OUTPUT_SCALE)
"""The output code of exact int32 sums (127); pairs saturated in int16 give 64."""
WEIGHTS = (127, 63)
"""Weight codes read: int8's largest, and the 7-bit engine's."""


def exact_code(weight: int) -> int:
    """The output code of exact int32 sums for weights of ``weight``."""
    return round(255 * weight * CHANNELS / OUTPUT_SCALE)


def worst_case_qdq(shared_zero_point: bool = False, weight: int = 127) -> bytes:
    """The worst-case QDQ model: input codes of 255 (uint8, ``x``) into two such convolutions (outputs ``y_a``,
    ``y_b``) of weights ``weight``; with ``shared_zero_point`` their weights' zero-points are one initializer, as
    the exporter stores equal constants."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                    numpy_helper.from_array(np.array(0, np.uint8), "zero_u8"),
                    numpy_helper.from_array(np.array(OUTPUT_SCALE, np.float32), "out_scale"),
                    numpy_helper.from_array(np.ones(1, np.float32), "w_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "one", "zero_u8"], ["x_float"])]
    for layer in ("a", "b"):
        zero = "w_zero" if shared_zero_point else f"w_zero_{layer}"
        if not any(t.name == zero for t in initializers):
            initializers.append(numpy_helper.from_array(np.zeros(1, np.int8), zero))
        initializers.append(numpy_helper.from_array(np.full((1, CHANNELS, 1, 1), weight, np.int8), f"w_{layer}"))
        nodes += [helper.make_node("DequantizeLinear", [f"w_{layer}", "w_scale", zero], [f"wf_{layer}"], axis=0),
                  helper.make_node("Conv", ["x_float", f"wf_{layer}"], [f"y_float_{layer}"]),
                  helper.make_node("QuantizeLinear", [f"y_float_{layer}", "out_scale", "zero_u8"], [f"y_{layer}"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, CHANNELS, 4, 4])]
    outputs = [helper.make_tensor_value_info(f"y_{layer}", TensorProto.UINT8, [1, 1, 4, 4]) for layer in ("a", "b")]
    graph = helper.make_graph(nodes, "worst_case", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def worst_case_input() -> np.ndarray:
    return np.full((1, CHANNELS, 4, 4), 255, np.uint8)


def codes(outputs: list[np.ndarray]) -> list[int]:
    """The distinct output codes (the model's outputs are constant)."""
    return sorted({int(code) for output in outputs for code in np.unique(output)})


def readings(weight: int) -> dict[str, list[int]]:
    import onnxruntime
    import openvino

    model, array = worst_case_qdq(weight=weight), worst_case_input()
    default = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    read = {"onnxruntime, default session": codes(default.run(None, {"x": array})),
            "onnxruntime, `onnx_session` (`session.x64quantprecision`)": codes(onnx_session(model).run(None,
                                                                                                    {"x": array}))}
    core = openvino.Core()
    for hint in (None, "f32"):
        compiled = core.compile_model(core.read_model(model, b""), "CPU",
                                      {} if hint is None else {"INFERENCE_PRECISION_HINT": hint})
        label = f"OpenVINO {openvino.__version__.split('-')[0]}" + ("" if hint is None else f", precision hint {hint}")
        read[label] = codes(list(compiled(array).values()))
    return read


def render(result: dict[str, Any]) -> str:
    lines = ["# int8 exactness: the worst-case u8 x s8 convolution per runtime", "",
             f"{machine_line(result['machine'])}.", "",
             (f"Exact output code {EXACT_CODE} for weights of 127 (64 where pairs of products saturate in int16, "
              f"CPUs without VNNI), {exact_code(63)} for weights of 63."),
             "", "| weights | runtime | output code | exact |", "|---:|---|---|---|"]
    lines += [f"| {weight} | {runtime} | {', '.join(map(str, read))} | "
              f"{'yes' if read == [exact_code(int(weight))] else 'NO'} |"
              for weight, read_by_runtime in result["readings"].items() for runtime, read in read_by_runtime.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = CommandParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser, "int8_exactness")
    args = parser.parse_args()
    result = {"machine": machine_info(), "settings": run_settings(args), "exact_code": EXACT_CODE,
              "readings": {str(weight): readings(weight) for weight in WEIGHTS}}
    write_results(args.name, result, render(result), args.results_dir)
    print(render(result))


if __name__ == "__main__":
    main()
