"""What lies outside the blocks: embeddings, final norm, head; and the token axis.

- Embeddings: every node the first block's input depends on (the token Gather, position and
  type embeddings, their norm; a ViT's patch Conv and class token), shape arithmetic included.
- Head: the first weight projection (MatMul/Gemm, quantized forms too) downstream of the last
  block's output and outside every block: ``lm_head``, a pooler's dense, a classifier.
- Final norm: the normalization between the last block and the head (``LayerNormalization``,
  an RMSNorm op, or the decomposed Pow/ReduceMean/Sqrt/Div/Mul form); its output value is the
  last norm-like node before the head. Post-norm encoders (BERT) have none.
- Token axis: the residual stream's axis whose dim equals the attention scores' key dim
  (``[batch, heads, queries, keys]``); ``[batch, tokens, hidden]`` gives 1. Its name is the
  symbolic dim there, or the token input's dim on that axis when shape inference could only
  invent one (``unk__8``; kept when the input has no name there either), or the static size as
  a string (``"257"`` for a ViT-S/14).
"""

from __future__ import annotations

import re

import networkx as nx
import onnx_ir as ir

from optimizer.structure_flow import Flow
from optimizer.structure_sites import is_weight_matmul, with_bias

_NORMISH = {
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Div", "Mul", "Add", "Sub", "Cast",
}
_REDUCING = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "ReduceMean"}
_GENERATED_DIM = re.compile(r"^(unk__\d+|.*_dim_\d+)$")


def embeddings(flow: Flow, first_input: str, owned: set[str]) -> list[str]:
    """Node keys the first block's input is computed from (itself included), in graph order."""
    keys = nx.ancestors(flow.g, first_input) | {first_input}
    return flow.sorted_keys(k for k in keys if k in flow.nodes and k not in owned)


def tail(flow: Flow, last_output: str, owned: set[str]) -> tuple[str | None, list[str], str | None]:
    """(head node key, final-norm node keys, final-norm output value name) after the last block."""
    after = {k for k in nx.descendants(flow.g, last_output) if k in flow.nodes and k not in owned}
    heads = [k for k in flow.sorted_keys(after) if is_weight_matmul(flow, flow.nodes[k])]
    head = heads[0] if heads else None
    between = after & nx.ancestors(flow.g, head) if head else after
    norm = [k for k in flow.sorted_keys(between) if flow.nodes[k].op_type in _NORMISH]
    if not any(flow.nodes[k].op_type in _REDUCING for k in norm):
        return head, [], None  # e.g. BERT: only the pooler's token select before the head
    return head, norm, flow.nodes[norm[-1]].outputs[0].name


def head_output(flow: Flow, head: str | None) -> str | None:
    return None if head is None else with_bias(flow, flow.nodes[head].outputs[0]).name


def _same(a: object, b: object) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return getattr(a, "value", None) is not None and getattr(a, "value", None) == getattr(b, "value", None)


def token_axis(stream: ir.Value, scores: ir.Value | None) -> int | None:
    shape = stream.shape
    if shape is None or len(shape) < 2:
        return None
    default = 1 if len(shape) == 3 else 0
    if scores is None or scores.shape is None or len(scores.shape) < 2:
        return default
    keys_dim = scores.shape[-1]
    matches = [i for i in range(len(shape) - 1) if _same(shape[i], keys_dim)]
    return default if not matches or default in matches else matches[0]


def token_dim(stream: ir.Value, axis: int | None, token_input: ir.Value | None) -> str | None:
    if axis is None or stream.shape is None:
        return None
    dim = stream.shape[axis]
    if isinstance(dim, int):
        return str(dim)
    name = dim.value
    if name and not _GENERATED_DIM.match(name):
        return name
    shape = token_input.shape if token_input is not None else None
    if shape is not None and len(shape) > axis and not isinstance(shape[axis], int) and shape[axis].value:
        return shape[axis].value
    return name


def hidden_size(stream: ir.Value) -> int | None:
    shape = stream.shape
    return shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else None
