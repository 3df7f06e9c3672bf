"""What the suite measures on a trained network: size, non-zeros, MACs, artifacts and CPU latency.

Every measure goes through the package's own accounting (``core/accounting.py``) and export code
(``export.py``), so the suite reports what a user of the package would get. Deployment formats the
code version at hand cannot produce are not faked: the row records what was measured instead and why
(``int8_runtime`` / ``notes``).
"""

from __future__ import annotations

import copy
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.accounting import count_macs, count_nonzero, count_parameters
from lightning_compress.core.timing_lock import exclusive_timing

EXAMPLE = (1, 3, 32, 32)


def _median_ms(run, repeats: int, warmup: int) -> float:
    times = []
    with exclusive_timing():  # the other row's training pauses (its steps hold the lock shared: suite.py)
        for _ in range(warmup):
            run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 4)


def onnx_latency_ms(blob: bytes, repeats: int, warmup: int = 10, threads: int = 1) -> float:
    """Median onnxruntime CPU latency (ms) of an ONNX model at batch 1, ``threads`` intra-op threads."""
    from lightning_compress.core.onnx import onnx_session

    session = onnx_session(blob, threads)
    feed = {session.get_inputs()[0].name: torch.randn(*EXAMPLE).numpy()}
    return _median_ms(lambda: session.run(None, feed), repeats, warmup)


def torch_latency_ms(module: nn.Module, repeats: int, warmup: int = 10) -> float:
    """Median torch CPU latency (ms) at batch 1 in inference mode, on the current thread count."""
    x = torch.randn(*EXAMPLE)
    with torch.inference_mode():
        return _median_ms(lambda: module(x), repeats, warmup)


EXPORT_MODULES = ("lightning_compress.export", "lightning_compress.export.packed", "lightning_compress.export.onnx",
                  "lightning_compress.export.artifacts")
"""Where the export functions are looked up, in order (the deploy work is moving them into a package)."""


def export_function(name: str) -> Any:
    """The package's export function ``name`` wherever this code version has it.

    Raises:
        ImportError: If no module of :data:`EXPORT_MODULES` has it.
    """
    import importlib

    for module in EXPORT_MODULES:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise ImportError(f"{name} is in none of {EXPORT_MODULES}")


def _onnx(network: nn.Module) -> bytes:
    return export_function("onnx_bytes")(network, torch.randn(*EXAMPLE), {})


def _qdq_onnx(prepared: nn.Module) -> bytes:
    """The QDQ ONNX int8 artifact built from a QAT-prepared network (the deploy issue's format)."""
    from lightning_compress.quantization.qdq import qdq_network

    qdq = qdq_network(copy.deepcopy(prepared).cpu().eval())
    return export_function("qdq_onnx_bytes")(qdq, torch.randn(*EXAMPLE))


def onnx_top1(blob: bytes, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
              threads: int | None = None) -> float:
    """Top-1 (%) of an ONNX model run by onnxruntime on normalized ``images``: the accuracy of the file shipped.

    ``threads``: onnxruntime's intra-op threads (None: its default, every core).
    """
    from lightning_compress.core.onnx import onnx_session

    session = onnx_session(blob, threads or 0)  # 0: onnxruntime's default
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = session.run(None, {name: images[start:start + batch_size].contiguous().numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == labels[start:start + batch_size]).sum())
    return round(100 * correct / len(labels), 2)


def _packed_bytes(network: nn.Module) -> int:
    """Bytes of the packed artifact (bitmask of non-zeros + int8 values, lzma): sparsity made visible."""
    write_packed = export_function("write_packed")
    with tempfile.TemporaryDirectory() as workdir:
        return write_packed(Path(workdir) / "weights.lcpk", network.state_dict(), {}, values="int8")


def _torchscript_int8_bytes(int8: nn.Module, engine: str) -> tuple[int, nn.Module]:
    from lightning_compress.quantization import load_quantized, save_quantized

    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "model_int8.pt"
        save_quantized(int8, path, (torch.randn(*EXAMPLE),), engine)
        return path.stat().st_size, load_quantized(path)


def measure_network(network: nn.Module, int8: nn.Module | None = None, engine: str = "x86",
                    repeats: int = 100, test: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Size, non-zeros, MACs, artifact bytes and CPU latency (batch 1, one thread) of a trained network.

    Args:
        network: The trained float network on any device (fp32, possibly sparse, slimmed or
            QAT-prepared); it is copied to the CPU, the original is left alone.
        int8: Its converted int8 network, for rows that quantize.
        engine: The int8 engine ``int8`` was converted for.
        repeats: Timed runs per latency.
        test: Normalized test images and labels: with them, the deployed ONNX file's own top-1 is measured
            (``top1_deployed``, on as many threads as torch has), the accuracy of the file a deployment runs.

    Returns:
        ``params``, ``nonzero``, ``macs``, ``packed_bytes``, ``artifact`` (kind and bytes of the deployed
        file), ``latency_ms`` by runtime (``ort_fp32``, ``ort_int8`` or ``torchscript_int8``),
        ``top1_deployed`` (given ``test``, for an ONNX artifact) and ``notes`` naming anything that could
        not be measured and why.
    """
    net = copy.deepcopy(network).float().cpu().eval()
    net = net.to(memory_format=torch.contiguous_format)
    example = torch.randn(*EXAMPLE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    notes: list[str] = []
    try:
        result: dict[str, Any] = {
            "params": count_parameters(net),
            "nonzero": count_nonzero(net).total.nonzero,
            "macs": count_macs(net, example),
            "packed_bytes": _packed_bytes(net),
            "latency_ms": {},
        }
        if int8 is None:
            blob = _onnx(net)
            result["artifact"] = {"kind": "onnx fp32", "bytes": len(blob)}
            result["latency_ms"]["ort_fp32"] = onnx_latency_ms(blob, repeats)
            if test is not None:
                result["top1_deployed"] = onnx_top1(blob, *test, threads=threads)
        else:  # the int8 artifact: QDQ ONNX where this code version has it, else what exists, labelled
            for kind, build in (("onnx int8 (QDQ)", lambda: _qdq_onnx(network)), ("onnx int8", lambda: _onnx(int8))):
                try:
                    blob = build()
                except Exception as err:  # the int8 ONNX path belongs to the deploy issue; report what exists
                    notes.append(f"{kind}: not available in this code version ({type(err).__name__}: "
                                 f"{(str(err).splitlines() or [''])[0][:160]})")
                    continue
                result["artifact"] = {"kind": kind, "bytes": len(blob)}
                result["latency_ms"]["ort_int8"] = onnx_latency_ms(blob, repeats)
                if test is not None:
                    result["top1_deployed"] = onnx_top1(blob, *test, threads=threads)
                break
            else:
                notes.append("int8 measured as the TorchScript artifact (save_quantized)")
                size, scripted = _torchscript_int8_bytes(int8, engine)
                result["artifact"] = {"kind": "torchscript int8", "bytes": size}
                result["latency_ms"]["torchscript_int8"] = torch_latency_ms(scripted, repeats)
    finally:
        torch.set_num_threads(threads)
    result["notes"] = notes
    return result


def state_dict_bytes(network: nn.Module) -> int:
    """Bytes of ``torch.save(network.state_dict())`` (the dense fp32 reference size)."""
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    return buffer.getbuffer().nbytes
