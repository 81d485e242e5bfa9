"""Fusions between the quantized matmuls, for ONNX Runtime on the CPU (each chosen by measurement).

- Attention: onnxscript's rewriter turns the decomposed attention core (MatMul, scale, mask
  Add, Softmax, MatMul, head reshapes) into ``com.microsoft.MultiHeadAttention``, with the Q/K/V
  biases moved into it. Measured on MiniLM at 8 x 128 (docs/quantize.md): MultiHeadAttention
  beats the decomposed core and ``com.microsoft.Attention`` (whose fp32 QKV projection inside
  the op cannot use int8), and its CPU kernel has no packed-QKV (5-D) input, so Q, K and V
  stay three inputs. Only the SDPA and MHA rules run: the SkipLayerNormalization rules are left
  out on purpose (below), and DequantizeLinear of weights is never folded back to float.
- Unmasked batches take ORT's flash-attention kernel: its CPU MultiHeadAttention runs a
  flash-attention path only without a mask or bias input (measured 2.1 against 2.6-3.3 ms
  per layer at [8, 128, 384], 2 threads; 3.7 against 5.6 on one). Each MultiHeadAttention
  with an additive mask becomes ``If(sum|mask| == 0, MHA without it, MHA with it)``: exact
  (adding zeros changes nothing), and the check is one reduction per mask tensor.
- Grouped-query attention (fewer K/V heads than query heads, SmolLM2) is left unfused: the MHA
  rules do not match it, and the half-fused SDPA node they would leave ORT cannot load.
- Residual Add before LayerNormalization becomes ``Sum``: ORT 1.32's CPU
  SkipLayerNormalization (which ORT's own session optimizer would make of Add +
  LayerNormalization) measured 1.0-2.0 ms against 0.13-0.25 ms for the two ops apart at
  [8, 128, 384]; ``Sum`` computes the same and is not matched by that fusion.

Every rewrite is exact up to float rounding. ``fuse(model)`` returns the counts.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

_QUANT_OPS = ("DequantizeLinear", "QuantizeLinear")


def fuse(model: ir.Model) -> dict[str, int]:
    counts = {"multi_head_attention": _attention(model)}
    counts["unmasked_branch"] = _unmasked_branches(model)
    counts["residual_sum"] = _residual_sums(model)
    return counts


def _keep_quant(node: ir.Node) -> bool | None:
    """onnxscript folding callback: never fold the quantization ops into float constants."""
    return False if node.op_type in _QUANT_OPS else None


def _attention(model: ir.Model) -> int:
    import onnxscript.optimizer as oso
    from onnxscript.rewriter.ort_fusions import shape_optimization
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    if _grouped_query(model):
        # The MHA rules do not match grouped-query attention, and an SDPA node left behind is an
        # op of onnxscript's private domain that ORT cannot load (SmolLM2): leave attention as is.
        return 0
    common.ShapeInferencePass()(model)
    oso.optimize_ir(model, should_fold=_keep_quant)
    shape_optimization.rules.apply_to_model(model)
    oso.optimize_ir(model, should_fold=_keep_quant)
    if not fuse_sdpa(model, apply_shape_inference=True):
        return 0
    fused = fuse_mha1(model) + fuse_mha2(model)
    if fused:
        fuse_mha_scale(model)
        fuse_mha_bias(model)
    # Inlines any SDPA the MHA rules did not take back into plain ops, and drops dead nodes.
    oso.optimize_ir(model, should_fold=_keep_quant)
    return fused


def _grouped_query(model: ir.Model) -> bool:
    from optimizer.structure import build_map

    try:
        sites = [b.attention for b in build_map(model).blocks if b.attention is not None]
    except Exception:  # no map, no attention sites to judge: let the rules try
        return False
    return any(s.kv_heads is not None and s.heads is not None and s.kv_heads != s.heads for s in sites)


def _unmasked_branches(model: ir.Model) -> int:
    """MultiHeadAttention(q, k, v, bias, None, mask) -> If(all of mask is 0, without mask, with it)."""
    graph, conditions, count = model.graph, {}, 0
    for node in list(graph):
        if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft" or len(node.inputs) != 6:
            continue
        mask = node.inputs[5]
        if mask is None or any(v is not None for v in node.inputs[4:5]) or len(node.outputs) != 1:
            continue
        if id(mask) not in conditions:
            conditions[id(mask)] = _all_zero(graph, mask, node)
        branches = {"then_branch": _branch(node, node.inputs[:4], "unmasked"),
                    "else_branch": _branch(node, node.inputs, "masked")}
        choose = ir.node("If", [conditions[id(mask)]], attributes=branches, name=f"{node.name}_if_unmasked")
        graph.insert_before(node, [choose])
        out = node.outputs[0]
        name, out.name = out.name, None
        chosen = choose.outputs[0]
        chosen.name, chosen.type, chosen.shape = name, out.type, out.shape
        out.replace_all_uses_with(chosen, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count


def _all_zero(graph: ir.Graph, mask: ir.Value, before: ir.Node) -> ir.Value:
    """A bool scalar: every element of ``mask`` is 0 (no position is masked)."""
    # One pass, no intermediate tensor: the sum of |mask| is 0 only when every element is 0.
    peak = ir.node("ReduceL1", [mask], attributes={"keepdims": 0}, name=f"{mask.name}_l1")
    zero = ir.Value(name=f"{mask.name}_zero", const_value=ir.tensor(np.array(0, np.float32), name=f"{mask.name}_zero"),
                    shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.register_initializer(zero)
    test = ir.node("Equal", [peak.outputs[0], zero], name=f"{mask.name}_unmasked")
    test.outputs[0].name = f"{mask.name}_unmasked"
    graph.insert_before(before, [peak, test])
    return test.outputs[0]


def _branch(node: ir.Node, inputs, label: str) -> ir.Graph:
    """A one-node graph running ``node``'s op on outer-scope ``inputs``."""
    inner = ir.node(node.op_type, list(inputs), attributes={a.name: a.value for a in node.attributes.values()},
                    domain=node.domain, name=f"{node.name}_{label}")
    out = inner.outputs[0]
    out.name, out.type, out.shape = f"{node.outputs[0].name}_{label}", node.outputs[0].type, node.outputs[0].shape
    return ir.Graph([], [out], nodes=[inner], name=f"{node.name}_{label}")


def _residual_sums(model: ir.Model) -> int:
    """Add(a, b) -> Sum(a, b) where the Add's only reader is a LayerNormalization."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        uses = node.outputs[0].uses()
        if len(uses) != 1 or uses[0].node.op_type != "LayerNormalization" or node.outputs[0].is_graph_output():
            continue
        if not _same_shape(node.inputs[0], node.inputs[1]):
            continue  # Sum broadcasts too, but a bias Add is not a residual: leave it to ORT
        total = ir.node("Sum", list(node.inputs), name=f"{node.name}_sum")
        model.graph.insert_before(node, [total])
        out = node.outputs[0]
        name, out.name = out.name, None
        total.outputs[0].name, total.outputs[0].type, total.outputs[0].shape = name, out.type, out.shape
        out.replace_all_uses_with(total.outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _same_shape(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is None or b is None or a.shape is None or b.shape is None:
        return False
    return a.shape.rank() == b.shape.rank() and a.shape.rank() >= 2 and a.const_value is None and b.const_value is None
