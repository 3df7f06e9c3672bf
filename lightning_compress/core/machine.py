"""The machine a measurement ran on: CPU model and the ISA extensions that decide its speed.

Benchmarks record it in every result and an export's manifest names it beside its latencies: figures from
different machines are not comparable.

Example:
    >>> sorted(cpu_description())
    ['bf16', 'flags', 'model']
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
"""ISA extensions that decide CPU training and inference speed: bf16 autocast needs avx512_bf16 or AMX,
fast int8 needs VNNI (avx512_vnni) or AMX."""


def cpu_description(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU model and which of :data:`CPU_FLAGS` it has, read from ``/proc/cpuinfo``.

    Args:
        cpuinfo: The file to read (Linux); elsewhere the model comes from :mod:`platform` and the flags
            are unknown (empty).

    Returns:
        ``{"model": str, "flags": [flags present, in CPU_FLAGS order], "bf16": bool}``; ``bf16`` says
        whether bf16 autocast has native instructions (avx512_bf16 or amx_bf16).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix="cpuinfo", delete=False) as f:
        ...     _ = f.write("model name\\t: AMD EPYC\\nflags\\t\\t: fpu avx2 avx512f avx512_bf16\\n")
        >>> cpu_description(f.name)
        {'model': 'AMD EPYC', 'flags': ['avx2', 'avx512f', 'avx512_bf16'], 'bf16': True}
    """
    model, present = platform.processor() or platform.machine(), set()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            present = set(value.split())
            break
    flags = [flag for flag in CPU_FLAGS if flag in present]
    return {"model": model, "flags": flags, "bf16": "avx512_bf16" in present or "amx_bf16" in present}
