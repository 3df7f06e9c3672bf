"""onnxruntime sessions: exact int8 products on every x86 CPU, and files whose int8 constants the exact mode can
rewrite."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from lightning_compress.core.onnx import onnx_session, own_int8_initializers

CHANNELS, OUTPUT_SCALE = 16, 4096.0


def worst_case_qdq(shared_zero_point: bool = False) -> bytes:
    """uint8 codes of 255 into a 1x1 convolution of int8 weights of 127 over 16 channels (two of them, when
    ``shared_zero_point``: their weights' zero-points one initializer, as the exporter stores equal constants),
    quantized again with a scale that keeps the exact sum (518,160 -> code 126) apart from the one a CPU without
    VNNI gets when it sums pairs of products in saturating int16 (8 x 32,767 -> code 64)."""
    initializers = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                    numpy_helper.from_array(np.array(0, np.uint8), "zero_u8"),
                    numpy_helper.from_array(np.array(OUTPUT_SCALE, np.float32), "out_scale"),
                    numpy_helper.from_array(np.ones(1, np.float32), "w_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "one", "zero_u8"], ["x_float"])]
    for layer in ("a", "b"):
        zero = "w_zero" if shared_zero_point else f"w_zero_{layer}"
        if not any(t.name == zero for t in initializers):
            initializers.append(numpy_helper.from_array(np.zeros(1, np.int8), zero))
        initializers.append(numpy_helper.from_array(np.full((1, CHANNELS, 1, 1), 127, np.int8), f"w_{layer}"))
        nodes += [helper.make_node("DequantizeLinear", [f"w_{layer}", "w_scale", zero], [f"wf_{layer}"], axis=0),
                  helper.make_node("Conv", ["x_float", f"wf_{layer}"], [f"y_float_{layer}"]),
                  helper.make_node("QuantizeLinear", [f"y_float_{layer}", "out_scale", "zero_u8"], [f"y_{layer}"])]
    graph = helper.make_graph(nodes, "worst_case", [helper.make_tensor_value_info("x", TensorProto.UINT8,
                                                                                  [1, CHANNELS, 4, 4])],
                              [helper.make_tensor_value_info(f"y_{layer}", TensorProto.UINT8, [1, 1, 4, 4])
                               for layer in ("a", "b")], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


@pytest.mark.parametrize("shared_zero_point", [False, True])
def test_int8_convolutions_compute_exact_sums_on_every_x86_cpu(shared_zero_point):
    """On a CPU without VNNI onnxruntime's default u8 x s8 kernel returns code 64 here; our sessions ask for its
    exact mode (code 126), which also loads a file whose weights share an int8 zero-point."""
    session = onnx_session(worst_case_qdq(shared_zero_point))
    outputs = session.run(None, {"x": np.full((1, CHANNELS, 4, 4), 255, np.uint8)})
    exact = round(255 * 127 * CHANNELS / OUTPUT_SCALE)
    assert [int(y.min()) for y in outputs] == [exact, exact] and [int(y.max()) for y in outputs] == [exact, exact]


def test_each_node_gets_its_own_copy_of_a_shared_int8_initializer():
    model = onnx.load_from_string(worst_case_qdq(shared_zero_point=True))
    assert own_int8_initializers(model)
    zero_points = [node.input[2] for node in model.graph.node if node.input[0].startswith("w_")]
    assert zero_points == ["w_zero", "w_zero.1"]
    assert not own_int8_initializers(model)  # nothing left to copy
