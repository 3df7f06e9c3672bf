"""torch.ao.quantization's deprecation warnings, silenced only around this package's own calls.

``torch.ao.quantization`` is deprecated (its warning says "removed in 2.10", yet 2.14 still ships it). Its
warnings are filtered inside :func:`quiet_torch_ao` only, never process-wide; the tests pin the whole flow,
so an upgrade that breaks or removes it fails the test suite, not a user's run.

Example:
    >>> with quiet_torch_ao():
    ...     import torch.ao.quantization
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

_TORCH_AO_WARNINGS = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation",
    r"`torch\.jit\.\w+` is deprecated",
    r"Default qconfig of oneDNN backend with reduce_range of false",  # ours reduces it (engines.Engine)
)


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """Silence torch.ao's own deprecation chatter for the duration of one call into it.

    Yields:
        Nothing; the filters are restored on exit.
    """
    with warnings.catch_warnings():
        for message in _TORCH_AO_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield
