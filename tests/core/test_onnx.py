"""onnxruntime sessions: exact int8 products on every x86 CPU, and files whose int8 constants the exact mode can
rewrite."""

import sys
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lightning_compress.core.onnx import onnx_session, own_int8_initializers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import int8_exactness  # benchmarks/ is not a package: imported from its folder, as the scripts import each other


@pytest.mark.parametrize("shared_zero_point", [False, True])
def test_int8_convolutions_compute_exact_sums_on_every_x86_cpu(shared_zero_point):
    """On a CPU without VNNI onnxruntime's default u8 x s8 kernel returns code 64 here; our sessions ask for its
    exact mode (code 127), which also loads a file whose weights share an int8 zero-point."""
    model = int8_exactness.worst_case_qdq(shared_zero_point)
    outputs = onnx_session(model).run(None, {"x": int8_exactness.worst_case_input()})
    exact = int8_exactness.EXACT_CODE
    assert [(int(y.min()), int(y.max())) for y in outputs] == [(exact, exact)] * 2


def test_each_node_gets_its_own_copy_of_a_shared_int8_initializer():
    model = onnx.load_from_string(int8_exactness.worst_case_qdq(shared_zero_point=True))
    assert own_int8_initializers(model)
    zero_points = [node.input[2] for node in model.graph.node if node.input[0].startswith("w_")]
    assert zero_points == ["w_zero", "w_zero.1"]
    assert not own_int8_initializers(model)  # nothing left to copy
