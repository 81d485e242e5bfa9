"""The quantize pass's decisions in the Q/DQ form TensorRT fuses.

The pass (``passes.quantize_rewrite``) leaves ``MatMul(x, DequantizeLinear(W_q, scale))`` with
``carve.quantize`` metadata: symmetric weights, zero point 0, one scale per output channel
(axis 1 of the [K, N] weight) or per tensor; ``w8a8`` adds one static per-tensor int8
``QuantizeLinear``/``DequantizeLinear`` pair on the activation. That is already TensorRT's
explicit-quantization form (inputs of weighted ops quantized, outputs not, per-channel scales
only on weights, no int32 bias DequantizeLinear: the bias stays a float Add), so per mode:

- ``w8``: kept; TensorRT runs weight-only int8 (dequantize into the GEMM);
- ``w8a8``: kept; TensorRT fuses Q/DQ into an int8 GEMM (and the convolution sites,
  ``passes.quantize_conv``, into int8 convolutions: weights per output channel on axis 0 for
  Conv, 1 for ConvTranspose);
- ``dynamic``: TensorRT has no run-time int8 activation quantization (``DynamicQuantizeLinear``
  is not in its ONNX parser) and static scales need calibration the decision did not make, so
  it is lowered as weight-only int8: the same int8 weights, activations in float. This is
  recorded in the lowering's details; use ``quantize:mode=w8a8`` for int8 activations;
- ``w4`` (and any int4 weights): ``DequantizeLinear`` with ``block_size`` over K (axis 0),
  scale [K / block, N], opset 21; per-channel int4 becomes one block spanning K (the same
  values: TensorRT reads int4 only block-wise); uint4 weights with a constant zero point are
  made symmetric int4 when the zero point is 8 (the same grid), anything else is refused;
- asymmetric int4 (``quantize:mode=w4,sym=false``: a float offset per block added after the
  ``DequantizeLinear``) is refused: TensorRT's int4 GEMM takes zero point 0 only, and lowering
  the offsets to float weights would give up the int4 storage the mode exists for;
- quantized tables (a constant DequantizeLinear read by Gather, or by a Transpose for a tied
  head) are stored dequantized: weight DequantizeLinear is fused only into the MatMul reading it;
- ``fp8=True`` turns every ``w8a8`` site into FP8 E4M3: the activation pair keeps its clipping
  range (scale x 127 / 448) with a float8 zero point, the weights are re-quantized per output
  channel to E4M3 (scale = max|W_col| / 448). Opset >= 19. A site whose activation is the
  model's input (a vision model's patch embedding reads the image) stays int8: E4M3's 3
  mantissa bits on the raw image cost tiny-vit's output cosine 0.9949 against 0.995 and more.

Graphs below the opset a form needs are converted with onnxscript's version converter.
"""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx_ir as ir

from passes.quantize_rewrite import constant, decision, drop_if_unused
from runtime.errors import PassError

FP8_MAX = 448.0  # largest finite float8 e4m3fn
INT8_MAX = 127.0
INT4 = (ir.DataType.INT4, ir.DataType.UINT4)
# Decided ops: MatMul (weight [K, N]) and the w8a8 convolutions (passes.quantize_conv).
_SITE_OPS = ("MatMul", "Conv", "ConvTranspose")


def lower_qdq(model: ir.Model, fp8: bool = False) -> dict:
    """Make the decided sites TensorRT-legal in place; returns counts by mode and the opset used."""
    _refuse_asymmetric(model)
    sites = [n for n in model.graph if n.op_type in _SITE_OPS and decision(n) and _weight_dq(n) is not None]
    if fp8 and not any(decision(n)["mode"] == "w8a8" for n in sites):
        raise PassError("fp8 for TensorRT converts w8a8 decisions but the graph has none; "
                        "run the quantize pass with mode=w8a8 first.")
    modes: Counter[str] = Counter()
    notes: list[str] = []
    activations: dict[int, ir.Node] = {}
    for node in sites:
        mode = decision(node)["mode"]
        dq = _weight_dq(node)
        if dq.inputs[0].dtype in INT4:
            _symmetric_int4(model.graph, dq)
            mode = "w4"
        elif mode == "w8a8" and fp8 and not _reads_model_input(node):
            _weight_to_fp8(model.graph, dq, 0 if node.op_type == "Conv" else 1)
            act = node.inputs[0].producer()
            if act is not None and act.op_type == "DequantizeLinear":
                activations[id(act)] = act
            mode = "fp8"
        modes["w8 (from dynamic)" if mode == "dynamic" else mode] += 1
    for act in activations.values():
        _activation_to_fp8(model.graph, act)
    tables = _float_tables(model.graph)
    if tables:
        notes.append(f"{tables} quantized table(s) read by Gather or Transpose stored dequantized: carve fuses "
                     "weight DequantizeLinear for TensorRT only into the GEMM that reads it")
    if fp8 and modes["w8a8"]:
        notes.append(f"{modes['w8a8']} site(s) reading the model's input kept int8: float8 e4m3 would round "
                     "the raw input (an image) to 3 mantissa bits")
    if modes["w8 (from dynamic)"]:
        notes.append("mode dynamic lowered as weight-only int8: TensorRT has no run-time int8 activation "
                     "quantization and static scales need calibration (use quantize:mode=w8a8)")
    needed = 21 if modes["w4"] else 19 if modes["fp8"] else 13
    opset = ensure_opset(model, needed) if sites else model.opset_imports.get("", 0)
    return {"sites": dict(modes), "dequantized_tables": tables, "opset": opset, "notes": notes}


def _refuse_asymmetric(model: ir.Model) -> None:
    names = [n.name for n in model.graph if (decision(n) or {}).get("sym") is False]
    if names:
        raise PassError(f"{len(names)} weight(s) are asymmetric int4 (quantize sym=false, e.g. {names[0]!r}), which "
                        "TensorRT cannot run (its int4 needs zero point 0); quantize with sym=true for the tensorrt target.")


def ensure_opset(model: ir.Model, minimum: int) -> int:
    """Raise the default-domain opset to ``minimum`` when below it; returns the opset."""
    current = model.opset_imports.get("", 0)
    if current >= minimum:
        return current
    from onnxscript import version_converter

    try:
        version_converter.convert_version(model, minimum, fallback=True)
    except Exception as exc:  # the converter raises its own types
        raise PassError(f"cannot convert the graph from opset {current} to {minimum} for TensorRT ({exc}); "
                        f"export the model at opset {minimum} or newer.") from exc
    return model.opset_imports.get("", 0)


def _reads_model_input(node: ir.Node) -> bool:
    """Whether the site's activation Q/DQ quantizes a graph input (through Casts)."""
    dq = node.inputs[0].producer()
    quant = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
    x = quant.inputs[0] if quant is not None and quant.op_type == "QuantizeLinear" else None
    while x is not None and x.producer() is not None and x.producer().op_type == "Cast":
        x = x.producer().inputs[0]
    return x is not None and x.is_graph_input()


def _weight_dq(node: ir.Node) -> ir.Node | None:
    value = node.inputs[1] if len(node.inputs) > 1 else None
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return dq if all(ir.convenience.get_const_tensor(v) is not None for v in dq.inputs[:2]) else None


def _const(value: ir.Value) -> np.ndarray:
    return ir.convenience.get_const_tensor(value).numpy()


def _dequantized(dq: ir.Node, axis: int = 1) -> np.ndarray:
    """The float weight a per-tensor or per-``axis`` int8 DequantizeLinear computes."""
    q, scale = _const(dq.inputs[0]).astype(np.float32), _const(dq.inputs[1]).astype(np.float32)
    zero = _const(dq.inputs[2]).astype(np.float32) if len(dq.inputs) > 2 and dq.inputs[2] is not None else 0.0
    return (q - _along(np.asarray(zero), axis, q.ndim)) * _along(scale, axis, q.ndim)


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Per-axis values shaped to broadcast along ``axis`` of an ``ndim`` tensor (a scalar as is)."""
    if values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _weight_to_fp8(graph: ir.Graph, dq: ir.Node, axis: int) -> None:
    """Re-quantize a weight to E4M3 per output channel (``axis``: 1 for MatMul [K, N] and ConvTranspose, 0 for Conv)."""
    weight = _dequantized(dq, axis)
    others = tuple(i for i in range(weight.ndim) if i != axis)
    scale = np.maximum(np.abs(weight).max(axis=others), 1e-12).astype(np.float32) / FP8_MAX
    q = (weight / _along(scale, axis, weight.ndim)).astype(ml_dtypes.float8_e4m3fn)
    old = list(dq.inputs[:2])
    base = old[0].name or dq.name
    dq.replace_input_with(0, constant(graph, f"{base}_fp8", q))
    dq.replace_input_with(1, constant(graph, f"{base}_fp8_scale", scale))
    for value in old:
        drop_if_unused(graph, value)
    _drop_zero_point(dq)
    dq.attributes["axis"] = ir.AttrInt64("axis", axis)


def _activation_to_fp8(graph: ir.Graph, dq: ir.Node) -> None:
    """An int8 activation Q/DQ pair keeps its clipping range in float8 e4m3fn."""
    quant = dq.inputs[0].producer()
    if quant is None or quant.op_type != "QuantizeLinear":
        raise PassError(f"the activation DequantizeLinear {dq.name!r} is not fed by a QuantizeLinear; "
                        "re-run the quantize pass before lowering for TensorRT.")
    scale = float(_const(quant.inputs[1])) * INT8_MAX / FP8_MAX
    x = quant.inputs[0]
    s = constant(graph, f"{x.name}_fp8_scale", np.array(scale, np.float32))
    zero = constant(graph, f"{x.name}_fp8_zero", np.array(0, ml_dtypes.float8_e4m3fn))
    old = {id(v): v for node in (quant, dq) for v in node.inputs[1:3] if v is not None}
    for node in (quant, dq):
        node.replace_input_with(1, s)
        node.replace_input_with(2, zero)
    for value in old.values():
        drop_if_unused(graph, value)
    quant.outputs[0].type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)
    dq.inputs[0].type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)


def _symmetric_int4(graph: ir.Graph, dq: ir.Node) -> None:
    """Block-quantized int4 weights over K with zero point 0, as TensorRT's INT4 weight-only GEMM reads them."""
    q = ir.convenience.get_const_tensor(dq.inputs[0])
    _per_channel_as_one_block(graph, dq)
    block = dq.attributes.get("block_size")
    axis = dq.attributes.get("axis")
    if block is None or block.as_int() <= 0 or len(q.shape) != 2 or (axis is not None and axis.as_int() not in (0, -2)):
        raise PassError(f"int4 weights of {dq.name!r} are not blocked over K (axis 0 with block_size); "
                        "TensorRT reads int4 only as block-quantized weights.")
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    zeros = _const(zero).astype(np.int32) if zero is not None else None
    if q.dtype == ir.DataType.INT4 and (zeros is None or not zeros.any()):
        _drop_zero_point(dq)
        return
    if q.dtype == ir.DataType.UINT4 and zeros is not None and (zeros == 8).all():
        signed = (q.numpy().astype(np.int8) - 8).astype(ml_dtypes.int4)
        old = dq.inputs[0]
        dq.replace_input_with(0, constant(graph, f"{old.name}_s4", signed))
        drop_if_unused(graph, old)
        _drop_zero_point(dq)
        return
    raise PassError(f"int4 weights of {dq.name!r} have a non-zero zero point; TensorRT needs symmetric int4 "
                    "(zero point 0): quantize with symmetric scales.")


def _drop_zero_point(dq: ir.Node) -> None:
    """Remove the (zero) zero point: TensorRT's default, and float8/int4 types need none."""
    if len(dq.inputs) > 2:
        old = dq.inputs[2]
        dq.resize_inputs(2)
        drop_if_unused(dq.graph, old)


def _float_tables(graph: ir.Graph) -> int:
    """Constant DequantizeLinear outputs read other than as a MatMul or convolution weight become float constants."""
    count = 0
    for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
        out = dq.outputs[0]
        if not out.uses() or all(u.node.op_type in _SITE_OPS and u.idx == 1 for u in out.uses()):
            continue
        if any(ir.convenience.get_const_tensor(v) is None for v in dq.inputs if v is not None):
            continue
        table = _dequantized_blocks(dq)
        out.replace_all_uses_with(constant(graph, f"{out.name or dq.name}_float", table))
        old = list(dq.inputs)
        graph.remove(dq, safe=True)
        for value in old:
            drop_if_unused(graph, value)
        count += 1
    return count


def _dequantized_blocks(dq: ir.Node) -> np.ndarray:
    """The float values of a constant DequantizeLinear, per tensor, per axis or per block."""
    q = _const(dq.inputs[0]).astype(np.float32)
    scale = _const(dq.inputs[1]).astype(np.float32)
    zero = _const(dq.inputs[2]).astype(np.float32) if len(dq.inputs) > 2 and dq.inputs[2] is not None else 0.0
    axis = dq.attributes["axis"].as_int() % q.ndim if "axis" in dq.attributes else 1 % max(q.ndim, 1)
    block = dq.attributes["block_size"].as_int() if "block_size" in dq.attributes else 0
    if block:
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis) if np.ndim(zero) else zero
    elif scale.ndim == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) else zero
    return ((q - zero) * scale).astype(np.float32)


def _per_channel_as_one_block(graph: ir.Graph, dq: ir.Node) -> None:
    """Per-output-channel int4 weights [K, N] (scale [N], axis 1) as one block spanning K: the same
    values, in the block form TensorRT reads int4 in (scale [1, N], axis 0, block_size K)."""
    q = ir.convenience.get_const_tensor(dq.inputs[0])
    scale = ir.convenience.get_const_tensor(dq.inputs[1])
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    if "block_size" in dq.attributes or len(q.shape) != 2 or len(scale.shape) != 1 or axis not in (1, -1):
        return
    old = dq.inputs[1]
    dq.replace_input_with(1, constant(graph, f"{old.name}_k_block", scale.numpy().reshape(1, -1)))
    drop_if_unused(graph, old)
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zero = dq.inputs[2]
        dq.replace_input_with(2, constant(graph, f"{zero.name}_k_block", _const(zero).reshape(1, -1)))
        drop_if_unused(graph, zero)
    dq.attributes["axis"] = ir.AttrInt64("axis", 0)
    dq.attributes["block_size"] = ir.AttrInt64("block_size", q.shape[0])
