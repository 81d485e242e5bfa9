"""Attention cores and the projections around them, found by graph pattern.

An *attention core* is where queries meet keys:
- a ``Softmax`` whose input comes (through the scale, the mask ``Add``, ``Where``, ``Cast``,
  a soft-cap ``Tanh``) from a ``MatMul`` of two activations (Q times K^T). Eager attention and
  torch's decomposed ``scaled_dot_product_attention`` both look like this. A router Softmax
  (mixture of experts) reads a weight MatMul and so is not a core;
- a fused attention op (ONNX ``Attention``, ORT's ``Attention``, ``MultiHeadAttention``,
  ``GroupQueryAttention``, ...): a core without probabilities.

From a core the site is read outwards: the ``MatMul`` that multiplies the probabilities by V
(through ``Where``/``IsNaN`` guards and ``Cast``), and for each of Q, K, V the nearest weight
projection upstream (through reshapes, transposes, RoPE, GQA's repeat of K/V), with its bias
``Add`` when there is one. Quantized graphs work too: Q/DQ pairs sit among the score ops, weights
seen through ``DequantizeLinear`` are still weights, and an ORT ``MatMulInteger`` projection is
named after the Cast and scale Mul that dequantize it.
"""

from __future__ import annotations

from collections import deque

import onnx_ir as ir

from optimizer.structure_flow import Flow

FUSED_ATTENTION = {
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
    "PackedMultiHeadAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention",
}
_QK_MATMULS = {"MatMul", "FusedMatMul", "Einsum"}
WEIGHT_MATMULS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "FusedMatMul", "Einsum"}
# Ops allowed between Q*K^T and the Softmax, and between the Softmax and P*V (masking,
# scaling, soft-capping, NaN guards, and the Q/DQ pairs of a quantized graph).
_SCORE_OPS = {
    "Add", "Sub", "Mul", "Div", "Where", "Cast", "Tanh", "Clip", "Min", "Max", "Neg", "Identity",
    "Dropout", "IsNaN", "Not", "Expand", "QuantizeLinear", "DequantizeLinear",
}
# Where the two matrix operands sit, when not first and second.
_OPERAND_SLOTS = {"QLinearMatMul": (0, 3)}
_MAX_SCORE_HOPS = 8
_MAX_PROJECTION_HOPS = 40


def operands(node: ir.Node) -> list[ir.Value]:
    """The two matrices a (quantized) MatMul/Gemm multiplies; fewer when some are missing."""
    slots = _OPERAND_SLOTS.get(node.op_type, (0, 1))
    return [node.inputs[i] for i in slots if i < len(node.inputs) and node.inputs[i] is not None]


def is_weight_matmul(flow: Flow, node: ir.Node) -> bool:
    """A MatMul/Gemm (float or quantized) with one operand computed from weights alone."""
    if node.op_type not in WEIGHT_MATMULS:
        return False
    pair = operands(node)
    return len(pair) == 2 and sum(flow.is_weight(v) for v in pair) == 1


def _is_qk(flow: Flow, node: ir.Node) -> bool:
    pair = operands(node)
    return node.op_type in _QK_MATMULS and len(pair) == 2 and not any(flow.is_weight(v) for v in pair)


def qk_matmul(flow: Flow, softmax: ir.Node) -> str | None:
    """The activation-by-activation MatMul a Softmax's scores come from, if any."""
    queue, seen = deque([(softmax.inputs[0], 0)]), set()
    while queue:
        value, hops = queue.popleft()
        key = flow.producer(value)
        if key is None or key in seen or hops > _MAX_SCORE_HOPS:
            continue
        seen.add(key)
        node = flow.nodes[key]
        if _is_qk(flow, node):
            return key
        if node.op_type in _SCORE_OPS:
            queue.extend((v, hops + 1) for v in flow.activations(node))
    return None


def pv_matmul(flow: Flow, softmax: ir.Node) -> str | None:
    """The MatMul that multiplies the probabilities by V (probabilities as its first operand)."""
    queue, seen = deque([(softmax.outputs[0], 0)]), set()
    while queue:
        value, hops = queue.popleft()
        for key in flow.consumers(value):
            node = flow.nodes[key]
            if key in seen or hops > _MAX_SCORE_HOPS:
                continue
            seen.add(key)
            if _is_qk(flow, node) and operands(node)[0] is value:
                return key
            if node.op_type in _SCORE_OPS:
                queue.extend((out, hops + 1) for out in node.outputs)
    return None


def find_cores(flow: Flow) -> list[str]:
    """Every attention core in graph order."""
    cores = []
    for key, node in flow.nodes.items():
        if node.op_type in FUSED_ATTENTION:
            cores.append(key)
        elif node.op_type == "Softmax" and qk_matmul(flow, node) is not None:
            cores.append(key)
    return cores


def projection(flow: Flow, value: ir.Value | None, stop: set[str]) -> ir.Value | None:
    """The nearest weight projection's output upstream of ``value`` (bias Add included).

    The search goes breadth-first through any ops (reshape, transpose, RoPE, repeat_kv) and
    does not pass the residual chain nodes in ``stop``, so it never reaches the previous block.
    """
    queue, seen = deque([(value, 0)]), set()
    while queue:
        current, hops = queue.popleft()
        key = flow.producer(current)
        if key is None or key in seen or key in stop or hops > _MAX_PROJECTION_HOPS:
            continue
        seen.add(key)
        node = flow.nodes[key]
        if is_weight_matmul(flow, node):
            return with_bias(flow, node.outputs[0])
        queue.extend((v, hops + 1) for v in flow.activations(node))
    return None


def with_bias(flow: Flow, value: ir.Value) -> ir.Value:
    """A projection's float output: past the Cast and scale Mul that dequantize an integer
    product (ORT's dynamic quantization), and its bias Add's output when that is its only use."""
    producer = value.producer()
    if producer is not None and producer.op_type == "MatMulInteger":
        for op in ("Cast", "Mul"):
            value = _only_use(value, op) or value
    add = _only_use(value, "Add")
    return add if add is not None and len(flow.activations(add.producer())) == 1 else value


def _only_use(value: ir.Value, op_type: str) -> ir.Value | None:
    users = [user for user, _ in value.uses()]
    return users[0].outputs[0] if len(users) == 1 and users[0].op_type == op_type else None


def _static(shape: ir.Shape | None, axis: int) -> int | None:
    if shape is None:
        return None
    try:
        dim = shape[axis]
    except IndexError:
        return None
    return dim if isinstance(dim, int) else None


def head_counts(q4: ir.Value | None, q_proj: ir.Value | None, k_proj: ir.Value | None) -> tuple[int | None, int | None, int | None]:
    """(heads, kv_heads, head_dim) from Q as it enters Q*K^T ([batch, heads, tokens, head_dim])
    and the projections' widths ([..., heads * head_dim]); None where shapes are not static.
    K as it enters Q*K^T may already be repeated for grouped-query attention, so kv_heads is
    read from K's projection instead."""
    shape = q4.shape if q4 is not None else None
    if shape is None or len(shape) != 4 or _static(shape, 3) is None:
        return None, None, None
    head_dim = _static(shape, 3)
    heads = _static(shape, 1) or _per_head(q_proj, head_dim)
    kv_heads = _per_head(k_proj, head_dim)
    if k_proj is not None and k_proj is q_proj and heads and kv_heads:
        # one fused QKV projection (GPT-2's c_attn): its width holds heads + 2 * kv_heads
        kv_heads = (kv_heads - heads) // 2 if (kv_heads - heads) % 2 == 0 else None
    return heads, kv_heads, head_dim


def _per_head(projection: ir.Value | None, head_dim: int) -> int | None:
    width = _static(projection.shape, -1) if projection is not None else None
    return width // head_dim if width and width % head_dim == 0 else None


def mlp_intermediate(flow: Flow, keys: list[str]) -> str | None:
    """The activation entering the last weight projection of an MLP segment (down_proj's input)."""
    projections = [k for k in keys if is_weight_matmul(flow, flow.nodes[k])]
    if not projections:
        return None
    node = flow.nodes[flow.sorted_keys(projections)[-1]]
    operand = next((v for v in operands(node) if not flow.is_weight(v)), None)
    return operand.name if operand is not None else None
