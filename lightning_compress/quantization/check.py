"""Check a converted int8 model on a real batch before it replaces the fake-quant model it came from.

A failure names the module at fault and the ``skip`` pattern that keeps it in fp32: the callbacks then
keep the fake-quant (or fp32) network in place and warn, so nothing is lost.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from lightning_compress.core.comparison import parity
from lightning_compress.quantization.deprecations import quiet_torch_ao


class ConversionError(RuntimeError):
    """The converted int8 model cannot run, or computes something else than the fake-quant model."""


def check_conversion(reference: nn.Module, int8: nn.Module, inputs: tuple, prefix: str = "",
                     min_agreement: float = 0.9, tolerance: float = 0.05) -> None:
    """Run the int8 model on one batch and compare it with the fake-quant model it was converted from.

    The int8 model rounds a few values one step differently from the fake-quant model (integer
    averages, requantized products). A well-conditioned network shrugs that off, so its top-1 must agree
    on ``min_agreement`` of the batch. A network that amplifies any perturbation (a few steps of random
    data leave batch-norm running statistics far from the batch's, and eval-mode activations saturate)
    changes its own answers as much when its inputs move by one 8-bit step: then the int8 model passes
    when it agrees with the fake-quant model at least as well as the fake-quant model agrees with itself
    on those nudged inputs.

    Args:
        reference: The fake-quant model
            (:func:`~lightning_compress.quantization.prepare.frozen_copy` of a QAT model,
            :func:`~lightning_compress.quantization.qdq.qdq_network` of a calibrated one).
        int8: The converted model.
        inputs: One batch of positional inputs (CPU), e.g. a calibration batch.
        prefix: How the caller names the network (``"model."``), for the message.
        min_agreement: Near-tie-tolerant top-1 agreement below which the conversion counts as wrong.
        tolerance: Near-tie tolerance (see :func:`lightning_compress.core.comparison.parity`).

    Raises:
        ConversionError: Naming the module that fails to run and the ``skip`` pattern that keeps it in
            fp32, or saying how far the outputs are apart.

    Example:
        >>> from lightning_compress.quantization.convert import convert
        >>> from lightning_compress.quantization.prepare import calibrate, prepare
        >>> from lightning_compress.quantization.qdq import qdq_network
        >>> prepared = prepare(nn.Sequential(nn.Linear(4, 2)), mode="static")
        >>> batch = (torch.randn(8, 4),)
        >>> _ = calibrate(prepared, [batch])
        >>> check_conversion(qdq_network(prepared, saturate_at_trained_range=True), convert(prepared), batch)
    """
    with torch.no_grad(), quiet_torch_ao():
        try:
            logits = _locating(int8)(*inputs)
        except _ModuleFailed as failed:
            name = prefix + failed.module
            raise ConversionError(
                f"the int8 model fails on a calibration batch in module {name!r} ({failed.__cause__}); keep it in "
                f"fp32 with skip=[{name!r}]"
            ) from failed.__cause__
        except Exception as err:  # onnxruntime and the int8 kernels raise their own types
            raise ConversionError(
                f"the int8 model fails on a calibration batch ({type(err).__name__}: {err}); keep the failing "
                f"module in fp32 with skip=['{prefix}<module>']"
            ) from err
        expected = reference.eval()(*inputs)
    if not isinstance(logits, torch.Tensor) or logits.shape != expected.shape:
        return  # not a logits tensor: only "it runs" is checked
    flat = (expected.reshape(len(expected), -1), logits.reshape(len(logits), -1).float())
    result = parity(*flat, tolerance=tolerance) if flat[0].shape[1] > 1 else None
    if result is not None and result.agreement < min_agreement:
        # as unstable as the network itself? compare with the fake-quant model on inputs one 8-bit step off
        with torch.no_grad(), quiet_torch_ao():
            nudged = reference(*(_nudged(x) for x in inputs))
        floor = parity(flat[0], nudged.reshape(len(nudged), -1), tolerance=tolerance).agreement
        if result.agreement >= floor:
            result = None
    if not torch.isfinite(flat[1]).all() or (result is not None and result.agreement < min_agreement):
        raise ConversionError(
            f"the int8 model computes something else than the fake-quant model on a calibration batch "
            f"(agreement {result.agreement if result else float('nan'):.1%}, max logit error "
            f"{result.max_logit_error if result else float('nan'):.3g} of the logit range); keep the layers "
            f"that differ in fp32 with skip=['{prefix}<module>']"
        )


def _nudged(x):
    """``x`` moved by up to one 8-bit step of its range, per element (a seeded draw); non-tensors as they are."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return x + noise.to(x.dtype) * (x.max() - x.min()) / 255


class _ModuleFailed(Exception):
    def __init__(self, module: str) -> None:
        super().__init__(module)
        self.module = module


def _locating(model: nn.Module):
    """``model`` as a callable that names the submodule at fault when an FX graph module raises."""
    if not isinstance(model, fx.GraphModule):
        return model

    class Locating(fx.Interpreter):
        def run_node(self, node: fx.Node):
            try:
                return super().run_node(node)
            except Exception as err:  # whatever the kernel raised
                if node.op != "call_module":
                    raise
                raise _ModuleFailed(str(node.target)) from err

    return lambda *args: Locating(model).run(*args)
