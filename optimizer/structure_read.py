"""Reading a block's attention and MLP sites off the residual chain.

- Attention: from the core (Softmax or fused op) to Q*K^T and P*V, then to each projection
  (``structure_sites``); its output is the non-stream input of the residual merge the core
  post-dominates into. ORT's packed ``com.microsoft.Attention`` holds the QKV weights inside
  the op, so q/k/v stay None for it.
- MLP: the first chain segment after the attention merge (or after the block input, for a
  block without attention) that holds a weight projection and no attention core: its input is
  the stream value entering the segment, its output the non-stream input of the merge ending it.
"""

from __future__ import annotations

import onnx_ir as ir

from optimizer.structure_blocks import Chain
from optimizer.structure_flow import Flow
from optimizer.structure_sites import head_counts, mlp_intermediate, operands, projection, pv_matmul, qk_matmul
from optimizer.structure_types import AttentionSite, MlpSite


def _name(value: ir.Value | None) -> str | None:
    return value.name if value is not None else None


def _operands(flow: Flow, core: str) -> tuple[list[ir.Value | None], ir.Value | None, ir.Value | None]:
    """([q, k, v] as they enter the score/value products, probs, scores) of one core."""
    node = flow.nodes[core]
    if node.op_type != "Softmax":
        if node.op_type == "Attention" and node.domain == "com.microsoft":
            return [None, None, None], None, None
        inputs = list(node.inputs) + [None, None, None]
        return inputs[:3], None, None
    qk = flow.nodes[qk_matmul(flow, node)]  # a core Softmax always has one
    pv = pv_matmul(flow, node)
    v4 = operands(flow.nodes[pv])[1] if pv is not None else None
    q4, k4 = operands(qk)
    return [q4, k4, v4], node.outputs[0], node.inputs[0]


def read_attention(flow: Flow, chain: Chain, core: str) -> tuple[AttentionSite, int | None]:
    """The attention site of ``core`` and the chain position of its residual merge."""
    (q4, k4, v4), probs, scores = _operands(flow, core)
    stop = set(chain.keys)
    q, k, v = (projection(flow, x, stop) if x is not None else None for x in (q4, k4, v4))
    heads, kv_heads, head_dim = head_counts(q4, q, k)
    merge = chain.merge_pos(core)
    output = chain.branch_output(merge) if merge is not None else None
    if output is None:  # the branch never rejoins the stream: report the core's own output
        output = flow.nodes[core].outputs[0]
    site = AttentionSite(
        q=_name(q), k=_name(k), v=_name(v), probs=_name(probs), output=output.name,
        softmax_node=core if probs is not None else None, core=core, scores=_name(scores),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
    )
    return site, merge


def read_mlp(flow: Flow, chain: Chain, after: int, end: int) -> MlpSite | None:
    """The first MLP-like segment in chain positions ``(after, end]``."""
    for pos in range(after + 1, end + 1):
        members = chain.members.get(pos, [])
        if not chain.has_projection(pos) or any(k in chain.cores for k in members):
            continue
        output = chain.branch_output(pos)
        if output is None:
            continue
        return MlpSite(input=chain.value(chain.skip_noops(pos - 1)).name, output=output.name, intermediate=mlp_intermediate(flow, members))
    return None
