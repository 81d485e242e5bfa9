"""The KV-cache rewrite's graph edits (where they go is found by ``passes.kv_cache_find``).

- ``new_inputs``: ``position_ids`` and ``past_key_values.{i}.key|value``; ``attention_mask``
  now spans past and new tokens;
- ``mask``: one causal-and-padding mask ``[batch, 1, new, past+new]`` shared by every layer,
  built from ``attention_mask`` (query ``q`` sits at absolute position ``past + q``);
- ``concat``: ``Concat(past, current)`` on the token axis at each cache point, also a
  ``present.{i}.*`` output;
- ``follow_length``: GQA's ``Expand``/``Reshape`` after the cache point get shapes that do not
  mention a length (broadcast ones, ``0`` for batch and ``-1`` for tokens);
- ``lookup``: RoPE tables replaced by ``Gather(table, position_ids)``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from passes.kv_cache_find import SiteCache
from passes.quantize_rewrite import constant
from runtime.errors import PassError

PAST_DIM = "past_sequence"
TOTAL_DIM = "total_sequence"


def dims(layer: int, per_layer: bool) -> tuple[str, str]:
    """The symbolic past and total lengths of a layer's cache: shared, or its own when layers
    keep different numbers of tokens (ORT's planner takes equal names for equal sizes)."""
    return (f"{PAST_DIM}_{layer}", f"{TOTAL_DIM}_{layer}") if per_layer else (PAST_DIM, TOTAL_DIM)


def new_inputs(graph: ir.Graph, sites: list[SiteCache], token_dim: str,
               per_layer: bool = False) -> dict[int, tuple[ir.Value, ir.Value]]:
    """Adds ``position_ids`` and the past inputs; returns the past pair of each layer."""
    graph.inputs.append(ir.Value(name="position_ids", shape=ir.Shape(["batch", token_dim]),
                                 type=ir.TensorType(ir.DataType.INT64)))
    pasts = {}
    for site in sites:
        pair = []
        for kind, point in (("key", site.key), ("value", site.value)):
            shape = ir.Shape(["batch", point.shape[1], dims(site.layer, per_layer)[0], point.shape[3]])
            value = ir.Value(name=f"past_key_values.{site.layer}.{kind}", shape=shape, type=point.type)
            graph.inputs.append(value)
            pair.append(value)
        pasts[site.layer] = (pair[0], pair[1])
    return pasts


def concat(graph: ir.Graph, site: SiteCache, past: tuple[ir.Value, ir.Value], per_layer: bool = False) -> None:
    """``present = Concat(past, current)`` replaces the current K/V for attention and is an output."""
    for kind, point, old in (("key", site.key, past[0]), ("value", site.value, past[1])):
        users = list(point.uses())
        present = ir.Value(name=f"present.{site.layer}.{kind}", type=point.type,
                           shape=ir.Shape(["batch", point.shape[1], dims(site.layer, per_layer)[1], point.shape[3]]))
        node = ir.Node("", "Concat", [old, point], attributes=[ir.AttrInt64("axis", 2)], outputs=[present],
                       name=f"kv_cache_concat_{site.layer}_{kind}")
        graph.insert_after(point.producer(), node)
        for user, slot in users:
            user.replace_input_with(slot, present)
        graph.outputs.append(present)


def follow_length(graph: ir.Graph, site: SiteCache) -> None:
    """Give the GQA repeat after each cache point shapes that hold for any cached length."""
    for node in site.length_bound:
        if node.op_type == "Expand":
            _set_shape(graph, node, _broadcast_ones(node))
        elif node.op_type == "Reshape":
            _set_shape(graph, node, _relative_reshape(node))
            # the exporter writes allowzero=1; the new shape's 0 means "batch as in the input"
            node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
    for value in site.changed:
        value.shape = None  # their token axis is the cached length now; ORT infers it


def _set_shape(graph: ir.Graph, node: ir.Node, shape: list[int]) -> None:
    node.replace_input_with(1, constant(graph, f"{node.name}_shape", np.array(shape, np.int64)))


def _broadcast_ones(node: ir.Node) -> list[int]:
    """Expand's target as ones except where it repeats a size-1 axis by a static count."""
    src, out = node.inputs[0].shape, node.outputs[0].shape
    if src is None or out is None or len(src) != len(out):
        raise PassError(f"node {node.name} (Expand) after a cached tensor has no static rank; kv_cache cannot rewrite it.")
    return [d if s == 1 and isinstance(d, int) else 1 for s, d in zip(src, out)]


def _relative_reshape(node: ir.Node) -> list[int]:
    """Reshape's target with ``0`` for the batch axis and ``-1`` for the token axis."""
    src, out = node.inputs[0].shape, node.outputs[0].shape
    if out is None or src is None:
        raise PassError(f"node {node.name} (Reshape) after a cached tensor has no static shape; kv_cache cannot rewrite it.")
    shape = []
    for axis, dim in enumerate(out):
        if isinstance(dim, int):
            shape.append(dim)
        elif axis == 0 and len(src) > 0 and src[0] == dim:
            shape.append(0)
        else:
            shape.append(-1)
    if shape.count(-1) > 1:
        raise PassError(f"node {node.name} (Reshape) after a cached tensor has {shape.count(-1)} dynamic axes besides "
                        "batch; kv_cache cannot rewrite it.")
    return shape


def mask(graph: ir.Graph, input_ids: ir.Value, attention_mask: ir.Value, dtype: ir.DataType,
         tag: str = "") -> tuple[ir.Value, ir.Value]:
    """(additive mask, allowed) of shape ``[batch, 1, new, past+new]``; ``tag`` keeps the names of
    several masks (one per layer) apart."""
    t = tape.Tape()
    i64 = lambda x: t.initializer(ir.tensor(np.array(x, np.int64)), name=f"kv_cache_const{tag}_{len(t.initializers)}")
    total = t.op("Squeeze", [t.op("Shape", [attention_mask], {"start": 1, "end": 2})], name=f"kv_cache_total{tag}")
    new = t.op("Squeeze", [t.op("Shape", [input_ids], {"start": 1, "end": 2})], name=f"kv_cache_new{tag}")
    zero, one = i64(0), i64(1)
    positions = t.op("Range", [t.op("Sub", [total, new]), total, one], name=f"kv_cache_query_positions{tag}")
    keys = t.op("Range", [zero, total, one], name=f"kv_cache_key_positions{tag}")
    causal = t.op("LessOrEqual", [t.op("Unsqueeze", [keys, i64([0])]), t.op("Unsqueeze", [positions, i64([1])])])
    padding = t.op("Unsqueeze", [t.op("Cast", [attention_mask], {"to": ir.DataType.BOOL}, name=f"kv_cache_padding{tag}"), i64([1, 2])])
    allowed = t.op("And", [t.op("Unsqueeze", [causal, i64([0, 1])]), padding], name=f"kv_cache_allowed{tag}")
    low = np.finfo(dtype.numpy()).min
    fill = [t.initializer(ir.tensor(np.array(v, dtype.numpy())), name=f"kv_cache_fill{tag}_{i}") for i, v in enumerate((0, low))]
    additive = t.op("Where", [allowed, fill[0], fill[1]], name=f"kv_cache_mask{tag}")
    commit(graph, t)
    return additive, allowed


def apply_mask(graph: ir.Graph, site: SiteCache, additive: ir.Value, allowed: ir.Value) -> None:
    if site.mask_kind == "additive":
        site.mask_node.replace_input_with(site.mask_slot, additive)
    elif site.mask_kind == "keep":
        site.mask_node.replace_input_with(site.mask_slot, allowed)
    else:
        t = tape.Tape()
        dropped = t.op("Not", [allowed], name=f"kv_cache_dropped_{site.layer}")
        commit(graph, t)
        site.mask_node.replace_input_with(site.mask_slot, dropped)


def lookup(graph: ir.Graph, operand: ir.Value, table: np.ndarray, position_ids: ir.Value, rank: int) -> ir.Value:
    """``Gather(table, position_ids)`` shaped like the traced table: ``[batch, 1.., tokens, width]``."""
    t = tape.Tape()
    rows = t.initializer(ir.tensor(np.ascontiguousarray(table)), name=f"kv_cache_table_{operand.name}")
    gathered = t.op("Gather", [rows, position_ids], name=f"kv_cache_lookup_{operand.name}")
    if rank > 3:
        axes = t.initializer(ir.tensor(np.arange(1, rank - 2, dtype=np.int64)), name=f"kv_cache_axes_{operand.name}")
        gathered = t.op("Unsqueeze", [gathered, axes], name=f"kv_cache_lookup_{operand.name}_rank")
    commit(graph, t)
    return gathered


def attention_output(graph: ir.Graph, site: SiteCache, per_layer: bool = False) -> None:
    """``attention.{i} [batch, past+new]``: attention each cached token received in this step,
    summed over heads and queries (what heavy-hitter eviction accumulates)."""
    t = tape.Tape()
    axes = t.initializer(ir.tensor(np.array([1, 2], np.int64)), name=f"kv_cache_score_axes_{site.layer}")
    out = t.op("ReduceSum", [site.probs, axes], {"keepdims": 0}, name=f"kv_cache_scores_{site.layer}")
    out.name = f"attention.{site.layer}"
    out.type, out.shape = site.probs.type, ir.Shape(["batch", dims(site.layer, per_layer)[1]])
    commit(graph, t)
    graph.outputs.append(out)


def commit(graph: ir.Graph, t: tape.Tape) -> None:
    for value in t.initializers:
        graph.register_initializer(value)
    for node in t.nodes:  # every node of the rewrite is recognisable by its name
        if not node.name:
            node.name = f"kv_cache_{node.op_type}_{id(node):x}"
    graph.extend(t.nodes)
