"""Weight-only modes of the quantize pass (``w8``, ``w4``): the format, the opset, the search.

- ``weight_format(opts)``: ``Format(bits, block, sym)`` for ``w8``/``w4``, None for the modes
  that also quantize activations (``dynamic``, ``w8a8``: int8 per channel, as before);
- ``check_sym(opts)``: ``sym=false`` (asymmetric, ``passes.quantize_asym``) is for ``w4`` only:
  int8 steps are fine enough without an offset and ORT's MatMulNBits takes float zero points
  only for 4 bits; GPTQ fixes symmetric steps as it goes and is refused with it;
- ``ensure_opset(model, fmt)``: INT4 weights and ``DequantizeLinear`` with ``block_size``
  exist from ONNX opset 21. A model at opset 21 or newer is left alone. A model at opset 20 is
  lifted to 21 by changing its import: the operators opset 21 revised only gained types (int4,
  uint4, float8) or, for Q/DQ, the optional ``block_size``, except ``GroupNormalization``, whose
  scale and bias changed meaning, so a model using it is refused. Older opsets are refused
  with the remedy (export at opset 20 or newer, or ``w8`` per channel, which needs only 13);
- ``importance(stats)``: the calibrated mean x^2 of each input channel, which weights the
  clipping search (None without calibration);
- ``search(stats, joint, fmt, min_gain, smooth)``: the AWQ-style alpha for one group of sites
  reading the same activation (``passes.quantize_block.awq_alpha``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.quantize_block import Format, awq_alpha
from runtime.errors import PassError

BITS = {"w8": 8, "w4": 4}
OPSET_BLOCKED = 21


def weight_format(opts) -> Format | None:
    if opts.mode not in BITS:
        return None
    return Format(BITS[opts.mode], opts.block, sym=opts.mode != "w4" or opts.sym)


def check_sym(opts) -> None:
    if opts.sym:
        return
    if opts.mode != "w4":
        raise PassError(f"sym=false (asymmetric int4 with a float offset per block) applies to mode w4; mode "
                        f"{opts.mode} is symmetric, so drop sym=false.")
    if opts.gptq:
        raise PassError("gptq=true keeps symmetric int4 steps; drop gptq or sym=false.")


def needs_opset_21(fmt: Format | None) -> bool:
    return fmt is not None and (fmt.bits == 4 or fmt.block > 0)


def ensure_opset(model: ir.Model, fmt: Format) -> str | None:
    """Lift an opset-20 model to 21 where that is exact (module docstring); a note, or None."""
    opset = model.opset_imports.get("", 0)
    if not needs_opset_21(fmt) or opset >= OPSET_BLOCKED:
        return None
    what = fmt.describe()
    if opset < 20:
        raise PassError(f"{what} weights need ONNX opset 21 (INT4 / block-wise DequantizeLinear) but the model has "
                        f"opset {opset}; export it at opset 20 or newer, or use mode=w8 with block=0.")
    nodes = ir.traversal.RecursiveGraphIterator(model.graph)
    if any(n.op_type == "GroupNormalization" and n.domain in ("", "ai.onnx") for n in nodes):
        raise PassError(f"{what} weights need ONNX opset 21 and this opset-20 model uses GroupNormalization, whose "
                        "meaning changed in 21; export it at opset 21, or use mode=w8 with block=0.")
    model.opset_imports[""] = OPSET_BLOCKED
    for function in model.functions.values():
        if function.opset_imports.get("", 0) == 20:
            function.opset_imports[""] = OPSET_BLOCKED
    return f"opset lifted from {opset} to {OPSET_BLOCKED} for {what} weights (only type additions between them)"


def importance(stats) -> np.ndarray | None:
    if stats is None:
        return None
    if stats.sample is not None and len(stats.sample):
        return (np.asarray(stats.sample, np.float64) ** 2).mean(axis=0).astype(np.float32)
    return (stats.channel_mean_abs ** 2).astype(np.float32)


def search(stats, joint: np.ndarray, fmt: Format, min_gain: float) -> tuple[float, float, float]:
    """(alpha, error, error unscaled) of the AWQ-style search; alpha 0 without calibration rows."""
    if stats is None or stats.sample is None:
        return 0.0, float("nan"), float("nan")
    return awq_alpha(stats.sample, stats.channel_mean_abs, joint, fmt, min_gain)
