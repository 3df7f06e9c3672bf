"""AOTInductor: a network compiled ahead of time into one ``.pt2`` package of native code and weights.

The network (fp32, or the quantize/dequantize graph of the PT2E engine ``x86_inductor``) is captured by
``torch.export`` with a dynamic batch size and compiled by Inductor with constant folding ("freezing", which
lowers the int8 pattern to oneDNN's int8 convolutions). Building needs a C++ compiler; running needs only torch.
The compilation and the runtime wrapper live in :mod:`lightning_compress.core.aoti`, where quantization also
builds the ``x86_inductor`` engine's package at conversion.

Example:
    >>> # aoti_package(network, images[:2], "model.pt2"); AotiNetwork("model.pt2")(images)
"""

from lightning_compress.core.aoti import COMPILERS, AotiNetwork, aoti_package, has_compiler, require_compiler

__all__ = ["COMPILERS", "AotiNetwork", "aoti_package", "has_compiler", "require_compiler"]
