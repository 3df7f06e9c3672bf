"""ExecuTorch: a network lowered to XNNPACK's kernels in one ``.pte`` program, for phones and small CPUs.

The network (fp32, or the quantize/dequantize graph of the PT2E engine ``xnnpack``) is captured by
``torch.export`` with a dynamic batch size, its supported operators delegated to XNNPACK
(``XnnpackPartitioner``) and serialized; ExecuTorch's runtime runs the file with no Python model code.
The lowering and the runtime wrapper live in :mod:`lightning_compress.core.executorch`, where quantization
also builds the ``xnnpack`` engine's program at conversion. ExecuTorch is the optional ``[executorch]`` extra.

Example:
    >>> # blob = pte_bytes(network, images[:2]); ExecuTorchNetwork(blob)(images)
"""

from lightning_compress.core.executorch import (
    EXPORT_BATCH,
    MAX_BATCH,
    ExecuTorchNetwork,
    pte_bytes,
    require_executorch,
    use_threads,
)

__all__ = ["EXPORT_BATCH", "MAX_BATCH", "ExecuTorchNetwork", "pte_bytes", "require_executorch", "use_threads"]
