"""Which kernel each quantize-pass decision gets in the torch lowering.

The quantize pass leaves ``MatMul(x, DequantizeLinear(W_int8, scale))`` with a ``carve.quantize``
record (``passes.quantize_rewrite``); ``w8a8`` sites also read ``x`` through a static
``QuantizeLinear``/``DequantizeLinear`` pair. Run as written (``matmul="dequantize"``), the
module computes exactly what ONNX Runtime computes on that graph. The other choices:

- ``int8``: ``w8a8`` sites run ``int8_linear`` on the int8 activation the QuantizeLinear made
  (the same numbers, accumulated in int32); ``dynamic`` sites run ``dynamic_int8_linear``
  (activations quantized per row at run time: lossy, as ORT's DynamicQuantizeMatMul is);
  ``w8`` sites keep the dequantized float matmul (weight-only int8 has no integer kernel).
- ``fp8``: every decided site runs ``fp8_linear``: the dequantized weight re-quantized to
  float8_e4m3fn per output column when the module is built, activations per row at run time.
- ``auto``: ``int8`` on CUDA, ``dequantize`` elsewhere (on CPU torch's int8 matmul is no
  faster than its float one, and the float path equals the graph).

``plan(model, matmul)`` returns ``{id(MatMul node): Substitute}``; the builder emits the
substitute's kernel instead of the node (the now unread DequantizeLinear is dropped as dead code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx_ir as ir

from optimizer.lower import torch_ops_quant as q
from passes.quantize_rewrite import decision
from runtime.errors import PassError

MATMUL_CHOICES = ("auto", "dequantize", "int8", "fp8")


@dataclass
class Substitute:
    """A kernel call replacing one MatMul: graph values and precomputed torch tensors as arguments."""

    kernel: Callable
    inputs: list[Any]  # ir.Value, or a torch.Tensor made at build time (kept in its layout)
    mode: str
    extra: dict = field(default_factory=dict)


def resolve_choice(matmul: str, device_type: str) -> str:
    if matmul not in MATMUL_CHOICES:
        raise PassError(f"unknown matmul kernel choice {matmul!r}; choose one of: {', '.join(MATMUL_CHOICES)}.")
    if matmul == "auto":
        return "int8" if device_type == "cuda" else "dequantize"
    return matmul


def plan(model: ir.Model, choice: str) -> dict[int, Substitute]:
    if choice == "dequantize":
        return {}
    out = {}
    for node in model.graph:
        info = decision(node) if node.op_type == "MatMul" else None
        weight = _weight(node) if info else None
        if weight is None:
            continue
        substitute = _fp8(node, weight) if choice == "fp8" else _int8(node, weight, info.get("mode"))
        if substitute is not None:
            out[id(node)] = substitute
    return out


def _weight(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(W_int8, per-column or scalar scale) when input 1 is a constant int8 DequantizeLinear."""
    dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 2:
        return None
    wq, scale = dq.inputs[0], dq.inputs[1]
    if wq.const_value is None or scale.const_value is None or wq.const_value.dtype != ir.DataType.INT8:
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None and ir.convenience.get_const_tensor(dq.inputs[2]).numpy().any():
        return None  # the pass writes zero points of 0; anything else keeps the exact float path
    if dq.attributes.get("block_size") is not None and dq.attributes["block_size"].value:
        return None
    return wq, scale


def _int8(node: ir.Node, weight, mode: str | None) -> Substitute | None:
    from optimizer.lower.torch_dtypes import to_torch

    # [K, N] stored column-major (a transposed [N, K] tensor): the layout cuBLASLt's int8 GEMM
    # behind torch._int_mm is known to take as its second operand.
    wq, scale = to_torch(weight[0].const_value).t().contiguous().t(), weight[1]
    if mode == "dynamic":
        return Substitute(q.dynamic_int8_linear, [node.inputs[0], wq, scale], mode)
    if mode == "w8a8":
        act = _static_activation(node.inputs[0])
        if act is not None:
            return Substitute(q.int8_linear, [act[0], act[1], wq, scale], mode)
    return None


def _static_activation(x: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(int8 activation, its scale) when ``x`` is DequantizeLinear(QuantizeLinear(...)) with zero point 0."""
    dq = x.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    quant = dq.inputs[0].producer()
    if quant is None or quant.op_type != "QuantizeLinear" or dq.inputs[0].dtype != ir.DataType.INT8:
        return None
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    zero_tensor = ir.convenience.get_const_tensor(zero) if zero is not None else None
    scale = ir.convenience.get_const_tensor(dq.inputs[1])
    if zero is not None and (zero_tensor is None or zero_tensor.numpy().any()) or scale is None or scale.size != 1:
        return None
    return dq.inputs[0], dq.inputs[1]


def _fp8(node: ir.Node, weight) -> Substitute:
    import torch

    from optimizer.lower.torch_dtypes import to_torch

    wq, scale = (to_torch(v.const_value) for v in weight)
    w = wq.to(torch.float32) * (scale.reshape(1, -1) if scale.dim() else scale)  # [K, N]
    limit = torch.finfo(torch.float8_e4m3fn).max
    column_scale = w.abs().amax(dim=0).clamp(min=1e-12) / limit
    w8_t = (w / column_scale).t().contiguous().to(torch.float8_e4m3fn)  # [N, K]: _scaled_mm's column-major operand
    return Substitute(q.fp8_linear, [node.inputs[0], w8_t, column_scale], "fp8")
