"""Lowering the quantize pass's decisions to the fastest ONNX Runtime CPU kernels.

Input: MatMuls carrying ``carve.quantize`` metadata whose weight is ``DequantizeLinear`` of a
constant int8 tensor (``passes.quantize_rewrite``). Output, per mode (measured on MiniLM,
8 x 128 tokens, docs/quantize.md):

- ``dynamic``: ``com.microsoft.DynamicQuantizeMatMul(x, W_int8, scale, None, bias)``, with a
  following constant bias Add folded into it. Sites reading the same activation (Q, K, V)
  share one ``DynamicQuantizeLinear`` and each get ``com.microsoft.MatMulIntegerToFloat``;
  packing them into one wide DynamicQuantizeMatMul and splitting after measured no faster per
  output column and the Split cost 2.5% of the model.
- ``w8a8``: the static activation pair ``QuantizeLinear``/``DequantizeLinear`` becomes one
  ``QuantizeLinear`` to uint8 (zero point 128, the same grid as symmetric int8) feeding
  ``com.microsoft.MatMulIntegerToFloat`` per site, bias folded in.
- ``Conv``/``ConvTranspose`` decisions (``w8a8``): ``QLinearConv`` chains (``optimizer.lower.ort_conv``).
- ``w8``, ``w4`` and quantized embedding tables: ``com.microsoft.MatMulNBits`` and
  ``GatherBlockQuantized`` (``optimizer.lower.ort_wonly``; measured faster than leaving
  ``DequantizeLinear`` + ``MatMul`` to ORT, docs/quantize.md).

Before that, ``optimizer.lower.ort_fuse`` fuses attention and keeps LayerNormalization apart
from its residual Add. ``lower_quantized(model)`` returns what it did, for the manifest.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from optimizer.lower.ort_conv import lower_convs
from optimizer.lower.ort_fuse import fuse
from optimizer.lower.ort_wonly import lower_weight_only
from passes.quantize_rewrite import constant, decision

MS = "com.microsoft"


class _Site:
    """One decided MatMul: its int8 weight, scales, and the bias Add after it (if any)."""

    def __init__(self, node: ir.Node, info: dict):
        self.node, self.info = node, info
        dq = node.inputs[1].producer()
        self.q = ir.convenience.get_const_tensor(dq.inputs[0]).numpy()
        scale = ir.convenience.get_const_tensor(dq.inputs[1]).numpy().astype(np.float32)
        self.scale = np.broadcast_to(scale, (self.q.shape[1],)).copy() if scale.ndim == 0 else scale
        self.bias_add, self.bias = _bias_after(node)

    @property
    def output(self) -> ir.Value:
        """The value the site finally produces (after its bias, when folded)."""
        return (self.bias_add or self.node).outputs[0]

    def retire(self, graph: ir.Graph) -> None:
        for node in (self.bias_add, self.node):
            if node is not None:
                graph.remove(node, safe=True)


def has_decisions(model: ir.Model) -> bool:
    return any(decision(node) for node in model.graph)


def lower_quantized(model: ir.Model, weight_only: str = "nbits") -> dict:
    """Fuse, then replace every decided MatMul by its ORT kernel; returns counts.

    ``weight_only``: ``nbits`` (MatMulNBits / GatherBlockQuantized, ``ort_wonly``) or ``dq``
    (leave ``DequantizeLinear`` + ``MatMul`` for ORT; kept to measure the two against each other).
    """
    # The fusions were measured for the int8-activation modes (MiniLM); weight-only decoders
    # skip them (on SmolLM2 the SDPA rule matched but no MHA rule did, leaving an SDPA function ORT cannot load).
    activations = any((decision(n) or {}).get("mode") in ("dynamic", "w8a8") for n in model.graph)
    fused = fuse(model) if activations else {}
    sites = [_Site(n, decision(n)) for n in list(model.graph) if n.op_type == "MatMul" and _decided(n)]
    kernels: dict[str, int] = defaultdict(int)
    for key, group in _by_input(sites).items():
        mode = group[0].info["mode"]
        if mode == "dynamic":
            kernels["DynamicQuantizeMatMul" if len(group) == 1 else "MatMulIntegerToFloat"] += _dynamic(model.graph, group)
        elif mode == "w8a8":
            kernels["MatMulIntegerToFloat"] += _static(model.graph, group)
        elif weight_only == "dq":
            kernels["DequantizeLinear+MatMul"] += len(group)
    if weight_only == "nbits":
        kernels.update(lower_weight_only(model))
    kernels.update(lower_convs(model))
    model.opset_imports.setdefault(MS, 1)
    _drop_unused(model)
    return {"fusions": fused, "kernels": dict(kernels), "quantized_matmuls": len(sites)}


def _decided(node: ir.Node) -> bool:
    info = decision(node)
    dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return bool(info) and dq is not None and dq.op_type == "DequantizeLinear" and all(
        ir.convenience.get_const_tensor(v) is not None for v in dq.inputs[:2])


def _bias_after(node: ir.Node) -> tuple[ir.Node | None, np.ndarray | None]:
    """The Add right after ``node`` with a constant [N] operand, if ``node`` has no other reader."""
    uses = node.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "Add" or node.outputs[0].is_graph_output():
        return None, None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    tensor = ir.convenience.get_const_tensor(other) if other is not None else None
    n = node.inputs[1].shape[-1] if node.inputs[1].shape is not None else None
    if tensor is None or tensor.shape.dims != (n,):
        return None, None
    return add, tensor.numpy().astype(np.float32)


def _by_input(sites: list[_Site]) -> dict[tuple, list[_Site]]:
    """Sites grouped by (activation read, mode): the units one kernel can serve."""
    groups: dict[tuple, list[_Site]] = {}
    for site in sites:
        groups.setdefault((id(site.node.inputs[0]), site.info["mode"]), []).append(site)
    return groups


def _dynamic(graph: ir.Graph, group: list[_Site]) -> int:
    """DynamicQuantizeMatMul for a lone site; one shared DynamicQuantizeLinear for several."""
    x = group[0].node.inputs[0]
    if len(group) == 1:
        site = group[0]
        kernel = ir.node("DynamicQuantizeMatMul", [x, *_weights(graph, site), None, _bias(graph, site)],
                         domain=MS, name=f"{site.node.name}_dqmm")
        graph.insert_before(site.node, [kernel])
        _take_over(graph, site, kernel.outputs[0])
        return 1
    quant = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{group[0].node.name}_dql")
    graph.insert_before(group[0].node, [quant])
    xq, x_scale, x_zero = quant.outputs
    for site in group:
        wq, ws = _weights(graph, site)
        kernel = ir.node("MatMulIntegerToFloat", [xq, wq, x_scale, ws, x_zero, None, _bias(graph, site)],
                         domain=MS, name=f"{site.node.name}_mmitf")
        graph.insert_before(site.node, [kernel])
        _take_over(graph, site, kernel.outputs[0])
    return len(group)


def _weights(graph: ir.Graph, site: _Site) -> tuple[ir.Value, ir.Value]:
    base = site.node.name
    return constant(graph, f"{base}_wq", site.q), constant(graph, f"{base}_ws", site.scale)


def _bias(graph: ir.Graph, site: _Site) -> ir.Value | None:
    return constant(graph, f"{site.node.name}_b", site.bias) if site.bias is not None else None


def _static(graph: ir.Graph, group: list[_Site]) -> int:
    """QuantizeLinear to uint8 once, then MatMulIntegerToFloat per site."""
    dq = group[0].node.inputs[0].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].producer() is None:
        return 0
    x, scale = dq.inputs[0].producer().inputs[0], dq.inputs[1]
    zero = constant(graph, f"{x.name}_u8_zero", np.array(128, np.uint8))
    quant = ir.node("QuantizeLinear", [x, scale, zero], name=f"{x.name}_u8_q")
    graph.insert_before(group[0].node, [quant])
    for site in group:
        base = site.node.name
        wq, ws = _weights(graph, site)
        inputs = [quant.outputs[0], wq, scale, ws, zero, None, _bias(graph, site)]
        kernel = ir.node("MatMulIntegerToFloat", inputs, domain=MS, name=f"{base}_mmitf")
        graph.insert_before(site.node, [kernel])
        _take_over(graph, site, kernel.outputs[0])
    return len(group)


def _take_over(graph: ir.Graph, site: _Site, new: ir.Value) -> None:
    """``new`` replaces the site's final output (name, type, shape, readers, graph outputs)."""
    old = site.output
    name, old.name = old.name, None
    new.name, new.type, new.shape = name, old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    site.retire(graph)


def _drop_unused(model: ir.Model) -> None:
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)
