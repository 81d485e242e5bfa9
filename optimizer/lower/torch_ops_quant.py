"""Quantization operators and the integer / fp8 matmul kernels of the torch lowering.

ONNX operators (default domain), exact to their definitions:
- ``DequantizeLinear``: per tensor (scalar scale), per axis (1-D scale along ``axis``) and
  blocked (``block_size``: each scale covers that many consecutive elements along ``axis``);
  int8/uint8/int16/int32, int4/uint4 (held one value per byte) and float8 inputs;
- ``QuantizeLinear``: the same three granularities, round half to even, saturating to the
  output type (the zero point's type, else ``output_dtype``, else uint8; float8 included);
- ``DynamicQuantizeLinear``: uint8 with the scale and zero point ONNX defines.

Kernels the lowering substitutes for a quantize-pass decision (``optimizer.lower.torch_quant``):
- ``int8_linear``: ``x_int8 @ W_int8`` with ``torch._int_mm`` (int32 accumulation), scaled by
  ``x_scale * w_scale`` -- the static ``w8a8`` decision computed in integers;
- ``dynamic_int8_linear``: quantize each row of ``x`` at run time (symmetric int8, its own
  scale), then ``int8_linear`` -- the ``dynamic`` decision;
- ``fp8_linear``: ``torch._scaled_mm`` over float8_e4m3fn with per-row / per-column scales,
  for GPUs with fp8 tensor cores.
``torch._int_mm`` needs more than 16 rows and K, N multiples of 8 on CUDA; rows are padded
to 32 for decode-sized inputs, and other shapes fall back to dequantized float matmuls.
"""

from __future__ import annotations

import torch

from optimizer.lower.torch_ops import align

_RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767),
           torch.int32: (-(2 ** 31), 2 ** 31 - 1)}
_INT4 = {21: (0, 15), 22: (-8, 7)}  # ONNX UINT4, INT4 codes -> ranges (held in uint8 / int8)


def _broadcast_scale(scale, x, axis, block_size):
    """``scale`` (and zero point) shaped to broadcast against ``x``."""
    if scale.dim() == 0 or scale.numel() == 1 and not block_size:
        return scale.reshape(())
    axis %= x.dim()
    if block_size:
        return scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def dequantize_linear(x, scale, zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    x, scale = align(x, scale)
    s = _broadcast_scale(scale, x, axis, block_size)
    if x.dtype.is_floating_point:  # float8: no zero point to subtract
        return (x.to(torch.float32) * s.to(torch.float32)).to(scale.dtype)
    values = x.to(torch.int32)
    if zero_point is not None:
        values = values - _broadcast_scale(zero_point.to(x.device), x, axis, block_size).to(torch.int32)
    return values.to(scale.dtype) * s


def quantize_linear(x, scale, zero_point=None, *, axis=1, block_size=0, saturate=1, output_dtype=0, precision=0):
    from optimizer.lower.torch_dtypes import TORCH_DTYPES

    x, scale = align(x, scale)
    target = zero_point.dtype if zero_point is not None else TORCH_DTYPES.get(output_dtype, torch.uint8)
    scaled = x / _broadcast_scale(scale, x, axis, block_size)
    if target.is_floating_point:
        limit = torch.finfo(target).max
        return (scaled.clamp(-limit, limit) if saturate else scaled).to(target)
    low, high = _INT4.get(output_dtype, _RANGES[target])
    values = torch.round(scaled)
    if zero_point is not None:
        values = values + _broadcast_scale(zero_point.to(x.device), x, axis, block_size).to(values.dtype)
    return values.clamp(low, high).to(target)


def dynamic_quantize_linear(x):
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-low / scale).clamp(0, 255)
    y = (torch.round(x / scale) + zero).clamp(0, 255).to(torch.uint8)
    return y, scale.to(x.dtype), zero.to(torch.uint8)


def _int_mm_fits(m: int, k: int, n: int, device: torch.device) -> bool:
    return device.type != "cuda" or (k % 8 == 0 and n % 8 == 0)


def _int_mm(a, b):
    """``torch._int_mm`` with rows padded to 32 where CUDA needs more than 16."""
    m = a.shape[0]
    if a.device.type == "cuda" and m <= 16:
        a = torch.nn.functional.pad(a, (0, 0, 0, 32 - m))
        return torch._int_mm(a, b)[:m]
    return torch._int_mm(a, b)


def int8_linear(x_q, x_scale, w_q, w_scale):
    """(x_q * x_scale) @ (w_q * w_scale) in integers: x_q int8 [..., K], w_q int8 [K, N]."""
    k, n = w_q.shape
    rows = x_q.reshape(-1, k)
    scale = (x_scale.reshape(-1, 1) if x_scale.dim() else x_scale) * w_scale.reshape(1, -1)
    if not _int_mm_fits(rows.shape[0], k, n, rows.device):
        out = (rows.to(torch.float32) @ w_q.to(torch.float32)) * scale
    else:
        out = _int_mm(rows.contiguous(), w_q).to(torch.float32) * scale
    return out.reshape(*x_q.shape[:-1], n).to(w_scale.dtype)


def dynamic_int8_linear(x, w_q, w_scale):
    """Quantize each row of ``x`` symmetrically to int8 at run time, then ``int8_linear``."""
    rows = x.reshape(-1, x.shape[-1])
    row_scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    x_q = torch.round(rows / row_scale[:, None]).clamp(-127, 127).to(torch.int8)
    return int8_linear(x_q, row_scale, w_q, w_scale).reshape(*x.shape[:-1], w_q.shape[1])


def fp8_linear(x, w_fp8_t, w_scale):
    """``x @ W`` with ``torch._scaled_mm``: x quantized per row to float8_e4m3fn at run time,
    ``w_fp8_t`` the weight [N, K] in float8 with one scale per output column."""
    rows = x.reshape(-1, x.shape[-1])
    limit = torch.finfo(torch.float8_e4m3fn).max
    row_scale = (rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / limit).to(torch.float32)
    x8 = (rows / row_scale).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x8, w_fp8_t.t(), scale_a=row_scale, scale_b=w_scale.reshape(1, -1).to(torch.float32),
                           out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16)
    return out.to(x.dtype).reshape(*x.shape[:-1], w_fp8_t.shape[0])


OPS = {"DequantizeLinear": dequantize_linear, "QuantizeLinear": quantize_linear,
       "DynamicQuantizeLinear": dynamic_quantize_linear}
MULTI_OUTPUT = {"DynamicQuantizeLinear"}
